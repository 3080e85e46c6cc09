"""Correctness on the GPU (docs/results.md): greedy tokens CPU vs CUDA vs CUDA static cache with CUDA graphs
for the same float32 export (prompts of different lengths, so the static graph's rows differ in length), the
float16 static graph's greedy tokens against those, and float16 against float32 logits on CUDA.

    python samples/gpu_checks.py --output gpu-checks [--model tiny-llama --share every:2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnxruntime as ort
import torch

from kvexport.exporter import export
from kvexport.runtime import ExportedModel, Generator, OrtDecoder, SamplingConfig
from kvexport.runtime.compare import compare_decoders

PROMPTS = ["In Python, a list", "The", "Exceptions are raised when", "import os\n"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-neox")
    parser.add_argument("--share", default="samples/strategy.json")
    parser.add_argument("--output", type=Path, default=Path("gpu-checks"))
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name(), "onnxruntime": ort.__version__,
              "providers": ort.get_available_providers()}
    fp32 = export(args.model, args.share, args.output / "fp32", static=True).directory
    fp16 = export(args.model, args.share, args.output / "fp16", dtype="float16", static=True).directory
    config = SamplingConfig(max_new_tokens=48)
    runs = {
        "cpu": Generator(fp32, provider="cpu"),
        "cuda": Generator(fp32, provider="cuda"),
        "cuda-static-graph": Generator(fp32, provider="cuda", backend="ort-static", max_batch=4, cuda_graph=True,
                                       max_length=128),
    }
    tokens = {name: generator.generate(PROMPTS, config).token_ids for name, generator in runs.items()}
    report["greedy_tokens_equal"] = {name: tokens[name] == tokens["cpu"] for name in tokens}
    report["sample_text_cuda_static_graph"] = runs["cuda-static-graph"].generate(PROMPTS[:1], config).texts[0]
    fp16_static = Generator(fp16, provider="cuda", backend="ort-static", max_batch=4, cuda_graph=True, max_length=128)
    pairs = [(a, b) for ours, ref in zip(fp16_static.generate(PROMPTS, config).token_ids, tokens["cpu"])
             for a, b in zip(ours, ref)]
    report["fp16_static_graph_greedy_agreement_with_fp32_cpu"] = sum(a == b for a, b in pairs) / len(pairs)
    comparison = compare_decoders(OrtDecoder(ExportedModel.load(fp32), "cuda"),
                                  OrtDecoder(ExportedModel.load(fp16), "cuda"), batch=4, prompt=16, decode_steps=16)
    report["fp16_vs_fp32_cuda"] = {"max_abs": comparison.max_abs, "greedy_agreement": comparison.greedy_agreement,
                                   "summary": comparison.summary(("fp32", "fp16"))}
    print(json.dumps(report, indent=2))
    (args.output / "gpu_checks.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
