"""Where an int8-cache export parts from the CPU provider on CUDA (docs/results.md): its dynamic graph run on both
providers from the same inputs, a prefill and then decode steps, each step fed the CPU's cache; per step the
logits' largest relative difference and, per owner and K/V, how many codes of the present differ and by how much.

    python samples/gpu_int8_cache.py EXPORT_DIR [--steps 4]    # an export made with --kv-cache int8
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort

from kvexport.runtime import ExportedModel
from kvexport.runtime.ort_session import quiet_options, run_named
from kvexport.strategies import contract as c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    model = ExportedModel.load(args.export)
    layout = model.layout
    # the CUDA session as validation opens it, bypassing the runtime's refusal of int8 caches on CUDA
    sessions = {name: ort.InferenceSession(str(model.onnx_path), quiet_options(), providers=providers)
                for name, providers in (("cpu", ["CPUExecutionProvider"]),
                                        ("cuda", [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]))}
    ids = np.random.default_rng(0).integers(0, model.facts.vocab_size, size=(2, 12 + args.steps))
    prompt = 12
    past = {name: np.zeros(layout.buffer_shape(2, 0), dtype=np.int8) for name, _ in layout.names()}
    for begin, end in [(0, prompt)] + [(t, t + 1) for t in range(prompt, prompt + args.steps)]:
        feeds = {c.INPUT_IDS: ids[:, begin:end], c.ATTENTION_MASK: np.ones((2, end), dtype=np.int64),
                 c.POSITION_IDS: np.arange(begin, end)[None].repeat(2, 0), c.LOGITS_TO_KEEP: np.array([0]), **past}
        outputs = {name: run_named(session, feeds) for name, session in sessions.items()}
        logits = [outputs[name][c.LOGITS].astype(np.float64) for name in ("cpu", "cuda")]
        relative = np.abs(logits[0] - logits[1]).max() / np.abs(logits[0]).max()
        print(f"tokens {begin}-{end}: logits relative difference {relative:.2e}")
        for _, present in layout.names():
            cpu, cuda = (outputs[name][present].astype(np.int32) for name in ("cpu", "cuda"))
            differ = cpu != cuda
            if differ.any():
                print(f"    {present}: {differ.mean():.1%} of codes differ, by up to {np.abs(cpu - cuda).max()}")
        past = {past_name: outputs["cpu"][present] for past_name, present in layout.names()}


if __name__ == "__main__":
    main()
