"""Whether an export fits the memory of the device it would run on, before a session is made for it: a session
that does not fit fails deep inside ONNX Runtime, or takes the machine's memory from everything else."""

from __future__ import annotations

import os

from .exported import ExportedModel

GIB = 2**30
DEVICE_HEADROOM = 1 * GIB  # the CUDA context, ONNX Runtime's workspace, a short generation's cache
# ONNX Runtime on the CPU runs a float16 graph's MatMuls through float32 copies of the weights
CPU_BYTES_PER_STORED_BYTE = {"float16": 2, "float32": 1}


def shortfall(model: ExportedModel, provider: str) -> str | None:
    """Why the export's weights would not fit `provider`'s free memory now (a sentence), or None when they do."""
    weights = model.manifest["weight_bytes"]
    if provider == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        needed = weights + DEVICE_HEADROOM
        where = "the GPU"
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        needed = weights * CPU_BYTES_PER_STORED_BYTE[model.dtype]
        where = "this machine"
    if needed <= free:
        return None
    return f"it needs about {needed / GIB:.1f} GiB and {where} has {free / GIB:.1f} GiB free"
