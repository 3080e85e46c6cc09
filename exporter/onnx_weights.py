"""The export's one external-data file: weights are converted and appended tensor by tensor as a graph is built.

A graph proto then holds only references (location, offset, length), never weight bytes, so building and saving
it costs no memory of the model's size. The dynamic and the static graph share the file: a weight both use (same
name, same values) is written once. A tensor's place in the file follows from its shape, so conversions (mostly
transposes, which torch runs on one core) go to a pool of threads and are written in order as they finish, with at
most WINDOW tensors in flight; the file's sha256 is computed as it is written, for the manifest.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
THREADS = min(8, os.cpu_count() or 1)
WINDOW = 2 * THREADS


def converted(tensor: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """C-contiguous values in `dtype`; torch converts (numpy has no bfloat16)."""
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().to(device="cpu", dtype=TORCH_TYPES[dtype]).contiguous().numpy()
    return np.ascontiguousarray(tensor, dtype=np.dtype(dtype))


class WeightFile:
    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("wb")
        self._digest = hashlib.sha256()
        self.size = 0  # bytes the file will have once every queued tensor is written
        self._written: dict[str, onnx.TensorProto] = {}
        self._pool = ThreadPoolExecutor(max_workers=THREADS)
        self._queue: deque[tuple[int, int, Future]] = deque()  # (padding, bytes, conversion) in file order

    def initializer(self, name: str, tensor: torch.Tensor | np.ndarray, dtype: str) -> onnx.TensorProto:
        """An initializer that refers to `tensor`'s values, converted to `dtype` ("float32" | "float16"), in the
        file. Names identify values: a name written before is not written again."""
        if name in self._written:
            return self._written[name]
        return self._place(name, tuple(tensor.shape), dtype, self._pool.submit(converted, tensor, dtype))

    def derived(self, names: list[str], shapes: list[tuple[int, ...]], dtypes: list[str],
                compute: Callable[[], list[np.ndarray]]) -> list[onnx.TensorProto]:
        """Initializers of the arrays that one computation makes (a quantized weight's codes and scales), each of
        the shape and dtype given, computed on the file's threads."""
        if names[0] in self._written:
            return [self._written[name] for name in names]
        shared, parts = self._pool.submit(compute), [Future() for _ in names]

        def hand_out(done: Future) -> None:
            for index, part in enumerate(parts):
                if done.exception() is not None:
                    part.set_exception(done.exception())
                else:
                    part.set_result(done.result()[index])

        shared.add_done_callback(hand_out)
        return [self._place(*entry) for entry in zip(names, shapes, dtypes, parts, strict=True)]

    def _place(self, name: str, shape: tuple[int, ...], dtype: str, values: Future) -> onnx.TensorProto:
        """The next place in the file for `values` (a Future of an array of that shape and dtype)."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        padding = -self.size % (ALIGNMENT if nbytes >= SMALL else 64)
        offset = self.size + padding
        self.size = offset + nbytes
        self._queue.append((padding, nbytes, values))
        while len(self._queue) > WINDOW:
            self._write_next()
        proto = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                 dims=shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self._written[name] = proto
        return proto

    def _write_next(self) -> None:
        padding, nbytes, conversion = self._queue.popleft()
        data = conversion.result().reshape(-1).view(np.uint8).data
        assert data.nbytes == nbytes
        for chunk in (bytes(padding), data):
            self._file.write(chunk)
            self._digest.update(chunk)

    def record(self) -> dict:
        """The file's manifest record ({"bytes", "sha256"}), once it is closed."""
        return {"bytes": self.size, "sha256": self._digest.hexdigest()}

    def close(self) -> None:
        try:
            while self._queue:
                self._write_next()
        finally:
            self._pool.shutdown(cancel_futures=True)
            self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None):
        self.close()
