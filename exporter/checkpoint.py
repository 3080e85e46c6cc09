"""A Hugging Face checkpoint's tensors in their stored dtype, memory-mapped: nothing is read until it is used.

Safetensors files are mapped copy-on-write and each tensor is a view of its bytes, so describing a model costs
no memory and a 7B checkpoint is never held twice. Pages a pass has read stay counted in the process's resident
memory until `release()` returns them (they stay in the page cache); the exporter and the reference call it
after each layer, so they hold about one layer of the checkpoint at a time. PyTorch `.bin` checkpoints are
memory-mapped by torch.load.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import torch

from kvexport.strategies import KvexportError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(KvexportError):
    pass


class Checkpoint:
    """name -> tensor (a view of the mapped file) for every tensor of a model directory's checkpoint."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._maps: list[mmap.mmap] = []
        self.tensors: dict[str, torch.Tensor] = {}
        files = sorted(directory.glob("*.safetensors"))
        if files:
            for file in files:
                self.tensors.update(self._map_safetensors(file))
        else:
            for file in sorted(directory.glob("pytorch_model*.bin")):
                self.tensors.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
        if not self.tensors:
            raise CheckpointError(f"{directory} has no *.safetensors or pytorch_model*.bin weights: pass a Hugging "
                                  "Face model directory with its weights")

    def _map_safetensors(self, file: Path) -> dict[str, torch.Tensor]:
        with file.open("rb") as handle:
            try:
                (header_bytes,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_bytes))
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)  # writable, never written
            except (struct.error, ValueError) as error:
                raise CheckpointError(f"{file} is not a readable safetensors file ({error}): download or copy "
                                      "the model again") from error
        self._maps.append(mapped)
        start = 8 + header_bytes
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"{file}: tensor {name} has dtype {entry['dtype']}, which kvexport does not "
                                      "read: convert the checkpoint to float16, bfloat16 or float32")
            begin, end = entry["data_offsets"]
            count = (end - begin) // dtype.itemsize
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin) if count else \
                torch.empty(0, dtype=dtype)
            tensors[name] = flat.view(entry["shape"])
        return tensors

    def release(self) -> None:
        """Drop the pages read so far from this process's resident memory; they are read again if used again."""
        for mapped in self._maps:
            mapped.madvise(mmap.MADV_DONTNEED)


def write_random_checkpoint(model_class, config, directory: Path, seed: int = 0) -> int:
    """A model directory (config.json, model.safetensors) of `model_class` with random float16 weights (normal,
    std 0.02; norm weights 1), for measuring a public model's shape without its weights. Tensors are drawn and
    written one at a time, so a 13B shape needs no more memory than its largest tensor. Returns the weight bytes.
    """
    with torch.device("meta"):  # names and shapes only
        shapes = {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # as transformers writes it
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    # What save_pretrained would record, and tools that read config.json (GenAI's model builder) rely on.
    config.architectures, config.dtype = [model_class.__name__], torch.float16
    config.save_pretrained(directory)
    with (directory / "model.safetensors").open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            norm = "norm" in name and name.endswith("weight")
            values = torch.ones(shape) if norm else torch.randn(shape, generator=generator) * 0.02
            file.write(values.to(torch.float16).numpy().tobytes())
    return offset
