"""The baselines `kvexport bench` compares against: Hugging Face transformers (eager, and with its static cache
under torch.compile), Optimum's ORTModelForCausalLM, and ONNX Runtime GenAI.

All take the Hugging Face checkpoint (no strategy: none can share a cache across layers). The transformers and
Optimum models are driven by the same manual decode loop in bench.py, each with its own cache objects; GenAI
runs its own generator loop (GenAIDecoder.time).
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from kvexport.strategies.contract import KvexportError

BASELINES = ("hf", "hf-compile", "optimum", "ort-genai")
GENAI_ARCHITECTURES = ("llama", "qwen2", "mistral")  # what GenAI's model builder and kvexport both export
GENAI_INSTALL = "pip install 'kvexport[genai]' (onnxruntime-genai-cuda, with its model builder)"


class PointRefused(KvexportError):
    """A baseline that cannot run a bench point (a batch limit, an architecture it does not build): the bench
    records the point as n/a with this reason."""


def genai_installed() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def require_genai() -> None:
    if not genai_installed():
        raise KvexportError(f"the ort-genai backend needs ONNX Runtime GenAI: {GENAI_INSTALL}")
OPTIMUM_INSTALL = ("install it with pip install 'kvexport[optimum]' (optimum-onnx, which needs transformers < 4.58 "
                   "and onnxruntime-gpu for CUDA)")


def optimum_installed() -> bool:
    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require_optimum() -> None:
    """Fails early, before any export, where the optimum backend cannot run."""
    if not optimum_installed():
        raise KvexportError(f"the optimum backend needs Optimum's ONNX Runtime support: {OPTIMUM_INSTALL}")


def load_hf(model_dir: Path, device: torch.device, dtype: torch.dtype, attention: str = "eager"):
    """Hugging Face transformers with the given attention implementation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention).to(device, dtype).eval()


def cache_argument(model) -> str:
    """The name transformers gives the cache in forward's arguments and outputs: newer 5.x releases renamed
    past_key_values to cache (the old name still works, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class CompiledStaticDecoder:
    """transformers' documented fast decode path: a StaticCache (preallocated, updated in place) and the model's
    forward under torch.compile(mode="reduce-overhead"), which replays each one-token step as a CUDA graph."""

    def __init__(self, model):
        import torch._dynamo

        # One compiled graph per batch x cache length; the default limit (8) would fall back to eager mode.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.model, self.config, self.cache_name = model, model.config, cache_argument(model)
        self.step_forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

    def new_cache(self, length: int):
        from transformers import StaticCache

        return StaticCache(config=self.config, max_cache_len=length)

    def __call__(self, input_ids: torch.Tensor, cache, start: int):
        """Tokens input_ids [batch, seq] at positions start.. into the cache. Prompts run eagerly, one-token steps
        through the compiled graph; no attention mask, so every step has the same shapes (the cache position
        alone masks the unwritten slots)."""
        forward = self.step_forward if input_ids.shape[1] == 1 else self.model.forward
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        return forward(input_ids=input_ids, cache_position=positions, use_cache=True, **{self.cache_name: cache})


class GenAIDecoder:
    """ONNX Runtime GenAI as its users run it: its model builder's export of the same checkpoint (GroupQueryAttention,
    packed QKV, its own static cache), CUDA graphs at batch 1 (where GenAI allows them), and its generator loop.
    A step is timed on the host clock around generate_next_token() + get_next_tokens(), which includes GenAI's
    sampling and the token's copy to the host (more work than kvexport's own points)."""

    def __init__(self, model_dir: Path, workdir: Path, device: torch.device, dtype: torch.dtype,
                 weights: dict | None = None):
        """weights: the kvexport export's quantized weight format ({"bits", "block"}), which GenAI's int4 build
        matches."""
        from transformers import AutoConfig

        architecture = AutoConfig.from_pretrained(model_dir).model_type
        if architecture not in GENAI_ARCHITECTURES:
            raise PointRefused(f"GenAI's model builder has no {architecture} model in kvexport's set "
                               f"({', '.join(GENAI_ARCHITECTURES)})")
        self.cuda = device.type == "cuda"
        precision, extra = "fp16" if dtype == torch.float16 else "fp32", []
        if weights is not None:
            if weights["bits"] != 4:
                raise PointRefused(f"GenAI's model builder quantizes to int4, not int{weights['bits']}")
            precision, extra = "int4", ["--extra_options", f"int4_block_size={weights['block']}"]
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(workdir),
                   "-p", precision, "-e", "cuda" if self.cuda else "cpu", *extra]
        built = subprocess.run(command, capture_output=True, text=True, check=False)
        if built.returncode != 0:
            last = (built.stderr.strip().splitlines() or ["no message"])[-1]
            raise PointRefused(f"GenAI's model builder failed: {last}")
        self.directory = workdir

    def time(self, batch: int, context: int, steps: int, warmup: int) -> tuple[float, list[float]]:
        """(prefill ms, decode step ms) with the cache at `context` tokens after the last step."""
        import onnxruntime_genai as og

        config = og.Config(str(self.directory))
        if self.cuda and batch == 1:
            config.set_provider_option("cuda", "enable_cuda_graph", "1")
        prompt = np.random.default_rng(0).integers(0, 1000, (batch, context - steps - warmup - 1), dtype=np.int32)
        try:
            model = og.Model(config)
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=context, batch_size=batch)
            generator = og.Generator(model, params)
            started = time.perf_counter()
            generator.append_tokens(prompt)
            prefill_ms = (time.perf_counter() - started) * 1e3
            times = []
            for step in range(warmup + steps + 1):  # the first call only samples the prompt's logits
                started = time.perf_counter()
                generator.generate_next_token()
                generator.get_next_tokens()
                if step > warmup:
                    times.append((time.perf_counter() - started) * 1e3)
        except RuntimeError as error:  # GenAI's limits (batch size, lengths) come as RuntimeError
            raise PointRefused(str(error).strip().splitlines()[0]) from None
        return prefill_ms, times


def export_optimum(model_dir: Path, workdir: Path, device: torch.device, dtype: torch.dtype, level: str) -> Path:
    """Optimum's export as its users would make it for this device; returns the directory to load.

    A float32 export, then ORTOptimizer at `level` (O1-O4, Optimum's names for ONNX Runtime's fusion levels),
    with float16 conversion inside the graph for float16 (inputs and outputs stay float32, so its cache is
    float32). That is Optimum's float16 path for GPUs: its exporter's own float16 mode fails on GPT-NeoX (a
    LayerNormalization with mixed float16/float32 inputs).
    """
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    main_export(str(model_dir), output=str(workdir / "exported"), task="text-generation-with-past",
                device=device.type)
    config = AutoOptimizationConfig.with_optimization_level(level, for_gpu=device.type == "cuda")
    config.fp16 = dtype == torch.float16
    ORTOptimizer.from_pretrained(workdir / "exported").optimize(save_dir=workdir / "optimized",
                                                                optimization_config=config)
    return workdir / "optimized"


@contextmanager
def baseline_model(backend: str, model_dir: Path, device: torch.device, dtype: torch.dtype,
                   optimum_level: str = "O2", weights: dict | None = None) -> Iterator[object]:
    """The baseline model: a Hugging Face-style model (hf, optimum), a CompiledStaticDecoder (hf-compile) or a
    GenAIDecoder (ort-genai). weights: the export's quantized format, which only GenAI's int4 build matches."""
    if weights is not None and backend != "ort-genai":
        raise PointRefused(f"{backend} runs float weights and the export's projections are int{weights['bits']}: "
                           "compare with ort-genai's int4 build")
    if backend == "hf":
        yield load_hf(model_dir, device, dtype)
        return
    if backend == "hf-compile":
        yield CompiledStaticDecoder(load_hf(model_dir, device, dtype, attention="sdpa"))
        return
    if backend == "ort-genai":
        with tempfile.TemporaryDirectory(prefix="kvexport-genai-") as workdir:
            yield GenAIDecoder(model_dir, Path(workdir), device, dtype, weights)
        return
    from optimum.onnxruntime import ORTModelForCausalLM

    # Optimum's export lives only as long as its session: it is the baseline's artifact, not ours.
    with tempfile.TemporaryDirectory(prefix="kvexport-optimum-") as workdir:
        optimized = export_optimum(model_dir, Path(workdir), device, dtype, optimum_level)
        cuda = device.type == "cuda"
        yield ORTModelForCausalLM.from_pretrained(
            optimized, file_name="model_optimized.onnx", use_io_binding=cuda,
            provider="CUDAExecutionProvider" if cuda else "CPUExecutionProvider")
