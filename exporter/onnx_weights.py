"""The export's one external-data file: weights are converted and appended tensor by tensor as a graph is built.

A graph proto then holds only references (location, offset, length), never weight bytes, so building and saving
it costs no memory of the model's size. The dynamic and the static graph share the file: a weight both use (same
name, same values) is written once. The file's sha256 is computed as it is written, for the manifest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import onnx
import torch
from onnx import helper

TORCH_TYPES = {"float32": torch.float32, "float16": torch.float16}
ALIGNMENT = 4096  # large tensors start on a page, so that ONNX Runtime can map them instead of copying
SMALL = 1 << 16


class WeightFile:
    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("wb")
        self._digest = hashlib.sha256()
        self.size = 0
        self._written: dict[str, onnx.TensorProto] = {}

    def initializer(self, name: str, tensor: torch.Tensor | np.ndarray, dtype: str) -> onnx.TensorProto:
        """An initializer that refers to `tensor`'s values, converted to `dtype` ("float32" | "float16"), in the
        file. Names identify values: a name written before is not written again."""
        if name in self._written:
            return self._written[name]
        if isinstance(tensor, torch.Tensor):  # converted by torch: numpy has no bfloat16
            array = tensor.detach().to(device="cpu", dtype=TORCH_TYPES[dtype]).contiguous().numpy()
        else:
            array = np.ascontiguousarray(tensor, dtype=np.dtype(dtype))
        self._write(bytes(-self.size % (ALIGNMENT if array.nbytes >= SMALL else 64)))
        offset = self.size
        self._write(array.reshape(-1).view(np.uint8).data)
        proto = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                 dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self._written[name] = proto
        return proto

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._digest.update(data)
        self.size += memoryview(data).nbytes

    def record(self) -> dict:
        """The file's manifest record ({"bytes", "sha256"}), once it is closed."""
        return {"bytes": self.size, "sha256": self._digest.hexdigest()}

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None):
        self.close()
