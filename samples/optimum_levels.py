"""Which Optimum configuration is the fair `optimum` bench baseline (docs/results.md): Optimum's float32 export,
and ORTOptimizer O1 / O2 with float16 conversion, each decoded by the bench's own loop (time_baseline), each
variant in its own process (a CUDA fault ends the process).

Needs optimum-onnx (transformers < 4.58), onnxruntime-gpu and a model at /tmp/p160 (samples/make_pythia_160m.py):

    python samples/optimum_levels.py export
    python samples/optimum_levels.py fp32 io; python samples/optimum_levels.py O1 io
    python samples/optimum_levels.py O2 io;   python samples/optimum_levels.py O2 noio
"""

import statistics
import sys
from pathlib import Path

import torch

from kvexport.runtime.bench import time_baseline

WORKDIR = Path("/tmp/optprobe")
MODEL = "/tmp/p160"

if sys.argv[1] == "export":
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    main_export(MODEL, output=str(WORKDIR / "fp32"), task="text-generation-with-past", device="cuda")
    for level in ("O1", "O2"):
        config = AutoOptimizationConfig.with_optimization_level(level, for_gpu=True)
        config.fp16 = True
        ORTOptimizer.from_pretrained(WORKDIR / "fp32").optimize(save_dir=WORKDIR / level, optimization_config=config)
    sys.exit()

from optimum.onnxruntime import ORTModelForCausalLM

name, io_binding = sys.argv[1], sys.argv[2] == "io"
model = ORTModelForCausalLM.from_pretrained(
    WORKDIR / name, file_name="model.onnx" if name == "fp32" else "model_optimized.onnx",
    provider="CUDAExecutionProvider", use_io_binding=io_binding)
for batch, context in ((1, 128), (64, 2048)):
    try:
        _, times = time_baseline(model, batch, context, 16, 4, torch.device("cuda", 0))
        print(f"RESULT {name} io={io_binding} batch {batch} ctx {context}: decode median "
              f"{statistics.median(times):.3f} ms", flush=True)
    except Exception as error:  # noqa: BLE001 (report the fault and stop: the CUDA context is gone)
        print(f"RESULT {name} io={io_binding} batch {batch} ctx {context}: FAILED {str(error)[:150]}", flush=True)
        break
