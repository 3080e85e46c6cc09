"""Finding TensorRT: the `tensorrt` package (TensorRT 10/11), else `tensorrt_rtx` (same API, RTX GPUs)."""

from __future__ import annotations

import importlib
from types import ModuleType

from kvexport.strategies import KvexportError

MODULES = ("tensorrt", "tensorrt_rtx")


class TensorRTMissingError(KvexportError):
    pass


def import_tensorrt(preferred: tuple[str, ...] = MODULES) -> ModuleType:
    """The first importable TensorRT flavour, or a one-line error naming the extras to install."""
    for name in preferred:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise TensorRTMissingError(
        "TensorRT is not installed: pip install 'kvexport[tensorrt]' (NVIDIA's package index) for data-center "
        "GPUs, or 'kvexport[tensorrt-rtx]' for RTX GPUs"
    )


def logger(trt: ModuleType):
    return trt.Logger(trt.Logger.WARNING)


def version(trt: ModuleType) -> str:
    """TensorRT's version; tensorrt_rtx's bindings carry none, so its distribution's version, else 'unknown'."""
    if getattr(trt, "__version__", None):
        return trt.__version__
    from importlib import metadata

    for distribution in ("tensorrt-rtx-cu13-bindings", "tensorrt-rtx-cu12-bindings", "tensorrt-rtx"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"
