"""The owner-only KV cache: one key and one value buffer per owner layer, none for shared layers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from kvexport.strategies import CacheLayout

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8,
                "float8_e4m3fn": torch.float8_e4m3fn}  # cache element dtypes
# The ONNX element type of a tensor, by which ONNX Runtime binds it (numpy, its other way, has no float8 type).
ONNX_ELEMENT_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.int8: TensorProto.INT8,
                      torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN, torch.int64: TensorProto.INT64,
                      torch.int32: TensorProto.INT32}
# A host copy of cache elements: float8 ones as their bytes, as ONNX Runtime returns them.
NUMPY_CACHE_TYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "float8_e4m3fn": np.uint8}


def cache_element_type(dtype: str) -> int:
    """The ONNX element type of a cache of `dtype` (a CacheLayout.dtype)."""
    return ONNX_ELEMENT_TYPES[TORCH_DTYPES[dtype]]


def host_elements(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's elements on the host, as NUMPY_CACHE_TYPES holds them."""
    tensor = tensor.detach().cpu()
    return (tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor).numpy()


class KVCache:
    """Holds the past K/V that the next step reads, keyed by graph input name.

    The values are whatever the backend binds (numpy arrays on the CPU, device OrtValues on CUDA); the
    cache only knows the contract: which names exist and how many bytes they hold.
    """

    def __init__(self, layout: CacheLayout):
        self.layout = layout
        self.batch = 0
        self.length = 0
        self.values: dict[str, Any] = {}

    def reset(self, batch: int, empty_buffers: dict[str, Any]) -> None:
        missing = {past for past, _ in self.layout.names()} ^ set(empty_buffers)
        if missing:
            raise ValueError(f"cache buffers do not match the export's owners: {sorted(missing)}")
        self.batch, self.length, self.values = batch, 0, dict(empty_buffers)

    def update(self, presents: dict[str, Any], new_tokens: int) -> None:
        """Take this step's presents (by present name) as the next step's pasts."""
        self.values = {past: presents[present] for past, present in self.layout.names()}
        self.length += new_tokens

    @property
    def bytes_in_use(self) -> int:
        return self.batch * self.length * self.layout.bytes_per_token()

    @property
    def full_cache_bytes(self) -> int:
        """What the same batch and length would hold if every layer kept its own cache."""
        return self.batch * self.length * self.layout.full_bytes_per_token
