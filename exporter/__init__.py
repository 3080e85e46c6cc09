"""Rewrite a Hugging Face decoder so shared layers attend over their owner's K/V, and emit ONNX for it.

The names below are imported on first use: `kvexport --help` and `--version` (whose module lives in this package)
must work where ONNX Runtime, which validation needs, is not installed yet.
"""

from importlib import import_module

_NAMES = {
    "DEFAULT_MODEL": "kvexport.models",
    "ALIASES": ".loading", "HUB_ALIASES": ".loading", "LoadedModel": ".loading", "load_model": ".loading",
    "resolve_model": ".loading",
    "DecoderDescription": ".models", "UnsupportedModelError": ".models", "describe": ".models",
    "build_decoder": ".onnx_graph", "cache_layout": ".onnx_graph",
    "ExportResult": ".pipeline", "export": ".pipeline",
    "ReferenceDecoder": ".reference",
    "ValidationReport": ".validate", "validate_export": ".validate",
}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_NAMES[name], __name__), name)
