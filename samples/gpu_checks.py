"""Correctness on the GPU (docs/results.md): greedy tokens of a float32 export on the CPU and CUDA; of a float16
export's dynamic graph and static graph with CUDA graphs on CUDA (prompts of different lengths, so the static
graph's rows differ in length), and their agreement with float32; float16 against float32 logits on CUDA; the
serving engine (in its own process, CUDA graphs for decode steps and prefill shapes) against the static graph's
Generator, every request generating all its tokens, and with requests that free their rows at different steps.

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
from kvexport.runtime.engine_process import EngineProcess

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
    # The static graph runs on CUDA in float16 only (GroupQueryAttention has no float32 CUDA kernel).
    runs = {
        "cpu-fp32": Generator(fp32, provider="cpu"),
        "cuda-fp32": Generator(fp32, provider="cuda"),
        "cuda-fp16": Generator(fp16, provider="cuda"),
        "cuda-fp16-static-graph": Generator(fp16, provider="cuda", backend="ort-static", max_batch=4, cuda_graph=True,
                                            max_length=128),
    }
    tokens = {name: generator.generate(PROMPTS, config).token_ids for name, generator in runs.items()}

    def agreement(first: list[list[int]], second: list[list[int]]) -> float:
        """The share of positions where two runs' greedy tokens are equal."""
        pairs = [(a, b) for x, y in zip(first, second) for a, b in zip(x, y)]
        return sum(a == b for a, b in pairs) / len(pairs)

    report["greedy_tokens_equal_cuda_fp32_vs_cpu_fp32"] = tokens["cuda-fp32"] == tokens["cpu-fp32"]
    report["greedy_tokens_equal_static_graph_vs_dynamic_fp16_cuda"] = (
        tokens["cuda-fp16-static-graph"] == tokens["cuda-fp16"])
    report["greedy_agreement_static_graph_fp16_vs_cpu_fp32"] = agreement(tokens["cuda-fp16-static-graph"],
                                                                          tokens["cpu-fp32"])
    full_length = SamplingConfig(max_new_tokens=48, stop_token_ids=[])  # rows never leave the batch: same shapes
    alone = runs["cuda-fp16-static-graph"].generate(PROMPTS, full_length).token_ids

    def serve(requests: list[tuple[str, int]]) -> tuple[list[list[int]], int]:
        """The tokens of each (prompt, new tokens) request, submitted together to an engine of 4 slots, and the
        requests the engine moved to lower rows."""
        engine = EngineProcess(fp16, provider="cuda", cuda_graph=True, max_slots=4, max_length=128)
        handles = [engine.submit(prompt, SamplingConfig(max_new_tokens=tokens, stop_token_ids=[]))
                   for prompt, tokens in requests]
        for handle in handles:
            list(handle)
        moved = engine.metrics()["rows_moved"]
        engine.close()
        return [handle.tokens for handle in handles], moved

    # The engine admits requests as they arrive, so its batches' shapes differ from the Generator's: float16
    # numerics may differ, as between any two batch shapes; agreement is the measure, with the first difference.
    served, _ = serve([(prompt, 48) for prompt in PROMPTS])
    # Each prompt twice with staggered lengths: rows free at different steps, the waiting prompts are prefilled
    # while the other rows decode, and the last requests move to lower rows as the others end.
    staggered, report["engine_rows_moved_staggered"] = serve(list(zip(PROMPTS * 2, [8, 21, 34, 48] * 2)))
    report["greedy_agreement_engine_staggered_vs_static_graph_fp16_cuda"] = agreement(staggered, alone * 2)
    report["greedy_tokens_equal_engine_vs_static_graph_fp16_cuda"] = served == alone
    report["greedy_agreement_engine_vs_static_graph_fp16_cuda"] = agreement(served, alone)
    report["engine_first_difference_per_prompt"] = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                                                    for x, y in zip(served, alone)]
    report["sample_text_static_graph"] = runs["cuda-fp16-static-graph"].generate(PROMPTS[:1], config).texts[0]
    comparison = compare_decoders(OrtDecoder(ExportedModel.load(fp32), "cuda"),
                                  OrtDecoder(ExportedModel.load(fp16), "cuda"), batch=4, prompt=16, decode_steps=16)
    report["fp16_vs_fp32_cuda"] = {"max_abs": comparison.max_abs, "greedy_agreement": comparison.greedy_agreement,
                                   "summary": comparison.summary(("fp32", "fp16"))}
    print(json.dumps(report, indent=2))
    (args.output / "gpu_checks.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
