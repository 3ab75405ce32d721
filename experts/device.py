"""Which device and dtype an expert host computes on, from the names a user types.

AMD GPUs appear to torch (ROCm builds) as "cuda" devices, Intel GPUs as "xpu", Apple GPUs as
"mps"; "auto" picks the first of those torch can use, else the CPU.
"""

from __future__ import annotations

import torch

_AUTO_ORDER: tuple[str, ...] = ("cuda", "xpu", "mps", "cpu")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


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


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Name to dtype: "float32"/"fp32", "float16"/"fp16", "bfloat16"/"bf16" (or such a torch.dtype)."""
    if isinstance(name, torch.dtype):
        if name in _DTYPE_NAMES:
            return name
        raise ValueError(f"dtype {name} is not supported; use one of {sorted(set(_DTYPE_NAMES.values()))}")
    key = name.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {list(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32" (the canonical name parse_dtype accepts and the wire uses)."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} is not supported; use one of {list(_DTYPE_NAMES.values())}")
    return _DTYPE_NAMES[dtype]


def device_healthy(device: torch.device) -> bool:
    """A tiny matmul on `device` and back: False when the device errors (lost, reset, ECC, ...)."""
    try:
        x = torch.ones(4, 4, device=device)
        return bool((x @ x).sum().item() == 64.0)
    except RuntimeError:
        return False
