"""Block-wise weight quantization, as ONNX Runtime's MatMulNBits stores it; and the scales of a quantized KV cache.

A weight [in, out] is cut, for each output, into blocks of `block` consecutive inputs; each block keeps one scale
(its largest magnitude over 2^(bits-1) - 1: symmetric round-to-nearest) and `bits`-bit codes q, stored with the
implicit zero point 2^(bits-1), so w = (q - 2^(bits-1)) * scale. Codes are packed along the inputs, the lower bits
first, into [out, blocks, block * bits / 8] bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from kvexport.strategies import Strategy
from kvexport.strategies import contract as c

from .cache_codes import QuantizedCache
from .models import BlockQuantized, DecoderDescription
from .reference import ReferenceDecoder


def quantize(weight: torch.Tensor, fmt: BlockQuantized) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [out, blocks, block] int16 in [0, 2^bits), scales [out, blocks] float32) of a weight [in, out]. The
    scales are rounded to fmt.scale_dtype first, as the export stores them, so that the codes are fitted to the
    scales the graph multiplies by and the reference dequantizes with exactly those (in a float16 export a
    float32 scale rounds by up to 2^-11, the same for its whole block, which a 7B's 32 layers of random weights
    amplified past the validation's tolerance)."""
    columns, rows = weight.shape[1], weight.shape[0]
    blocks = weight.detach().to(torch.float32).t().reshape(columns, rows // fmt.block, fmt.block)
    middle = 1 << (fmt.bits - 1)
    scales = stored_up(blocks.abs().amax(-1) / (middle - 1), getattr(torch, fmt.scale_dtype))
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block: codes 0, scale 0
    codes = torch.clamp(torch.round(blocks / safe[..., None]), -middle, middle - 1) + middle
    return codes.to(torch.int16), scales


def stored_up(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 values as `dtype` holds them, rounded up where it must round (a smaller scale would clip the
    block's largest weight), back in float32."""
    stored = values.to(dtype)
    below = stored.to(torch.float32) < values
    return torch.where(below, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored).to(torch.float32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: BlockQuantized) -> torch.Tensor:
    """The weight [in, out] that quantized codes stand for, in float32."""
    values = (codes.to(torch.float32) - (1 << (fmt.bits - 1))) * scales[..., None]
    return values.reshape(values.shape[0], -1).t()


def round_trip(weight: torch.Tensor, fmt: BlockQuantized) -> torch.Tensor:
    """The weight as the export computes with it: quantized, then dequantized (float32)."""
    return dequantize(*quantize(weight, fmt), fmt)


def packed(codes: torch.Tensor, fmt: BlockQuantized) -> np.ndarray:
    """MatMulNBits' B input: codes [out, blocks, block] as uint8 [out, blocks, block * bits / 8]."""
    values = codes.to(torch.uint8).numpy()
    if fmt.bits == 8:
        return np.ascontiguousarray(values)
    return np.ascontiguousarray(values[..., 0::2] | (values[..., 1::2] << 4))


KV_CALIBRATION = (8, 128)  # windows x tokens of calibration text that set a quantized cache's scales


def kv_scales(description: DecoderDescription, strategy: Strategy, windows: torch.Tensor, device: torch.device,
              element: str, per_tensor: bool = False) -> QuantizedCache:
    """A cache of `element` codes with each owner's K and V scales: the largest magnitude that each channel
    reaches on the calibration windows (per_tensor: that K and V reach anywhere), over the largest code (127, or
    float8 E4M3's 448). A rotated key channel takes its rotary pair's largest joint magnitude, which no position's
    rotation can exceed."""
    ones = torch.ones_like(windows)
    reference = ReferenceDecoder(description, strategy, torch.float32, device)
    with torch.no_grad():
        layer_kv = reference.forward(windows, ones, torch.arange(windows.shape[1]).expand_as(windows),
                                     collect_layer_kv=True).layer_kv
    half, largest = description.rotary_dim // 2, c.QUANTIZED_CACHE_LIMITS[element][1]
    scales = {}
    for owner in strategy.owners:
        keys, values = (t.float().abs() for t in layer_kv[owner])  # [windows, kv_heads, tokens, head_dim]
        pairs = torch.sqrt(keys[..., :half] ** 2 + keys[..., half:2 * half] ** 2)
        keys = torch.cat([pairs, pairs, keys[..., 2 * half:]], dim=-1)
        if per_tensor:
            shared = (torch.maximum(keys.amax(), values.amax()) / largest).clamp_min(1e-8).cpu()
            scales[owner] = (shared, shared)
        else:
            scales[owner] = tuple((t.amax(dim=(0, 2)).unsqueeze(1) / largest).clamp_min(1e-8).cpu()
                                  for t in (keys, values))
    return QuantizedCache(element, scales, per_tensor)
