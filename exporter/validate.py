"""Check exported graphs against the float64 PyTorch reference of the same strategy.

One case serves every graph: two left-padded prompts and a few tokens decoded after them. The reference runs
once over the whole sequences (causal attention makes that equal to prefill then decode), layer by layer, on the
GPU when there is one, so validation holds one layer's weights in float64 at a time. The dynamic graph prefills
the prompts from an empty past and decodes the tokens with its presents fed back as pasts; the static graph
prefills each row in two chunks into preallocated buffers and decodes both rows together. Logits are compared at
every real (unpadded) position. With the `none` strategy the reference itself is also checked against the Hugging
Face model, where its float32 weights fit in HF_CHECK_BYTES.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from kvexport.runtime.kv_cache import NUMPY_CACHE_TYPES, TORCH_DTYPES, host_elements
from kvexport.runtime.ort_session import cache_value, quiet_options, resolve_provider, run_named
from kvexport.strategies import KvexportError, Strategy
from kvexport.strategies import contract as c

from .cache_codes import QuantizedCache
from .models import DecoderDescription
from .onnx_graph import cache_layout
from .reference import ReferenceDecoder

# Max |onnx - reference| over max(1, max |reference|): float32 arithmetic lands near 1e-6 here, float16 near 1e-3.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
# With a quantized cache, a key or value within rounding error of a step boundary can land one code apart in the
# graph (float32 products) and the reference (float64): a difference of the quantization, not of the graph. A
# float8 code's step is up to 1/16 of its value, an int8 code's 1/127 of its channel's largest.
QUANTIZED_CACHE_TOLERANCE = {"int8": 1e-3, "float8_e4m3fn": 1e-2}

HF_TOLERANCE = 1e-4  # the float64 reference against the float32 Hugging Face model
HF_CHECK_BYTES = 1 << 30  # the check loads the Hugging Face model in float32: only up to this size


def tolerance(dtype: str, kv_quant: QuantizedCache | None) -> float:
    """The relative logit error a graph in `dtype` may show, with or without a quantized cache."""
    return TOLERANCE[dtype] if kv_quant is None else max(TOLERANCE[dtype], QUANTIZED_CACHE_TOLERANCE[kv_quant.element])


class ValidationError(KvexportError):
    pass


@dataclass
class ValidationReport:
    dtype: str
    tolerance: float
    steps: list[dict] = field(default_factory=list)  # per step: kind, provider, max_abs_diff, relative
    hf_relative: float | None = None
    hf_skipped: str | None = None  # why the Hugging Face check did not run, where it could have
    quantization_relative: float | None = None  # quantized weights or cache: the reference with them vs without
    seconds: float | None = None  # wall time of the whole validation
    device: str = "cpu"  # where the reference ran
    reference_seconds: float | None = None  # of which the reference's

    @property
    def worst(self) -> float:
        return max(step["relative"] for step in self.steps)

    @property
    def passed(self) -> bool:
        hf_ok = self.hf_relative is None or self.hf_relative <= HF_TOLERANCE
        return self.worst <= self.tolerance and hf_ok

    def summary(self) -> str:
        worst = max(self.steps, key=lambda step: step["relative"])  # which graph, step and provider: where to look
        text = (f"validation ({self.dtype}): max relative logit error {self.worst:.2e} (a {worst['kind']} step on "
                f"{worst['provider']}) over {len(self.steps)} steps (tolerance {self.tolerance:.0e})")
        if self.hf_relative is not None:
            text += f"; reference vs Hugging Face {self.hf_relative:.2e} (tolerance {HF_TOLERANCE:.0e})"
        if self.hf_skipped:
            text += f"; reference vs Hugging Face skipped ({self.hf_skipped})"
        if self.quantization_relative is not None:
            text += f"; quantizing moves the logits by {self.quantization_relative:.2e} (relative)"
        if self.seconds is not None:
            text += f"; {self.seconds:.1f} s (reference {self.reference_seconds or 0:.1f} s on {self.device})"
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "worst": self.worst, "passed": self.passed}


def _relative(actual: np.ndarray, expected: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    diff = float(np.abs(actual - expected)[valid].max())
    return diff, diff / max(1.0, float(np.abs(expected[valid]).max()))


@dataclass
class ValidationCase:
    """Left-padded prompts followed by decoded tokens, and the reference's logits for all of them."""

    ids: np.ndarray  # [batch, prompt + steps] int64
    mask: np.ndarray  # [batch, prompt + steps], 0 on the left padding
    lengths: list[int]  # each row's prompt tokens
    prompt: int  # padded prompt length
    logits: np.ndarray  # [batch, prompt + steps, vocab] float64
    device: str
    seconds: float

    @property
    def positions(self) -> np.ndarray:
        return c.positions_from_mask(self.mask)


def reference_case(description: DecoderDescription, strategy: Strategy, decode_steps: int = 3,
                   seed: int = 0, kv_quant: QuantizedCache | None = None) -> ValidationCase:
    rng = np.random.default_rng(seed)
    lengths = [min(9, description.max_positions - decode_steps), 5]
    batch, prompt = len(lengths), max(lengths)
    ids = rng.integers(0, description.vocab_size, size=(batch, prompt + decode_steps), dtype=np.int64)
    mask = np.ones_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :prompt - length] = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    reference = ReferenceDecoder(description, strategy, torch.float64, device, kv_quant)
    out = reference.forward(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(c.positions_from_mask(mask)))
    return ValidationCase(ids, mask, lengths, prompt, out.logits.cpu().numpy(), device,
                          round(time.perf_counter() - started, 2))


def quantization_error(case: ValidationCase, unquantized: DecoderDescription, strategy: Strategy) -> float:
    """The relative logit change that quantizing the weights or the cache makes: the float64 reference without
    either, against the case's (with them), over the case's positions."""
    reference = ReferenceDecoder(unquantized, strategy, torch.float64, case.device)
    logits = reference.forward(torch.from_numpy(case.ids), torch.from_numpy(case.mask),
                               torch.from_numpy(case.positions)).logits.cpu().numpy()
    return _relative(case.logits, logits, case.mask == 1)[1]


def validation_provider(dtype: str, static: bool, quantized_weights: bool, cache: str | None = None) -> str:
    """Where validation runs a graph: CUDA where it can run the graph (the weights then leave host
    memory), else the CPU. Quantized weights stay on the CPU: CUDA's MatMulNBits computes a few rows at a time (every
    decode step) in float16, products summed in float16 (a 7B's logits 7e-2 from the reference against 7e-3 on the
    CPU, whose kernel sums in float32), which the tolerance could not tell from a wrong graph. A float8 cache's
    static graph runs on CUDA only (ONNX Runtime's CPU GroupQueryAttention has no float8 kernel), whatever the
    weights; `cache` is the cache's element type."""
    if static and cache in c.CUDA_ONLY_STATIC_CACHES:
        return resolve_provider("auto", dtype, static)
    return "cpu" if quantized_weights else resolve_provider("auto", dtype, static)


def session_for(path: Path, dtype: str, static: bool, quantized_weights: bool,
                cache: str | None = None) -> ort.InferenceSession:
    """A session on validation_provider's choice.

    On the CPU a float16 graph runs its MatMuls through Cast nodes, which full optimization would fold into a
    float32 copy of every weight (twice the model in host memory), and which the default order runs ahead of
    their MatMuls; basic optimization, priority order and no memory arena cast one weight at a time, just before
    it is used. The kernels are the same: the graph's contrib ops are explicit."""
    options = quiet_options()
    if validation_provider(dtype, static, quantized_weights, cache) == "cuda":
        return ort.InferenceSession(str(path), options, providers=[("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                                   "CPUExecutionProvider"])
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.enable_cpu_mem_arena = False
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def validate_export(onnx_path: Path, case: ValidationCase, description: DecoderDescription, strategy: Strategy,
                    dtype: str, hf_model: torch.nn.Module | None = None,
                    kv_quant: QuantizedCache | None = None) -> ValidationReport:
    layout = cache_layout(description, strategy, dtype, kv_quant)
    session = session_for(onnx_path, dtype, False, description.weight_format is not None, layout.dtype)
    batch, prompt = case.ids.shape[0], case.prompt
    past = {name: np.zeros(layout.buffer_shape(batch, 0), dtype=NUMPY_CACHE_TYPES[layout.dtype])
            for name, _ in layout.names()}
    report = ValidationReport(dtype, tolerance(dtype, kv_quant), device=case.device, reference_seconds=case.seconds)
    positions = case.positions
    spans = [(0, prompt)] + [(t, t + 1) for t in range(prompt, case.ids.shape[1])]  # the prefill, then decode steps
    for begin, end in spans:
        feeds = {c.INPUT_IDS: case.ids[:, begin:end], c.ATTENTION_MASK: case.mask[:, :end],
                 c.POSITION_IDS: positions[:, begin:end], c.LOGITS_TO_KEEP: np.array([0 if begin == 0 else 1]),
                 **{name: cache_value(array, layout.dtype) for name, array in past.items()}}
        outputs = run_named(session, feeds)
        diff, relative = _relative(outputs[c.LOGITS], case.logits[:, begin:end], case.mask[:, begin:end] == 1)
        report.steps.append({"kind": "dynamic prefill" if begin == 0 else "dynamic decode",
                             "provider": session_device(session), "max_abs_diff": diff, "relative": relative})
        past = {past_name: outputs[present] for past_name, present in layout.names()}
    if hf_model is not None:
        with torch.no_grad():
            hf_logits = hf_model(input_ids=torch.from_numpy(case.ids), attention_mask=torch.from_numpy(case.mask),
                                 position_ids=torch.from_numpy(positions)).logits.double().numpy()
        report.hf_relative = _relative(hf_logits, case.logits, case.mask == 1)[1]
    return report


def session_device(session: ort.InferenceSession) -> str:
    """Where a validation session runs its graph: cuda or cpu."""
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


def run_into(session: ort.InferenceSession, feeds: dict[str, np.ndarray | ort.OrtValue],
             outputs: dict[str, ort.OrtValue]) -> dict[str, np.ndarray]:
    """One run of the static graph with the named outputs written into the given OrtValues (on the session's device;
    an input given as an OrtValue is bound as it is, so an output can update it in place); the logits and those
    outputs back as arrays (copies: on the CPU an OrtValue's numpy() is a view of memory that goes with it)."""
    binding = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name, value in outputs.items():
        binding.bind_ortvalue_output(name, value)
    binding.bind_output(c.LOGITS, session_device(session))
    session.run_with_iobinding(binding)
    return {c.LOGITS: np.array(binding.get_outputs()[-1].numpy()),
            **{name: np.array(value.numpy()) for name, value in outputs.items()}}


def run_over_copies(session: ort.InferenceSession, feeds: dict[str, np.ndarray | ort.OrtValue],
                    presents: dict[str, np.ndarray], cache: str) -> dict[str, np.ndarray]:
    """One run of the static graph with each present output bound to its own copy of the past it updates (on the
    session's device), which holds what the runtime's one in-place buffer holds before the step. GroupQueryAttention
    with a quantized cache writes only the new slots into present on CUDA, as in place, and never copies the past there;
    one copy per layer keeps a shared layer's writes apart from its owner's, to be compared. presents: each present
    output's name and the past it updates (host copies, NUMPY_CACHE_TYPES), cache: their element type."""
    device = session_device(session)
    return run_into(session, feeds, {name: cache_value(past, cache, device) for name, past in presents.items()})


def validate_static(static_path: Path, case: ValidationCase, description: DecoderDescription, strategy: Strategy,
                    dtype: str, seed: int = 1, kv_quant: QuantizedCache | None = None) -> ValidationReport:
    """The static graph over buffers longer than needed, with noise in the unwritten slots as reused buffers have
    (it must read only each row's own slots): each row's prompt prefilled alone in two chunks, then the decoded
    tokens for both rows at once. Every shared layer's write into its owner's buffer must equal the owner's own
    in the slots each row has written."""
    rng = np.random.default_rng(seed)
    batch, prompt = case.ids.shape[0], case.prompt
    max_length = min(16, description.max_positions)
    layout = cache_layout(description, strategy, dtype, kv_quant)
    shape = layout.buffer_shape(batch, max_length)

    def noise() -> np.ndarray:  # codes of the cache's type, or values of the export's
        if layout.dtype == "int8":
            return rng.integers(-128, 128, size=shape).astype(np.int8)
        return host_elements(torch.from_numpy(rng.normal(size=shape)).to(TORCH_DTYPES[layout.dtype]))

    buffers = {name: noise() for name, _ in layout.names()}
    session = session_for(static_path, dtype, True, description.weight_format is not None, layout.dtype)
    report = ValidationReport(dtype, tolerance(dtype, kv_quant), device=case.device)
    device = session_device(session)

    def step(rows: slice, ids: np.ndarray, seqlens: np.ndarray, expected: np.ndarray, label: str) -> None:
        feeds = {c.INPUT_IDS: ids, c.SEQLENS_K: seqlens.astype(np.int32),
                 c.TOTAL_SEQUENCE_LENGTH: np.array([max_length], dtype=np.int32),
                 c.LOGITS_INDEX: np.array(c.logits_index(seqlens, ids.shape[1]), dtype=np.int32),
                 **{name: cache_value(buffer[rows], layout.dtype, device) for name, buffer in buffers.items()}}
        outputs = run_over_copies(session, feeds, {present: buffers[past][rows]
                                                   for present, past in c.static_presents(strategy.kv_source)},
                                  layout.dtype)
        diff, relative = _relative(outputs[c.LOGITS][:, 0], expected, np.ones(expected.shape, dtype=bool))
        report.steps.append({"kind": label, "provider": device, "max_abs_diff": diff, "relative": relative})
        written = seqlens + 1  # each row's slots so far: a kernel need not carry the others into a new present
        for layer, owner in enumerate(strategy.kv_source):
            for kind in c.KV_KINDS:
                ours, theirs = outputs[c.present_name(layer, kind)], outputs[c.present_name(owner, kind)]
                if any(not np.array_equal(ours[r, :, :n], theirs[r, :, :n]) for r, n in enumerate(written)):
                    raise ValidationError(f"the static graph's layer {layer} would write other {kind}s into layer "
                                          f"{owner}'s cache than layer {owner} does: report this with the model")
        for past_name, present in layout.names():
            buffers[past_name][rows] = outputs[present]

    for row, length in enumerate(case.lengths):  # compact rows: the left padding is not fed
        tokens = case.ids[row, prompt - length:prompt]
        split = max(1, length // 2)
        for begin, end in ((0, split), (split, length)):
            if begin < end:
                step(slice(row, row + 1), tokens[None, begin:end], np.array([end - 1]),
                     case.logits[row:row + 1, prompt - length + end - 1], "static prefill")
    lengths = np.array(case.lengths)
    for t in range(case.ids.shape[1] - prompt):
        step(slice(None), case.ids[:, prompt + t:prompt + t + 1], lengths + t, case.logits[:, prompt + t],
             "static decode")
    return report
