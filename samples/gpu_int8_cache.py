"""Where an int8-cache export parts from the CPU provider on CUDA (docs/results.md). From the same tokens, each graph
on both providers:
- dynamic: a prefill, then decode steps, each step fed the CPU's cache;
- static, fresh presents (past and present different tensors, present allocated by ONNX Runtime);
- static, presents bound to copies of the past (as validation runs it);
- static, one buffer per owner bound as its past and as every present that updates it, prompts as they are;
- static, through the runtime: one buffer too, each prompt run after an empty past (padded to 32 tokens on CUDA);
- static, through the runtime with its prompts run as GroupQueryAttention's first prompts (total_sequence_length
  their width, padded to 32 tokens on CUDA), as it ran them before.
On ONNX Runtime 1.31.1 (H100) the dynamic graph, the copies, the one buffer and the runtime agree with the CPU;
fresh presents do not (its CUDA kernel writes only the new slots into present), nor do first prompts (its CUDA
kernel attends over their K/V unquantized).
Per step the logits' largest relative difference, and per owner and K/V how many written codes differ and by how much.

    python samples/gpu_int8_cache.py EXPORT_DIR [--steps 4]    # an export made with --kv-cache int8
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch

from kvexport.exporter.validate import run_into, run_over_copies, session_device
from kvexport.runtime import ExportedModel, ort_session
from kvexport.runtime.static_cache import StaticCacheDecoder
from kvexport.strategies import contract as c

PROMPT, BATCH = 12, 2
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]}


def compare(label: str, logits: dict[str, np.ndarray], codes: dict[str, dict[str, np.ndarray]],
            written: int) -> None:
    """Print the CPU/CUDA logit difference and, per cache buffer, the share of the first `written` slots' codes
    that differ."""
    cpu, cuda = (logits[name].astype(np.float64) for name in PROVIDERS)
    print(f"{label}: logits relative difference {np.abs(cpu - cuda).max() / np.abs(cpu).max():.2e}")
    for name in codes["cpu"]:
        a, b = (codes[p][name][:, :, :written].astype(np.int32) for p in PROVIDERS)
        if (a != b).any():
            print(f"    {name}: {(a != b).mean():.1%} of codes differ, by up to {np.abs(a - b).max()}")


def dynamic(model: ExportedModel, ids: np.ndarray, steps: int) -> None:
    sessions = {p: ort.InferenceSession(str(model.onnx_path), ort_session.quiet_options(), providers=providers)
                for p, providers in PROVIDERS.items()}
    layout = model.layout
    past = {name: np.zeros(layout.buffer_shape(BATCH, 0), dtype=np.int8) for name, _ in layout.names()}
    for begin, end in [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, PROMPT + steps)]:
        feeds = {c.INPUT_IDS: ids[:, begin:end], c.ATTENTION_MASK: np.ones((BATCH, end), dtype=np.int64),
                 c.POSITION_IDS: np.arange(begin, end)[None].repeat(BATCH, 0), c.LOGITS_TO_KEEP: np.array([1]),
                 **past}
        outputs = {p: ort_session.run_named(session, feeds) for p, session in sessions.items()}
        compare(f"dynamic, tokens {begin}-{end}", {p: o[c.LOGITS][:, -1] for p, o in outputs.items()},
                {p: {present: o[present] for _, present in layout.names()} for p, o in outputs.items()}, end)
        past = {past_name: outputs["cpu"][present] for past_name, present in layout.names()}


def fresh_presents(session: ort.InferenceSession, feeds: dict, presents: dict) -> dict[str, np.ndarray]:
    return ort_session.run_named(session, feeds)


def over_copies(session: ort.InferenceSession, feeds: dict, presents: dict) -> dict[str, np.ndarray]:
    return run_over_copies(session, feeds, presents, "int8")


def one_buffer_binder(kv_source: list[int]) -> Callable[[ort.InferenceSession, dict, dict], dict[str, np.ndarray]]:
    """A run of the static graph with each owner's past and every present that updates it bound to one buffer on the
    session's device, as the runtime binds them."""
    def one_buffer(session: ort.InferenceSession, feeds: dict, presents: dict) -> dict[str, np.ndarray]:
        device = session_device(session)
        pairs = c.static_presents(kv_source)
        shared = {past: ort.OrtValue.ortvalue_from_numpy(np.array(feeds[past]), device, 0) for _, past in pairs}
        return run_into(session, {**feeds, **shared}, {present: shared[past] for present, past in pairs})
    return one_buffer


def static_separate(model: ExportedModel, ids: np.ndarray, steps: int, length: int,
                    run: Callable[[ort.InferenceSession, dict, dict], dict[str, np.ndarray]]) -> None:
    path = model.directory / model.manifest["files"]["static_decode"]
    sessions = {p: ort.InferenceSession(str(path), ort_session.quiet_options(), providers=providers)
                for p, providers in PROVIDERS.items()}
    layout = model.layout
    buffers = {name: np.zeros(layout.buffer_shape(BATCH, length), dtype=np.int8) for name, _ in layout.names()}
    presents = [(f"present.{i}.{kind}", c.present_name(i, kind))
                for i in range(len(model.strategy.kv_source)) for kind in c.KV_KINDS]

    def step(rows: slice, begin: int, end: int) -> None:
        seqlens = np.full(len(range(BATCH)[rows]), end - 1, dtype=np.int32)
        feeds = {c.INPUT_IDS: ids[rows, begin:end], c.SEQLENS_K: seqlens,
                 c.TOTAL_SEQUENCE_LENGTH: np.array([length], dtype=np.int32),
                 c.LOGITS_INDEX: np.array(c.logits_index(seqlens, end - begin), dtype=np.int32),
                 **{name: buffer[rows] for name, buffer in buffers.items()}}
        pasts = {present: buffers[past][rows] for present, past in c.static_presents(model.strategy.kv_source)}
        outputs = {p: run(session, feeds, pasts) for p, session in sessions.items()}
        compare(f"static, {run.__name__.replace('_', ' ')}, rows {rows.start or 0}-{rows.stop or BATCH}, tokens {begin}-{end}",
                {p: o[c.LOGITS][:, 0] for p, o in outputs.items()},
                {p: {label: o[name] for label, name in presents} for p, o in outputs.items()}, end)
        for past_name, present in layout.names():
            buffers[past_name][rows] = outputs["cpu"][present]

    for row in range(BATCH):  # a prompt with past slots runs one row at a time (the CPU kernel's rule)
        step(slice(row, row + 1), 0, PROMPT)
    for t in range(PROMPT, PROMPT + steps):
        step(slice(None), t, t + 1)


def static_in_place(model: ExportedModel, ids: np.ndarray, steps: int, length: int, first_prompts: bool) -> None:
    decoders = {p: StaticCacheDecoder(model, p, max_batch=BATCH, max_length=length) for p in PROVIDERS}
    label = "runtime, first prompts" if first_prompts else "runtime"
    for decoder in decoders.values():
        decoder.prompts_after_past = not first_prompts

    def each(run: Callable[[StaticCacheDecoder], torch.Tensor], label: str, written: int) -> None:
        logits = {p: run(d)[:BATCH, 0].float().cpu().numpy() for p, d in decoders.items()}
        codes = {p: {f"buffer {j}": d.storage[j].cpu().numpy() for j in range(d.storage.shape[0])}
                 for p, d in decoders.items()}
        compare(label, logits, codes, written)

    each(lambda d: d.prefill_rows(list(range(BATCH)), [torch.from_numpy(row[:PROMPT]) for row in ids]),
         f"static, {label}, tokens 0-{PROMPT}", PROMPT)
    for t in range(PROMPT, PROMPT + steps):
        each(lambda d, t=t: d.decode_rows(torch.from_numpy(ids[:, t]), torch.full((BATCH,), t, dtype=torch.int32)),
             f"static, {label}, tokens {t}-{t + 1}", t + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    model = ExportedModel.load(args.export)
    ids = np.random.default_rng(0).integers(0, model.facts.vocab_size, size=(BATCH, PROMPT + args.steps))
    length = 64  # buffer slots: at least the CUDA decoder's 32-token prefill padding
    checks = {"dynamic": lambda: dynamic(model, ids, args.steps),
              "fresh presents": lambda: static_separate(model, ids, args.steps, length, fresh_presents),
              "copies": lambda: static_separate(model, ids, args.steps, length, over_copies),
              "one buffer": lambda: static_separate(model, ids, args.steps, length,
                                                    one_buffer_binder(model.strategy.kv_source)),
              "runtime": lambda: static_in_place(model, ids, args.steps, length, first_prompts=False),
              "first prompts": lambda: static_in_place(model, ids, args.steps, length, first_prompts=True)}
    for name, check in checks.items():
        try:
            check()
        except Exception as error:  # noqa: BLE001 - report and go on to the next graph
            print(f"{name}: {type(error).__name__}: {str(error)[:300]}")


if __name__ == "__main__":
    main()
