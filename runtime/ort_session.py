"""One decoder step on ONNX Runtime, CPU or CUDA; the cache stays where it is, as OrtValues (I/O binding)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnxruntime as ort

from kvexport.strategies import ContractMismatchError, ExportDirectoryError, KvexportError
from kvexport.strategies import contract as c

from .decoder import Decoder
from .exported import ExportedModel
from .kv_cache import NUMPY_CACHE_TYPES, KVCache, cache_element_type, host_elements


def resolve_provider(provider: str, dtype: str = "float16", static: bool = False) -> str:
    """'auto': CUDA where ONNX Runtime has its CUDA provider, torch sees a GPU and the export runs there (the static
    graph's attention has a float16 CUDA kernel only: a float32 export's static graph stays on the CPU), else the
    CPU."""
    if provider != "auto":
        return provider
    if static and dtype != "float16" or "CUDAExecutionProvider" not in ort.get_available_providers():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_provider(provider: str) -> None:
    """One-line errors for a provider this machine cannot serve (CUDA needs ORT's CUDA provider and a CUDA
    build of torch, whose streams and tensors the runtime shares with ORT)."""
    if provider not in ("cpu", "cuda"):
        raise KvexportError(f"provider '{provider}' is not supported: use cpu or cuda")
    if provider != "cuda":
        return
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise KvexportError("ONNX Runtime has no CUDA provider here: pip install 'kvexport[gpu]' "
                            "(onnxruntime-gpu, replacing onnxruntime) on a machine with an NVIDIA GPU, "
                            "or use --provider cpu")
    import torch

    if not torch.cuda.is_available():
        raise KvexportError("torch sees no CUDA GPU (a CPU build of torch, or no GPU): install a CUDA build of "
                            "torch on a machine with an NVIDIA GPU, or use --provider cpu")


def quiet_options() -> ort.SessionOptions:
    """Session options that log errors only: ONNX Runtime's start-up notes and warnings (placement of Memcpy
    nodes, providers) are not kvexport's output."""
    ort.set_default_logger_severity(3)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return options


def make_session(path, provider: str = "cpu", device_id: int = 0,
                 quantized_cache: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU or on CUDA. On CUDA it runs on torch's current stream, so that work
    queued by torch (cache writes, sampling) and by ORT is ordered without host synchronisation."""
    check_provider(provider)
    options = quiet_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if provider == "cpu":
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    import torch

    cuda_options = {"device_id": str(device_id), **CUDA_PROVIDER_OPTIONS,
                    "user_compute_stream": str(torch.cuda.current_stream(device_id).cuda_stream)}
    with default_environment(cuda_kernel_defaults(quantized_cache)):
        return ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", cuda_options)])


# Kernel choices of ONNX Runtime 1.31's CUDA provider, read when a session's kernels are made (docs/results.md):
# - ORT_ENABLE_XQA=0: float16 GroupQueryAttention decode runs its FlashAttention path, not XQA, which measured
#   slower at every batch and context on the H100 (later ONNX Runtime releases make XQA opt-in for this case).
# - ORT_CUDA_GEMM_AUTO_TUNE=1: each MatMul of at most 64 rows times cuBLAS against ONNX Runtime's small-M kernels
#   (TensorRT-LLM's tinygemm2 on SM 9.0) at its first run and keeps the faster; decode steps at batch 1 took 5-6%
#   less time on the H100, and batch 64 kept cuBLAS. The first runs happen before a CUDA graph is captured.
CUDA_KERNEL_DEFAULTS = {"ORT_ENABLE_XQA": "0", "ORT_CUDA_GEMM_AUTO_TUNE": "1"}


def cuda_kernel_defaults(quantized_cache: bool = False) -> dict[str, str]:
    """CUDA_KERNEL_DEFAULTS, with XQA on for a quantized cache: its only kernel that reads the codes in place (a
    per-tensor scale shared by K and V, 4 to 32 query heads a KV head); otherwise each step dequantizes every
    layer's whole cache first."""
    return CUDA_KERNEL_DEFAULTS | ({"ORT_ENABLE_XQA": "1"} if quantized_cache else {})


# The CUDA provider's options, besides the device and the stream:
# - use_tf32 0: a float32 export runs float32 MatMuls, as on the CPU (ONNX Runtime's TF32 default rounds them to
#   10 mantissa bits, which flipped greedy near-ties on the H100); float16 exports are the fast path.
# - arena_extend_strategy kSameAsRequested: the memory arena grows by what a run asks for, not to its next power of
#   two, which held up to 0.6 GiB more for a 160M model at the same speed.
CUDA_PROVIDER_OPTIONS = {"use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"}


def cuda_session_settings(quantized_cache: bool = False) -> dict[str, str]:
    """What kvexport's CUDA sessions are made with: the kernel choices (the user's environment, else kvexport's
    defaults) and the provider options."""
    defaults = cuda_kernel_defaults(quantized_cache)
    return {name: os.environ.get(name, value) for name, value in defaults.items()} | CUDA_PROVIDER_OPTIONS


@contextmanager
def default_environment(defaults: dict[str, str]) -> Iterator[None]:
    """Environment variables set to `defaults` where the user has not set them, restored afterwards (so other
    sessions in the process, such as a baseline's, keep ONNX Runtime's own defaults)."""
    added = {name: value for name, value in defaults.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            del os.environ[name]


def open_graph(model: ExportedModel, name: str, provider: str = "cpu", device_id: int = 0) -> ort.InferenceSession:
    """A session on one of the export's graphs, whose inputs and outputs must be those of the export's strategy
    (a graph copied in from another export is refused before it runs)."""
    check_provider(provider)
    path = model.directory / name
    try:
        session = make_session(path, provider, device_id, model.layout.quantized)
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own pybind types for an unreadable graph
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportDirectoryError(f"ONNX Runtime cannot load {path} ({first[:300]}): 'kvexport verify "
                                   f"{model.directory}' says whether the export is damaged; re-export it") from None
    expected_inputs, expected_outputs = c.graph_io_names(model.strategy.kv_source, static=name == c.STATIC_MODEL_FILE)
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if set(inputs) != set(expected_inputs) or set(outputs) != set(expected_outputs):
        missing = sorted(set(expected_inputs + expected_outputs) - set(inputs + outputs))
        unexpected = sorted(set(inputs + outputs) - set(expected_inputs + expected_outputs))
        raise ContractMismatchError(f"{path} is not the graph of this export's strategy (missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}): it was copied from another export; re-export")
    return session


def cache_value(array: np.ndarray, dtype: str, device: str = "cpu", device_id: int = 0) -> ort.OrtValue:
    """A copy of cache elements of `dtype` held on the host (NUMPY_CACHE_TYPES) as an OrtValue on `device`."""
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), cache_element_type(dtype), device,
                                                      device_id)
    value.update_inplace(np.ascontiguousarray(array, dtype=NUMPY_CACHE_TYPES[dtype]))
    return value


def run_named(session: ort.InferenceSession, feeds: dict) -> dict[str, np.ndarray]:
    """One run on host arrays: every output, by name."""
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


class OrtDecoder(Decoder):
    def __init__(self, model: ExportedModel, provider: str = "cpu", device_id: int = 0):
        self.model, self.provider, self.device_id = model, provider, device_id
        self.session = open_graph(model, model.manifest["files"]["onnx"], provider, device_id)

    def wrap_past(self, tensor) -> ort.OrtValue:
        return cache_value(host_elements(tensor), self.model.layout.dtype, self.provider, self.device_id)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache: KVCache, logits_to_keep: int = 0) -> np.ndarray:
        inputs = {c.INPUT_IDS: input_ids, c.ATTENTION_MASK: attention_mask, c.POSITION_IDS: position_ids,
                  c.LOGITS_TO_KEEP: np.array([logits_to_keep], dtype=np.int64)}
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for past, value in cache.values.items():
            binding.bind_ortvalue_input(past, value)
        binding.bind_output(c.LOGITS, "cpu")
        presents = [present for _, present in self.model.layout.names()]
        for present in presents:  # ORT allocates them where it runs; they become the next pasts as they are
            binding.bind_output(present, self.provider, self.device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        cache.update(dict(zip(presents, values[1:])), input_ids.shape[1])
        return np.array(values[0].numpy())  # a copy: on the CPU numpy() views memory that goes with the binding
