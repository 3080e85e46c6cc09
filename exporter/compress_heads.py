"""`kvexport compress-heads`: fewer KV heads (multi-head to grouped-query attention) from calibration activations.

Heads are grouped consecutively (query head h reads KV head h // (heads / G), as grouped-query attention does),
and each group's keys and values become one head, fitted to the group's keys and values on calibration text
(arXiv 2406.07056's idea: the KV cache is low-rank). The math works on the architecture-neutral
DecoderDescription, so the result is a description with num_kv_heads = G that the exporter and the reference
take as they are. Every fit is linear, so it applies to the projections' weights and biases alike.

- method "rope-svd" (kvexport's), each part of a head fitted where its error matters:
  - values: the group's values side by side, [tokens, g * head_dim], projected on a head_dim basis; the new V
    projection is the group's V projections times the basis, and each original head's block of it folds into
    that head's output projection. The error is measured through the output projection (what the layer adds).
  - keys, rotary dimensions: rotary rotates each pair (i, i + rotary_dim / 2) by a position-dependent angle, a
    multiplication by a unit complex number per frequency. Per frequency the group's keys form a complex
    [tokens, g] matrix, replaced by a rank-1 fit k_j ~= b_j c: a complex scale commutes with the rotation, so the
    cache still stores rotated keys at absolute positions (sharing layers keep working), and conj(b_j) folds into
    query head j. The error is weighted by each head's query energy at that frequency (what the scores see).
  - keys, other dimensions (GPT-NeoX rotates a quarter of each head): a basis as for values, the error measured
    as the queries' expected score error; its blocks fold into the query projections.
- method "rope-svd-refit": rope-svd, then each layer's output projection refitted by ridge least squares so that
  the layer's attention output on the calibration text matches the original model's, layer by layer, on what the
  layers before it (compressed and refitted) produce: it takes back part of what the fitted keys lose where it
  shows, in the attention's output.
- method "rope-svd-fit" (the default): rope-svd-refit, then each layer's Q, K, V and O weights moved together by
  `fit_steps` Adam steps on the same target, the original layer's attention output on the calibration text. The
  closed-form fits see the keys' error only up to the scores; this one sees it through the softmax. It is a
  layer-by-layer fit to the original's activations, not training: no language-model loss, no pass through the
  whole model, the rest of the model untouched. The new K projection is the model's own (rotary is applied after
  it), so the cache still holds rotated keys at absolute positions.
- with a sharing strategy (--share, the refitting methods): the refits run with the strategy in force, each layer
  against the original layer without sharing, so that a shared layer's queries and output projection are fitted
  to read its owner's K/V (which it does not with training-free sharing); an owner is fitted for its own output.
  The model is then bound to that strategy (strategy.json, recorded in kvexport_compression.json): it exports
  with it only. With the model's own number of KV heads (grouped-query attention too) the heads are kept and
  only the shared layers are fitted: sharing alone, fitted.
- method "rope-svd-plain": the same fits with unweighted errors (plain reconstruction of the K/V), for comparison.
- method "mean": the mean of the group's K and V projections (the initialisation of GQA up-training), queries
  and output projection unchanged: the baseline to beat.

Everything runs in one pass over the layers (compress_heads), holding one layer's activations at a time; the model
runs on `device` (a GPU for rope-svd-fit beyond small models: each Adam step is a forward and backward pass of one
attention block over the calibration tokens), the head fits beside it in float64.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kvexport.strategies import KvexportError, Strategy, make_strategy, no_sharing
from kvexport.strategies.atomic import write_text_atomic

from .models import DecoderDescription, Layer, Linear, state_dict
from .reference import LayerInputs, ReferenceDecoder, compute_device, tensor_float32_on

METHODS = ("rope-svd-fit", "rope-svd-refit", "rope-svd", "rope-svd-plain", "mean")
REFITS = ("rope-svd-fit", "rope-svd-refit")  # the methods that refit layers to the original's attention output
RIDGE = 1e-6  # relative regulariser of the error metrics, so a head that is never read stays invertible
# Of the output refit, relative to the inputs' mean energy, towards the fitted weights: on tiny-llama at 2 KV heads,
# 1.0 kept 46.54% next-token accuracy, 0.1 46.52%, 0.001 45.86% (fits the calibration text too closely).
OUTPUT_RIDGE = 1.0
# rope-svd-fit: Adam's step size per weight, relative to that weight's RMS (1e-3 on tiny-llama), and the default
# number of steps per layer. On tiny-llama at 2 KV heads, 32 calibration windows (held-out next-token accuracy,
# measured): 100 steps 48.21%, 200 48.77%, against 46.54% for rope-svd-refit; 3x the step size for 100 steps
# 47.89%. With too little calibration text more steps overfit it: 128 windows is the command's default.
FIT_STEP = 0.025
FIT_STEPS = 200


def check_kv_heads(description: DecoderDescription, kv_heads: int) -> None:
    heads = description.num_kv_heads
    if not 0 < kv_heads <= heads or heads % kv_heads:
        divisors = [g for g in range(1, heads + 1) if heads % g == 0]
        raise KvexportError(f"--kv-heads {kv_heads} does not divide the model's {heads} KV heads into equal "
                            f"groups: use one of {', '.join(map(str, divisors))}")
    if kv_heads < heads and description.num_kv_heads != description.num_heads:
        raise KvexportError(f"the model already has grouped-query attention: compress-heads merges heads of "
                            f"multi-head attention (as many KV heads as query heads); --kv-heads {heads}, its own, "
                            "keeps them (with --share, to fit the layers for a sharing strategy)")


@dataclasses.dataclass
class Activations:
    """One layer's calibration activations, [tokens, heads, head_dim] in float64 (keys and queries rotated)."""

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor


    @classmethod
    def of_layer(cls, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> Activations:
        """From a layer's [batch, heads, seq, head_dim] tensors, on the device they are on: the fits run there."""
        return cls(*(t.permute(0, 2, 1, 3).flatten(0, 1) for t in (keys, values, queries)))


def complex_pairs(x: torch.Tensor, rotary: int) -> torch.Tensor:
    """The rotary dimensions of [..., head_dim] as rotary / 2 complex numbers (rotate-half pairing)."""
    half = rotary // 2
    return torch.complex(x[..., :half], x[..., half:rotary])


def real_pairs(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.real, z.imag], dim=-1)


def top_right_singular(x: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` leading right singular vectors of x [..., tokens, n] as columns [..., n, count], from the
    eigenvectors of its n x n Gram matrix: tokens >> n here, and in float64 the squared condition number costs
    nothing that matters, where a full SVD of the tall matrix is most of a fit's time."""
    _, vectors = torch.linalg.eigh(x.mH @ x)  # ascending eigenvalues
    return vectors[..., -count:].flip(-1)


@dataclasses.dataclass
class GroupFit:
    """A group's g heads (one part of them, dim wide) as one: new = sum_j x_j encode_j, x_j ~= new decode_j."""

    encode: torch.Tensor  # [g, dim, rank]
    decode: torch.Tensor  # [g, rank, dim]

    @classmethod
    def fitted(cls, x: torch.Tensor, metric: torch.Tensor) -> GroupFit:
        """The rank-dim fit of x [tokens, g, dim] minimising sum_j ||(x_j - fit_j) L_j||^2, metric L [g, dim, dim]
        (invertible): the top right singular vectors of the group's [tokens, g * dim] activations in that metric."""
        g, dim = x.shape[-2:]
        weighted = torch.einsum("ngd,gde->nge", x, metric).flatten(-2)
        basis = top_right_singular(weighted, dim).T.unflatten(-1, (g, dim)).transpose(0, 1)
        return cls(metric @ basis.transpose(-1, -2), basis @ torch.linalg.inv(metric))

    @classmethod
    def mean(cls, g: int, dim: int, device: torch.device) -> GroupFit:
        eye = torch.eye(dim, dtype=torch.float64, device=device).expand(g, dim, dim)
        return cls(eye / g, eye)

    def merge(self, w: torch.Tensor) -> torch.Tensor:
        """[..., g, dim] (activations, weights or biases of the group's heads) -> [..., dim] of the new head."""
        return torch.einsum("...gd,gdr->...r", w, self.encode)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...r,grd->...gd", self.merge(x), self.decode)


@dataclasses.dataclass
class FrequencyFit:
    """The rotary part: per frequency, new = sum_j a_j k_j and k_j ~= b_j new, complex scalars [g, rotary / 2]."""

    a: torch.Tensor
    b: torch.Tensor

    @classmethod
    def fitted(cls, kz: torch.Tensor, weight: torch.Tensor) -> FrequencyFit:
        """Per frequency the rank-1 fit of kz [tokens, g, F] minimising sum_j weight_j |k_j - b_j new|^2."""
        root = weight.sqrt()  # [g, F]
        top = top_right_singular((kz * root).permute(2, 0, 1), 1)[..., 0].T.conj()  # [g, F], unit columns
        return cls(top.conj() * root, top / root)

    @classmethod
    def mean(cls, g: int, frequencies: int, device: torch.device) -> FrequencyFit:
        ones = torch.ones(g, frequencies, dtype=torch.complex128, device=device)
        return cls(ones / g, ones)

    def merge(self, kz: torch.Tensor) -> torch.Tensor:
        return (kz * self.a).sum(-2)

    def reconstruct(self, kz: torch.Tensor) -> torch.Tensor:
        return self.merge(kz).unsqueeze(-2) * self.b


def metric_factor(second_moment: torch.Tensor) -> torch.Tensor:
    """L with L L^T = M + a small ridge, for [..., dim, dim] positive semi-definite M."""
    dim = second_moment.shape[-1]
    scale = second_moment.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1e-30)
    eye = torch.eye(dim, dtype=second_moment.dtype, device=second_moment.device)
    return torch.linalg.cholesky(second_moment + RIDGE * scale * eye)


@dataclasses.dataclass
class HeadFits:
    """How one group's heads become one KV head: its values, its keys' rotary pairs and its other key dims."""

    value: GroupFit
    rotary: FrequencyFit
    rest: GroupFit
    errors: dict[str, float]  # relative reconstruction errors ||fit - actual||^2 / ||actual||^2 of keys, values


def fit_heads(act: Activations, wo: torch.Tensor, members: slice, rot: int, method: str) -> HeadFits:
    """The fits for the heads `members` of one layer; wo [heads, head_dim, hidden] is its output projection."""
    keys, values, queries = (t[:, members] for t in (act.keys, act.values, act.queries))  # [tokens, g, hd]
    g, hd = keys.shape[1:]
    rest = hd - rot
    device = keys.device
    value_fit, rotary_fit = GroupFit.mean(g, hd, device), FrequencyFit.mean(g, rot // 2, device)
    rest_fit = GroupFit.mean(g, rest, device)
    kz = complex_pairs(keys, rot)
    if method != "mean":
        plain, eye = method == "rope-svd-plain", torch.eye(hd, dtype=torch.float64, device=device).expand(g, hd, hd)
        w = wo[members]
        value_fit = GroupFit.fitted(values, eye if plain else metric_factor(w @ w.transpose(1, 2)))
        energy = complex_pairs(queries, rot).abs().pow(2).mean(0)  # [g, F]
        rotary_fit = FrequencyFit.fitted(kz, torch.ones_like(energy) if plain else energy + RIDGE * energy.mean())
        if rest:
            q_rest = queries[..., rot:]
            rest_fit = GroupFit.fitted(keys[..., rot:], eye[:, :rest, :rest] if plain else
                                       metric_factor(torch.einsum("ngd,nge->gde", q_rest, q_rest) / len(q_rest)))
    k_fit = torch.cat([real_pairs(rotary_fit.reconstruct(kz)), rest_fit.reconstruct(keys[..., rot:])], dim=-1)
    v_fit = value_fit.reconstruct(values)
    errors = {kind: relative(actual - fit, actual) for kind, actual, fit in (("key", keys, k_fit), ("value", values, v_fit))}
    return HeadFits(value_fit, rotary_fit, rest_fit, errors)


def relative(error: torch.Tensor, actual: torch.Tensor) -> float:
    return float(error.pow(2).sum() / actual.pow(2).sum())


def compress_layer(layer: Layer, act: Activations, d: DecoderDescription, kv_heads: int,
                   method: str) -> tuple[Layer, dict]:
    heads, hd, rot = d.num_heads, d.head_dim, d.rotary_dim
    g, device = heads // kv_heads, act.keys.device
    wo = layer.o.weight.to(device, torch.float64).view(heads, hd, -1)  # [heads, head_dim, hidden]

    def heads_of(lin: Linear, bias: bool) -> torch.Tensor | None:
        """Weights [in, heads, hd], or the bias as [1, heads, hd], in float64 on the activations' device."""
        t = lin.bias if bias else lin.weight
        return None if t is None else t.to(device, torch.float64).reshape(-1 if not bias else 1, heads, hd)

    new_q = {bias: None if w is None else w.clone() for bias in (False, True) for w in [heads_of(layer.q, bias)]}
    old_k, old_v = ({bias: heads_of(lin, bias) for bias in (False, True)} for lin in (layer.k, layer.v))
    new_k, new_v, new_o = {False: [], True: []}, {False: [], True: []}, wo.clone()
    errors = {"key": 0.0, "value": 0.0}
    for group in range(kv_heads):
        members = slice(group * g, (group + 1) * g)
        fits = fit_heads(act, wo, members, rot, method)
        for bias in (False, True):
            wk, wv, wq = old_k[bias], old_v[bias], new_q[bias]
            if wk is not None:
                new_k[bias].append(torch.cat([real_pairs(fits.rotary.merge(complex_pairs(wk[:, members], rot))),
                                              fits.rest.merge(wk[:, members, rot:])], dim=-1))
            if wv is not None:
                new_v[bias].append(fits.value.merge(wv[:, members]))
            if wq is not None:  # fold each head's key decoding into its queries: scores are unchanged by it
                wq[:, members] = torch.cat([real_pairs(complex_pairs(wq[:, members], rot) * fits.rotary.b.conj()),
                                            torch.einsum("igd,grd->igr", wq[:, members, rot:], fits.rest.decode)],
                                           dim=-1)
        new_o[members] = fits.value.decode @ new_o[members]
        for kind in errors:
            errors[kind] += fits.errors[kind] / kv_heads

    def linear(weight: torch.Tensor, bias: torch.Tensor | None, like: Linear) -> Linear:
        """Stored where and as `like` is."""
        return Linear(weight.reshape(weight.shape[0], -1).to(like.weight.device, like.weight.dtype).contiguous(),
                      None if bias is None else bias.reshape(-1).to(like.bias.device, like.bias.dtype).contiguous())

    def stacked(parts: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.stack(parts, dim=1) if parts else None

    compressed = dataclasses.replace(
        layer, q=linear(new_q[False], new_q[True], layer.q),
        k=linear(stacked(new_k[False]), stacked(new_k[True]), layer.k),
        v=linear(stacked(new_v[False]), stacked(new_v[True]), layer.v),
        o=Linear(new_o.reshape(heads * hd, -1).to(layer.o.weight.device, layer.o.weight.dtype).contiguous(),
                 layer.o.bias))
    return compressed, {"relative_key_error": round(errors["key"], 6), "relative_value_error": round(errors["value"], 6)}


def check_request(description: DecoderDescription, kv_heads: int, method: str, strategy: Strategy) -> None:
    if method not in METHODS:
        raise KvexportError(f"method must be one of {', '.join(METHODS)}")
    check_kv_heads(description, kv_heads)
    if strategy.shared and method not in REFITS:
        raise KvexportError(f"--share fits the layers for a strategy, which --method {method} does not do: use "
                            "--method rope-svd-fit (the default) or rope-svd-refit, or leave --share out")


def compress_heads(description: DecoderDescription, windows: torch.Tensor, kv_heads: int,
                   method: str = "rope-svd", fit_steps: int = FIT_STEPS, show_progress: bool = False,
                   strategy: Strategy | None = None,
                   device: torch.device | str = "cpu") -> tuple[DecoderDescription, list[dict]]:
    """The description with kv_heads KV heads per layer, and each layer's record: the relative reconstruction
    errors (||fit - actual||^2 / ||actual||^2 of its keys and values on the windows) and the seconds of each phase
    (Laps). fit_steps: rope-svd-fit's;
    show_progress: a progress bar over the layers; strategy: the sharing the refits fit the layers for (default
    none); device: where the model and the head fits run.

    One pass, layer by layer: the original model (the teacher) gives each layer's activations, from which its
    heads are fitted, and its attention output, the refits' target; the compressed model (the student) runs
    beside it under the strategy, so each layer is refitted on the inputs that the refitted layers before it
    produce and a shared layer reads the K/V its refitted owner wrote. Only one layer's activations are held.
    The refits: the output projection by ridge least squares (OUTPUT_RIDGE), then, with fit_steps, Q, K, V and O
    by that many Adam steps (fit_attention). With kv_heads the model's own, the heads are kept as they are (no head
    fit) and so are the owners: they are exact, and a fit would move their weights on noise."""
    strategy = strategy or no_sharing(description.num_layers)
    check_request(description, kv_heads, method, strategy)
    refit = method in REFITS
    fit_method = "rope-svd" if refit else method  # the refits start from rope-svd's heads
    steps = fit_steps if method == "rope-svd-fit" else 0
    exact = kv_heads == description.num_kv_heads
    compressed = dataclasses.replace(description, num_kv_heads=kv_heads)
    teacher = ReferenceDecoder(description, no_sharing(description.num_layers), torch.float64, device)
    student = ReferenceDecoder(compressed, strategy, torch.float64, device)
    fitter = ReferenceDecoder(compressed, strategy, torch.float32, device)  # Adam's steps: 2-3x faster than float64
    mask, positions = torch.ones_like(windows), torch.arange(windows.shape[1]).expand_as(windows)
    teacher_in, student_in = (r.prepare(windows, mask, positions) for r in (teacher, student))
    x_teacher, x_student, present, layers, report = teacher_in.x, student_in.x, {}, [], []
    bar = tqdm(description.layers, unit="layer", desc="compress-heads: fitting layers", disable=not show_progress)
    for i, old in enumerate(bar):
        laps = Laps(fitter.device)
        kv, queries = {}, {}
        collect = (None, None) if exact else (kv, queries)  # the heads are kept: nothing to fit them to
        target = teacher.output(old, teacher.attention(i, old, x_teacher, teacher_in, {}, None, *collect))
        x_teacher = teacher.residual(old, x_teacher, target)
        laps.lap("teacher")
        new, errors = (old, {"relative_key_error": 0.0, "relative_value_error": 0.0}) if exact else compress_layer(
            old, Activations.of_layer(*kv[i], queries[i]), description, kv_heads, fit_method)
        laps.lap("head_fits")
        if refit:
            context = student.attention(i, new, x_student, student_in, present)
            if not (exact and strategy.is_owner(i)):
                new = dataclasses.replace(new, o=ridge_fit(context.flatten(0, 1), target.flatten(0, 1), new.o))
                laps.lap("student")
                if steps:
                    new = fit_attention(fitter, i, new, x_student, student_in, present, target, steps)
                    laps.lap("fit_steps")
                context = student.attention(i, new, x_student, student_in, present)
            x_student = student.residual(new, x_student, student.output(new, context))
            laps.lap("student")
        report.append({**errors, "seconds": laps.seconds})
        layers.append(new)
        still_read = {strategy.kv_source[j] for j in range(i + 1, description.num_layers)}
        present = {owner: kv for owner, kv in present.items() if owner in still_read}  # else all layers' K/V pile up
    return dataclasses.replace(compressed, layers=layers), report


class Laps:
    """Seconds per phase of one layer's pass, for the record; the device is synchronized at each lap, so a phase's
    asynchronous GPU work counts where it ran."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._since = device, {}, time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._since, 3)
        self._since = now


ATTENTION_WEIGHTS = ("q", "k", "v", "o")


def fit_attention(reference: ReferenceDecoder, i: int, layer: Layer, x: torch.Tensor, inputs: LayerInputs,
                  present: dict, target: torch.Tensor, steps: int) -> Layer:
    """Layer i with its Q, K, V and O weights (biases kept) moved by `steps` Adam steps on the squared error between
    its attention output from x and `target`, relative to the target's energy, computed in `reference`'s dtype and
    on its device; each weight's step size is FIT_STEP times its RMS, so the fit does not depend on the model's
    weight scale. A shared layer reads its owner's K/V from `present` (fixed here) and never its own K/V weights,
    which stay as they are."""
    dtype, device = reference.dtype, reference.device
    x, target = x.to(dtype), target.to(dtype)
    inputs = LayerInputs(**{field.name: getattr(inputs, field.name).to(dtype) for field in dataclasses.fields(inputs)})
    weights = {name: getattr(layer, name).weight.detach().to(device, dtype).clone().requires_grad_(True)
               for name in ATTENTION_WEIGHTS}
    optimizer = torch.optim.Adam([{"params": [w], "lr": FIT_STEP * float(w.detach().pow(2).mean().sqrt())}
                                  for w in weights.values()])
    energy = target.pow(2).mean()
    source = reference.strategy.kv_source[i]  # an owner computes its own K/V; a shared layer reads its owner's
    present = {} if source == i else {source: tuple(t.to(dtype) for t in present[source])}

    def with_weights(tensors: dict[str, torch.Tensor]) -> Layer:
        return dataclasses.replace(layer, **{name: Linear(tensor, getattr(layer, name).bias)
                                             for name, tensor in tensors.items()})

    # the steps are nearly all of the method's time (a 7B layer: 200 passes of 6.6 TFLOP): TF32 products on a GPU
    with torch.enable_grad(), tensor_float32_on(device):
        for _ in range(steps):
            fitted = with_weights(weights)
            attention = reference.attention(i, fitted, x, inputs, dict(present))  # an owner adds its own K/V
            error = reference.output(fitted, attention) - target
            optimizer.zero_grad()
            (error.pow(2).mean() / energy).backward()
            optimizer.step()
    stored = {name: getattr(layer, name).weight for name in ATTENTION_WEIGHTS}
    return with_weights({name: w.detach().to(stored[name].device, stored[name].dtype).contiguous()
                         for name, w in weights.items()})


def ridge_fit(inputs: torch.Tensor, target: torch.Tensor, start: Linear) -> Linear:
    """The weights W of `start` (its bias kept) minimising ||inputs W + b - target||^2 + r ||W - start's||^2, with r
    OUTPUT_RIDGE times the inputs' mean energy per feature."""
    gram = inputs.T @ inputs
    strength = OUTPUT_RIDGE * gram.diagonal().mean()
    start_weight = start.weight.to(inputs.device, torch.float64)
    bias = 0.0 if start.bias is None else start.bias.to(inputs.device, torch.float64)
    weight = torch.linalg.solve(gram + strength * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device),
                                inputs.T @ (target - bias) + strength * start_weight)
    return Linear(weight.to(start.weight.device, start.weight.dtype).contiguous(), start.bias)


def run_compress_heads(model: str, kv_heads: int, method: str, calib: str | None, samples: int, length: int,
                       output: Path, fit_steps: int | None = None, share: str = "none",
                       device: str | None = None) -> dict:
    """`kvexport compress-heads`: load, check, calibrate, compress and write; returns the record it wrote.
    Everything a user can get wrong is refused before the calibration runs."""
    from .calibration import read_text, token_windows
    from .loading import load_model

    if output.exists():
        raise KvexportError(f"{output} exists: choose another -o")
    fit_steps = FIT_STEPS if fit_steps is None else fit_steps
    if fit_steps < 0:
        raise KvexportError(f"--fit-steps must be 0 or more, got {fit_steps}")
    loaded = load_model(model)
    description = loaded.description
    strategy = make_strategy(share, description.num_layers, loaded.reference)
    check_request(description, kv_heads, method, strategy)
    device = compute_device(device)
    windows = token_windows(loaded.tokenizer(), read_text(calib), samples, length)
    started = time.perf_counter()
    compressed, errors = compress_heads(description, windows, kv_heads, method, fit_steps, show_progress=True,
                                        strategy=strategy, device=device)
    record = {"method": method, **({"fit_steps": fit_steps} if method == "rope-svd-fit" else {}),
              "source": loaded.reference, "kv_heads": kv_heads,
              "original_kv_heads": description.num_kv_heads,
              "calibration": {"text": str(calib or "the default model's held-out text"), "samples": samples,
                              "length": length, "from": "start"},
              "device": str(device), "seconds": round(time.perf_counter() - started, 1),
              **({"peak_device_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
                 if device.type == "cuda" else {}),
              "layers": errors}
    write_compressed(compressed, loaded.directory, loaded.config, output, record,
                     strategy if strategy.shared else None)
    return record


def write_compressed(description: DecoderDescription, source_dir: Path, config, output: Path, record: dict,
                     strategy: Strategy | None = None) -> Path:
    """A Hugging Face checkpoint with num_key_value_heads = G that transformers loads and runs (GPT-NeoX as the
    multi-head model it equals, see models/gpt_neox.py), written under a temporary name and renamed when
    complete, with kvexport_compression.json (method, calibration, per-layer errors) and, where the layers were
    fitted for a sharing strategy, strategy.json, which binds the model to it (loading.check_trained_strategy)."""
    import shutil

    from safetensors.torch import save_file

    from .loading import COMPRESSION_RECORD, SIDE_FILES, bind_strategy

    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for name in SIDE_FILES:
            if (source_dir / name).is_file() and name != "config.json":
                shutil.copy2(source_dir / name, partial / name)
        config.num_key_value_heads = description.num_kv_heads
        config.save_pretrained(partial)
        stored = getattr(config, "dtype", None)  # the source checkpoint's dtype (a torch.dtype in transformers 5)
        dtype = stored if isinstance(stored, torch.dtype) else torch.float32
        save_file({k: v.to(dtype) for k, v in state_dict(description).items()},
                  partial / "model.safetensors", metadata={"format": "pt"})
        if strategy is not None:
            record["strategy"] = bind_strategy(strategy, partial, output, {"fitted_from": record["source"]})
        write_text_atomic(partial / COMPRESSION_RECORD, json.dumps(record, indent=2) + "\n")
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output
