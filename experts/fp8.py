"""FP8 block-quantized weights, as DeepSeek-V3 and GLM publish them, dequantized on read.

A quantized linear weight `{name}` (e.g. `...experts.3.up_proj.weight`) is stored as
float8_e4m3fn [out, in]; its companion `{name}_scale_inv` is float32
[ceil(out / block_out), ceil(in / block_in)], where (block_out, block_in) is config.json's
`quantization_config.weight_block_size` (default [128, 128]). The real weight is
`w.float() * scale_inv[i // block_out, j // block_in]`: each scale repeated over its block,
the last blocks cropped to [out, in]. A fused expert tensor [E, out, in] has scales
[E, ceil(out / block_out), ceil(in / block_in)]; one expert's row of each pairs the same way.
Tensors the checkpoint does not quantize (gates, norms, biases) have no scale and stay as stored.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
FP8_DTYPES = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FP8_DTYPES


def scale_name(name: str) -> str:
    """The name of the scale tensor of `name`: `...proj.weight` -> `...proj.weight_scale_inv`."""
    return name + SCALE_SUFFIX


def block_size(config: dict[str, Any]) -> tuple[int, int]:
    """(block_out, block_in) from a transformers config dict; [128, 128] when it names none."""
    block = (config.get("quantization_config") or {}).get("weight_block_size") or DEFAULT_BLOCK
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"quantization_config.weight_block_size must be two positive ints, not {block!r}")
    return int(block[0]), int(block[1])


class MissingScale(LookupError):
    """An FP8 tensor without its `_scale_inv`: it cannot be dequantized; the message names both."""


def dequantize(
    name: str, tensor: torch.Tensor, scales: Any, row: int | None, block: tuple[int, int], where: str
) -> torch.Tensor:
    """`tensor` as stored when it is not FP8; else float32, dequantized with `scales`.

    name: the tensor's name in the checkpoint; tensor: all of it, or its row `row` (one expert of
    a fused tensor); scales: a safetensors slice of `{name}_scale_inv`, None when there is none;
    where: the checkpoint, for messages.
    """
    if not is_fp8(tensor):
        return tensor
    if scales is None:
        raise MissingScale(
            f"{where}: tensor {name!r} is {tensor.dtype} but the checkpoint has no {scale_name(name)!r} "
            "to dequantize it with"
        )
    return dequantize_blocks(tensor, scales[:] if row is None else scales[row], block, name)


def dequantize_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "weight"
) -> torch.Tensor:
    """float32 `weight` [..., out, in] times `scale_inv` [..., ceil(out/bo), ceil(in/bi)] per block."""
    (rows, cols), (bo, bi) = weight.shape[-2:], block
    expected = (*weight.shape[:-2], math.ceil(rows / bo), math.ceil(cols / bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"{name!r} {list(weight.shape)} with blocks {list(block)} needs scales {list(expected)}, "
            f"but {scale_name(name)!r} is {list(scale_inv.shape)}"
        )
    scale = scale_inv.float().repeat_interleave(bo, dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(bi, dim=-1)[..., :cols]
    return weight.float() * scale
