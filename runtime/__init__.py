"""Serve an export: owner-only KV cache, ONNX Runtime (CPU, or CUDA with I/O binding), sampling, streaming."""

from .exported import ExportedModel
from .generator import GenerationResult, GenerationStats, Generator, StreamEvent
from .kv_cache import KVCache
from .ort_session import OrtDecoder
from .sampling import SamplingConfig, choose_tokens

__all__ = [
    "ExportedModel", "GenerationResult", "GenerationStats", "Generator", "KVCache", "OrtDecoder",
    "SamplingConfig", "StreamEvent", "choose_tokens",
]
