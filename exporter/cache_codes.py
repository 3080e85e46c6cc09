"""A quantized KV cache: its element type, the scales of each owner's K and V, and an element's rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvexport.strategies import contract as c


@dataclass(frozen=True)
class QuantizedCache:
    """per_tensor: one scale an owner, shared by K and V (both entries one 0-d tensor), as ONNX Runtime's XQA
    kernel reads a quantized cache; else one scale per KV head and channel, [kv_heads, 1, head_dim]."""

    element: str  # a key of contract.QUANTIZED_CACHE_LIMITS
    scales: dict[int, tuple[torch.Tensor, torch.Tensor]]  # owner -> its K and V scales
    per_tensor: bool = False

    @property
    def limits(self) -> tuple[float, float]:
        return c.QUANTIZED_CACHE_LIMITS[self.element]

    def round_trip(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x as the cache holds it, times its scale: x / scale rounded to the element type (int8: half to even) and
        clipped to its limits; in float32, as the graphs compute it."""
        scale = scale.to(x.device, torch.float32)
        low, high = self.limits
        scaled = x.float() / scale
        if self.element == "int8":
            codes = torch.clamp(torch.round(scaled), low, high)
        else:  # clipped first: torch's float8 cast does not saturate
            codes = torch.clamp(scaled, low, high).to(getattr(torch, self.element)).float()
        return (codes * scale).to(x.dtype)
