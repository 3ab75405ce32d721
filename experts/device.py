"""Which device and dtype an expert host computes on, from the names a user types.

AMD GPUs appear to torch (ROCm builds) as "cuda" devices, Intel GPUs as "xpu", Apple GPUs as
"mps"; "auto" picks the first of those torch can use, else the CPU. Dtype names live in
`moemesh.protos.spec` (`parse_dtype`, `dtype_name`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

_AUTO_ORDER: tuple[str, ...] = ("cuda", "xpu", "mps", "cpu")


def _available(kind: str) -> bool:
    """Whether torch can use devices of this type in this process."""
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return False


def _count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "xpu":
        return torch.xpu.device_count()
    return 1


def available_devices() -> list[str]:
    """Device types torch can use here, in the order "auto" tries them."""
    return [kind for kind in _AUTO_ORDER if _available(kind)]


def resolve_device(name: str | None) -> torch.device:
    """Pick a device: "auto" or None -> the first usable of cuda, xpu, mps, cpu; else validate `name` ("cuda:1", "cpu").

    Raises ValueError naming the device and what torch can use here when `name` is unknown or
    not usable in this process.
    """
    if name is None or name.strip().lower() == "auto":
        return torch.device(next(kind for kind in _AUTO_ORDER if _available(kind)))
    text = name.strip().lower()
    # ROCm builds of torch address AMD GPUs as "cuda"; accept the names people use for them.
    for alias in ("rocm", "hip"):
        if text == alias or text.startswith(alias + ":"):
            text = "cuda" + text[len(alias) :]
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"device {name!r} is not a device name; use 'auto' or one of {available_devices()} "
            f"(optionally with an index, e.g. 'cuda:0')"
        ) from err
    if device.type not in _AUTO_ORDER or not _available(device.type):
        raise ValueError(f"device {name!r} is not available here; torch can use {available_devices()}")
    if device.index is not None and device.index >= _count(device.type):
        raise ValueError(
            f"device {name!r} does not exist; this machine has {_count(device.type)} {device.type} device(s)"
        )
    return device


def device_healthy(device: torch.device) -> bool:
    """A tiny matmul on `device` and back: False when the device errors (lost, reset, ECC, ...)."""
    try:
        x = torch.ones(4, 4, device=device)
        return bool((x @ x).sum().item() == 64.0)
    except RuntimeError:
        return False


def torch_executor(max_workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool for torch work that keeps the process's intra-op thread count.

    OpenMP's thread count is per thread: pool threads would otherwise start with one OpenMP thread
    per core whatever `torch.set_num_threads` said, and several processes sharing a machine then
    oversubscribe it (measured: 5x slower forwards on a 2-core local mesh).
    """
    threads = torch.get_num_threads()
    return ThreadPoolExecutor(
        max_workers, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(threads,)
    )
