"""Check an exported graph against the float64 PyTorch reference of the same strategy.

A batch of two left-padded prompts is prefilled from an empty past, then decoded for a few steps with the
presents fed back as pasts; logits are compared at every real (unpadded) position. With the `none`
strategy the reference itself is also checked against the Hugging Face model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from kvexport.strategies import KvexportError, Strategy
from kvexport.strategies import contract as c

from .models import DecoderDescription
from .onnx_graph import NUMPY_TYPES, cache_layout
from .reference import ReferenceDecoder

# Max |onnx - reference| over max(1, max |reference|): float32 arithmetic lands near 1e-6 here, float16 near 1e-3.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
HF_TOLERANCE = 1e-4  # the float64 reference against the float32 Hugging Face model


class ValidationError(KvexportError):
    pass


@dataclass
class ValidationReport:
    dtype: str
    tolerance: float
    steps: list[dict] = field(default_factory=list)  # per step: kind, max_abs_diff, relative
    hf_relative: float | None = None
    seconds: float | None = None  # wall time of the whole validation

    @property
    def worst(self) -> float:
        return max(step["relative"] for step in self.steps)

    @property
    def passed(self) -> bool:
        hf_ok = self.hf_relative is None or self.hf_relative <= HF_TOLERANCE
        return self.worst <= self.tolerance and hf_ok

    def summary(self) -> str:
        text = (f"validation ({self.dtype}): max relative logit error {self.worst:.2e} over {len(self.steps)} steps "
                f"(tolerance {self.tolerance:.0e})")
        if self.hf_relative is not None:
            text += f"; reference vs Hugging Face {self.hf_relative:.2e} (tolerance {HF_TOLERANCE:.0e})"
        if self.seconds is not None:
            text += f"; {self.seconds:.1f} s"
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "worst": self.worst, "passed": self.passed}


def _relative(actual: np.ndarray, expected: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(actual - expected)[valid].max())
    return diff, diff / max(1.0, float(np.abs(expected[valid]).max()))


def validate_export(
    onnx_path: Path,
    description: DecoderDescription,
    strategy: Strategy,
    dtype: str,
    hf_model: torch.nn.Module | None = None,
    decode_steps: int = 3,
    seed: int = 0,
) -> ValidationReport:
    rng = np.random.default_rng(seed)
    lengths = [min(9, description.max_positions - decode_steps), 5]
    batch, seq = len(lengths), max(lengths)
    input_ids = rng.integers(0, description.vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for row, length in enumerate(lengths):
        mask[row, seq - length:] = 1
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = ReferenceDecoder(description, strategy, torch.float64)
    layout = cache_layout(description, strategy, dtype)
    past = {name: np.zeros(layout.buffer_shape(batch, 0), dtype=NUMPY_TYPES[dtype]) for name, _ in layout.names()}
    ref_past = None
    report = ValidationReport(dtype, TOLERANCE[dtype])
    step_ids, step_mask = input_ids, mask
    for step in range(decode_steps + 1):
        positions = c.positions_from_mask(step_mask)[:, -step_ids.shape[1]:]
        feeds = {c.INPUT_IDS: step_ids, c.ATTENTION_MASK: step_mask, c.POSITION_IDS: positions, **past}
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        ref = reference.forward(*(torch.from_numpy(a) for a in (step_ids, step_mask, positions)), past=ref_past)
        expected = ref.logits.numpy()
        valid = step_mask[:, -step_ids.shape[1]:] == 1
        diff, relative = _relative(outputs[c.LOGITS], expected, valid)
        report.steps.append({"kind": "prefill" if step == 0 else "decode", "max_abs_diff": diff, "relative": relative})
        if step == 0 and hf_model is not None:
            with torch.no_grad():
                hf_logits = hf_model(input_ids=torch.from_numpy(step_ids), attention_mask=torch.from_numpy(step_mask),
                                     position_ids=torch.from_numpy(positions)).logits.double().numpy()
            report.hf_relative = _relative(hf_logits, expected, valid)[1]
        # Feed the reference's greedy choice to both, so that both decode the same sequence.
        step_ids = expected[:, -1].argmax(-1)[:, None].astype(np.int64)
        step_mask = np.concatenate([step_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        past = {past_name: outputs[present] for past_name, present in layout.names()}
        ref_past = ref.present
    return report


def validate_static(
    static_path: Path,
    description: DecoderDescription,
    strategy: Strategy,
    dtype: str,
    decode_steps: int = 3,
    seed: int = 1,
) -> ValidationReport:
    """The static decode graph over preallocated buffers, filled from the reference's prefill, against the
    reference's decode steps. Rows have different lengths and the buffers are longer than needed, with noise in
    the unwritten slots, as reused buffers would have: the graph must read only each row's own slots. Every
    shared layer's write into its owner's buffer must equal the owner's own."""
    rng = np.random.default_rng(seed)
    max_length = min(16, description.max_positions)
    lengths = [min(7, max_length - decode_steps), 4]
    batch, seq = len(lengths), max(lengths)
    ids = rng.integers(0, description.vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.zeros((batch, seq), dtype=np.int64)
    for row, length in enumerate(lengths):
        mask[row, seq - length:] = 1
    reference = ReferenceDecoder(description, strategy, torch.float64)
    ref = reference.forward(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(c.positions_from_mask(mask)))
    layout = cache_layout(description, strategy, dtype)
    buffers = {}
    for owner in strategy.owners:
        for kind, tensor in zip(c.KV_KINDS, ref.present[owner]):
            buffers[owner, kind] = rng.normal(size=layout.buffer_shape(batch, max_length)).astype(NUMPY_TYPES[dtype])
            for row, length in enumerate(lengths):  # compact rows: the left padding is dropped
                buffers[owner, kind][row, :, :length] = tensor[row, :, seq - length:].numpy()
    session = ort.InferenceSession(str(static_path), providers=["CPUExecutionProvider"])
    report = ValidationReport(dtype, TOLERANCE[dtype])
    for _ in range(decode_steps):
        token = ref.logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        positions = c.positions_from_mask(mask)[:, -1:]
        ref = reference.forward(token, torch.from_numpy(mask), torch.from_numpy(positions), past=ref.present)
        feeds = {c.INPUT_IDS: token.numpy(), c.SEQLENS_K: positions[:, 0].astype(np.int32),
                 c.TOTAL_SEQUENCE_LENGTH: np.array([max_length], dtype=np.int32),
                 **{c.past_name(o, k): buffer for (o, k), buffer in buffers.items()}}
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        diff, relative = _relative(outputs[c.LOGITS], ref.logits.numpy(), np.ones((batch, 1), dtype=bool))
        report.steps.append({"kind": "static decode", "max_abs_diff": diff, "relative": relative})
        for layer, owner in enumerate(strategy.kv_source):
            for kind in c.KV_KINDS:
                if not np.array_equal(outputs[c.present_name(layer, kind)], outputs[c.present_name(owner, kind)]):
                    raise ValidationError(f"the static graph's layer {layer} would write other {kind}s into layer "
                                          f"{owner}'s cache than layer {owner} does: report this with the model")
        buffers = {(o, k): outputs[c.present_name(o, k)] for (o, k) in buffers}
    return report
