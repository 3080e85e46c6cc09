"""The baselines `kvexport bench` compares against: Hugging Face transformers and Optimum's ORTModelForCausalLM.

Both take the Hugging Face checkpoint (no strategy: neither can share a cache across layers), and both are
driven by the same manual decode loop, each model with its own cache objects, so only the model differs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kvexport.strategies.contract import KvexportError

BASELINES = ("hf", "optimum")
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


def load_hf(model_dir: Path, device: torch.device, dtype: torch.dtype):
    """Hugging Face transformers with eager attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").to(device, dtype).eval()


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
                   optimum_level: str = "O2") -> Iterator[object]:
    """The baseline model, callable as model(input_ids=, attention_mask=, past_key_values=, use_cache=)."""
    if backend == "hf":
        yield load_hf(model_dir, device, dtype)
        return
    from optimum.onnxruntime import ORTModelForCausalLM

    # Optimum's export lives only as long as its session: it is the baseline's artifact, not ours.
    with tempfile.TemporaryDirectory(prefix="kvexport-optimum-") as workdir:
        optimized = export_optimum(model_dir, Path(workdir), device, dtype, optimum_level)
        cuda = device.type == "cuda"
        yield ORTModelForCausalLM.from_pretrained(
            optimized, file_name="model_optimized.onnx", use_io_binding=cuda,
            provider="CUDAExecutionProvider" if cuda else "CPUExecutionProvider")
