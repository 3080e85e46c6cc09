"""Rewrite a Hugging Face decoder so shared layers attend over their owner's K/V, and emit ONNX for it."""

from kvexport.models import DEFAULT_MODEL

from .loading import ALIASES, HUB_ALIASES, LoadedModel, load_model, resolve_model
from .models import DecoderDescription, UnsupportedModelError, describe
from .onnx_graph import build_decoder, cache_layout
from .pipeline import ExportResult, export
from .reference import ReferenceDecoder
from .validate import ValidationReport, validate_export

__all__ = [
    "ALIASES", "DEFAULT_MODEL", "HUB_ALIASES", "DecoderDescription", "ExportResult", "LoadedModel", "ReferenceDecoder",
    "UnsupportedModelError", "ValidationReport", "build_decoder", "cache_layout", "describe", "export",
    "load_model", "resolve_model", "validate_export",
]
