"""`kvexport bench`: decode latency and memory per backend x strategy x batch x context.

Each point fills the cache to `context - steps` tokens, then times a greedy decode loop (after warm-up; median
and p90 per step): each step's chosen token is fed to the next, on the device where the backend allows it, and on
CUDA the host does not wait between steps (time_steps; ort-genai's API returns each token to the host, so it is
timed on the host clock). Decode timing does not depend on cache contents, so large points fill the cache
with random values instead of running a prefill; prefill is timed where batch x context is small enough to
run it. The baselines (hf, hf-compile, optimum: baselines.py) build their own cache objects, so they prefill, in
chunks where one prefill would be too large. The floor of a decode step is (weight bytes + cache bytes read)
over the measured memory rate (memory_rate).
Every layer reads one cache per step, its own or its owner's, so sharing halves the cache held but not the
cache read: the floor counts a full cache read whatever the strategy.
"""

from __future__ import annotations

import gc
import itertools
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kvexport.strategies.atomic import atomic_path, write_text_atomic
from kvexport.strategies.contract import positions_from_mask

from .baselines import BASELINES, CompiledStaticDecoder, GenAIDecoder, PointRefused, baseline_model, cache_argument
from .exported import ExportedModel
from .generator import make_decoder
from .kv_cache import TORCH_DTYPES
from .ort_session import cuda_session_settings
from .static_cache import StaticCacheDecoder

PREFILL_TOKEN_LIMIT = 32768  # batch x context above which prefill is not timed (attention scores grow as S^2)


@dataclass
class BenchPoint:
    backend: str
    strategy: str
    batch: int
    context: int
    prefill_ms: float | None
    decode_ms_median: float | None  # None: the backend refused this point (see note)
    decode_ms_p90: float | None
    tokens_per_s: float | None
    kv_bytes: int
    weight_bytes: int
    peak_device_mib: float | None  # device memory in use at this point's peak, whole device (see run_bench)
    floor_ms: float | None
    ratio_to_floor: float | None
    note: str | None = None  # why a backend refused the point
    # What the peak consists of, above what the device held before the backend was made (CUDA context): the
    # weights (as exported), the cache allocated (static: the whole buffers) and the rest (the transient).
    cache_mib: float | None = None
    transient_mib: float | None = None


class Clock:
    """Milliseconds of device work between two points: CUDA events on the GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, work: Callable, *args) -> tuple[float, object]:
        """(milliseconds, result) of work(*args)."""
        if not self.cuda:
            started = time.perf_counter()
            result = work(*args)
            return (time.perf_counter() - started) * 1e3, result
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = work(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end), result


def memory_rate(device: torch.device) -> dict | None:
    """Bytes/s device memory moves, measured two ways on 1 GiB: a read-only reduction (bytes read over its time)
    and a device-to-device copy (bytes read plus bytes written over its time). The larger is the rate a decode
    step's bytes are held against, so the floor is never lax."""
    if device.type != "cuda":
        return None
    source = torch.empty(1 << 28, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    clock = Clock(device)

    def rate(work, traffic: int) -> float:
        for _ in range(3):
            work()
        return traffic / (statistics.median(clock.time(work)[0] for _ in range(20)) / 1e3)

    read = rate(lambda: source.sum(), source.nbytes)
    copy = rate(lambda: target.copy_(source), 2 * source.nbytes)
    return {"read_only_gb_s": read / 1e9, "copy_traffic_gb_s": copy / 1e9, "bytes_per_s": max(read, copy)}


def device_in_use_mib(device: torch.device, peak: bool = True) -> float | None:
    """Device memory in use by everything (torch's reservation, ONNX Runtime's arenas, the CUDA context): at its
    peak since the last call (peak=True), or now.

    The torch peak counter is reset, so the next peak reading covers what happens after this call only.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # memory torch cached for earlier points is not this point's
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    if peak:
        in_use += torch.cuda.max_memory_reserved(device) - torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    return in_use / 2**20


def release(device: torch.device) -> None:
    """Frees what the last decoder or baseline held before the next is made: ONNX Runtime's sessions (with
    their arenas) and torch's cached blocks, which the next decoder's buffers would otherwise be carved from,
    keeping the old segments reserved."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(device: torch.device, count: int, step: Callable[[], None]) -> list[float]:
    """Milliseconds of each of `count` calls of step(), each of which queues one decode step and feeds the token
    it chooses to the next (as a generation loop does). On CUDA an event is recorded between consecutive steps and
    the host waits only after the last, so a step's time runs from its start on the device to the next step's
    start: the host's own work counts where the device waits for it, not where it overlaps the previous step.
    On the CPU, the host clock around each call."""
    if device.type != "cuda":
        times = []
        for _ in range(count):
            started = time.perf_counter()
            step()
            times.append((time.perf_counter() - started) * 1e3)
        return times
    events = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
    for event in events[:-1]:
        event.record()
        step()
    events[-1].record()
    events[-1].synchronize()
    return [start.elapsed_time(end) for start, end in itertools.pairwise(events)]


def time_decoder(decoder, batch: int, context: int, steps: int, warmup: int, device: torch.device,
                 vocab: int) -> tuple[float | None, list[float]]:
    """Greedy decode steps after a cache of context - steps - warmup tokens; the static decoder runs them as the
    engine does (decode_rows, the chosen token and the rows' lengths staying on the device), the others through
    step() with host inputs."""
    rng = torch.Generator(device=device).manual_seed(0)
    clock = Clock(device)
    prefill_ms = None
    start = context - steps - warmup
    if batch * start <= PREFILL_TOKEN_LIMIT:
        ids = np.random.default_rng(0).integers(0, vocab, (batch, start), dtype=np.int64)
        mask = np.ones_like(ids)
        prefill_cache = decoder.new_cache(batch)
        prefill_ms, _ = clock.time(decoder.forward, ids, mask, positions_from_mask(mask), prefill_cache)
    cache = decoder.random_cache(batch, start, rng)
    if isinstance(decoder, StaticCacheDecoder):
        state = {"token": torch.zeros(batch, dtype=torch.int64, device=device),
                 "lengths": torch.full((batch,), start, dtype=torch.int32, device=device)}

        def step():
            logits = decoder.decode_rows(state["token"], state["lengths"])
            state["token"] = logits[:, -1].argmax(-1)
            state["lengths"].add_(1)
    else:
        state = {"token": np.zeros((batch, 1), dtype=np.int64)}

        def step():
            length = cache.length + 1
            logits = decoder.step(state["token"], np.ones((batch, length), dtype=np.int64),
                                  np.full((batch, 1), length - 1, dtype=np.int64), cache)
            state["token"] = logits.argmax(-1)[:, None]
    return prefill_ms, time_steps(device, warmup + steps, step)[warmup:]


def baseline_step(model, token: torch.Tensor, mask: torch.Tensor, past):
    name = cache_argument(model)
    output = model(input_ids=token, attention_mask=mask, use_cache=True, **{name: past})
    return output, output[name]


def compiled_step(model: CompiledStaticDecoder, token: torch.Tensor, cache, start: int):
    return model(token, cache, start), cache


def time_baseline(model, batch: int, context: int, steps: int, warmup: int,
                  device: torch.device) -> tuple[float | None, list[float]]:
    """A greedy decode loop over a baseline model and the cache objects it returns (hf-compile: its StaticCache),
    the chosen token staying on the device.

    Large points fill the cache in chunks of PREFILL_TOKEN_LIMIT tokens (untimed): one 64 x 2048 prefill makes
    attention tensors of over 2^31 elements, past what ONNX Runtime's CUDA kernels index.
    """
    clock = Clock(device)
    start = context - steps - warmup
    ids = torch.randint(0, model.config.vocab_size, (batch, start), device=device)
    masks = [torch.ones((batch, start + n), dtype=torch.long, device=device) for n in range(warmup + steps + 1)]
    timed_prefill = batch * start <= PREFILL_TOKEN_LIMIT
    chunk = start if timed_prefill else max(1, PREFILL_TOKEN_LIMIT // batch)
    compiled = isinstance(model, CompiledStaticDecoder)
    run_step = compiled_step if compiled else baseline_step
    with torch.no_grad():
        past = model.new_cache(context) if compiled else None
        for begin in range(0, start, chunk):
            end = min(start, begin + chunk)
            step_args = (ids[:, begin:end], past, begin) if compiled else (ids[:, begin:end], masks[0][:, :end], past)
            prefill_ms, (_, past) = clock.time(run_step, model, *step_args)
        state = {"token": torch.zeros((batch, 1), dtype=torch.long, device=device), "step": 0, "past": past}

        def step():
            n = state["step"]
            step_args = (state["token"], state["past"], start + n) if compiled else (
                state["token"], masks[n + 1], state["past"])
            output, state["past"] = run_step(model, *step_args)
            state["token"], state["step"] = output.logits[:, -1:].argmax(-1), n + 1

        times = time_steps(device, warmup + steps, step)[warmup:]
    return (prefill_ms if timed_prefill else None), times


@dataclass
class BenchSettings:
    backends: tuple[str, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    provider: str = "cpu"
    steps: int = 16
    warmup: int = 4
    cuda_graph: bool = False
    memory_budget_gib: float = 16.0
    optimum_level: str = "O2"
    allocate: bool = False  # also allocate each strategy's computed max batch and measure it (CUDA, ort-static)


def run_bench(exports: dict[str, Path], model_dir: Path | None, settings: BenchSettings,
              progress: Callable[[str], None] = lambda _: None) -> dict:
    device = torch.device("cuda", 0) if settings.provider == "cuda" else torch.device("cpu")
    rates = memory_rate(device)
    bandwidth = rates["bytes_per_s"] if rates else None
    # Each point's memory is the whole device's at its peak: the CUDA contexts, the weights, the cache buffers,
    # ONNX Runtime's arenas (which only grow, so within one context they hold the largest prefill's
    # transients so far) and torch's peak. Every decoder and baseline is freed before the next one is made.
    device_in_use_mib(device)  # resets torch's peak counter
    budget = settings.memory_budget_gib * 2**30
    points: list[BenchPoint] = []
    capacity, allocated = {}, {}
    quantized_cache = False
    for strategy, directory in exports.items():
        model = ExportedModel.load(directory)
        quantized_cache |= model.layout.quantized
        weight_bytes = model.manifest["weight_bytes"]
        capacity[strategy] = {ctx: int((budget - weight_bytes) // (model.layout.bytes_per_token() * ctx))
                              for ctx in settings.contexts}
        if settings.allocate:
            allocated[strategy] = {ctx: allocated_mib(model, batch, ctx, settings, device)
                                   for ctx, batch in capacity[strategy].items()}
        for backend in settings.backends:
            if backend in BASELINES and (model.strategy.shared or model_dir is None):
                continue  # the baselines cannot share a cache: they run without sharing only
            points += bench_backend(backend, strategy, model, model_dir, settings, device, bandwidth, progress)
            release(device)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "software": software(device, quantized_cache), "memory_rate": rates,
            "settings": asdict(settings), "points": [asdict(p) for p in points],
            "max_batch_in_budget": capacity, "allocated_mib_at_max_batch": allocated or None}


def software(device: torch.device, quantized_cache: bool = False) -> dict:
    """What produced the numbers: library versions and, on CUDA, the ONNX Runtime kernel choices and provider
    options of kvexport's sessions (baselines keep ONNX Runtime's own)."""
    import onnxruntime
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "onnxruntime": onnxruntime.__version__}
    sessions = cuda_session_settings(quantized_cache)
    return versions | ({"ort_cuda_sessions": sessions} if device.type == "cuda" else {})


def allocated_mib(model: ExportedModel, batch: int, context: int, settings: BenchSettings,
                  device: torch.device) -> float:
    """Device MiB that `batch` full sequences of `context` tokens take when really allocated: the static decoder
    (its session with the weights, its cache buffers, logits), a full row's prefill and one decode step over full
    rows (their transients), above what was in use before."""
    release(device)
    before = device_in_use_mib(device, peak=False)
    decoder = make_decoder(model, "ort-static", settings.provider, 0, batch, False, context)
    decoder.prefill_row(0, torch.zeros(context - 1, dtype=torch.int64))  # a full row's prefill transient
    cache = decoder.random_cache(batch, context - 1, torch.Generator(device=device).manual_seed(0))
    decoder.step(np.zeros((batch, 1), dtype=np.int64), np.ones((batch, context), dtype=np.int64),
                 np.full((batch, 1), context - 1, dtype=np.int64), cache)
    used = device_in_use_mib(device) - before
    del decoder, cache
    release(device)
    return used


def bench_backend(backend: str, strategy: str, model: ExportedModel, model_dir: Path | None,
                  settings: BenchSettings, device: torch.device, bandwidth: float | None,
                  progress: Callable[[str], None]) -> list[BenchPoint]:
    """Every batch x context point of one backend on one strategy."""
    before = device_in_use_mib(device, peak=False)
    try:
        with (baseline_model(backend, model_dir, device, TORCH_DTYPES[model.dtype], settings.optimum_level,
                             model.quantized_weights)
              if backend in BASELINES else nullcontext()) as reference_model:
            return bench_points(backend, strategy, model, reference_model, settings, device, bandwidth, progress,
                                before)
    except PointRefused as refusal:  # the baseline cannot run this model at all
        return [refused_point(backend, strategy, model, batch, context, str(refusal))
                for context in settings.contexts for batch in settings.batches]


def refused_point(backend: str, strategy: str, model: ExportedModel, batch: int, context: int,
                  reason: str) -> BenchPoint:
    return BenchPoint(backend=backend, strategy=strategy, batch=batch, context=context, prefill_ms=None,
                      decode_ms_median=None, decode_ms_p90=None, tokens_per_s=None,
                      kv_bytes=model.layout.bytes_per_token() * batch * context,
                      weight_bytes=model.manifest["weight_bytes"], peak_device_mib=None, floor_ms=None,
                      ratio_to_floor=None, note=reason)


def bench_points(backend: str, strategy: str, model: ExportedModel, reference_model, settings: BenchSettings,
                 device: torch.device, bandwidth: float | None, progress: Callable[[str], None],
                 before_mib: float | None) -> list[BenchPoint]:
    """The points of one backend: reference_model is the baseline's model, None for kvexport's decoders.
    before_mib: device memory in use before the backend was made."""
    weight_bytes = model.manifest["weight_bytes"]
    points = []
    for context in settings.contexts:
        # One decoder per context: the static cache buffers are sized to it, read whole every step.
        decoder = None if reference_model is not None else make_decoder(
            model, backend, settings.provider, 0, max(settings.batches), settings.cuda_graph, context)
        for batch in settings.batches:
            progress(f"{backend} {strategy} batch {batch} context {context}")
            try:
                if isinstance(reference_model, GenAIDecoder):
                    prefill, times = reference_model.time(batch, context, settings.steps, settings.warmup)
                elif reference_model is not None:
                    prefill, times = time_baseline(reference_model, batch, context, settings.steps,
                                                   settings.warmup, device)
                else:
                    prefill, times = time_decoder(decoder, batch, context, settings.steps, settings.warmup,
                                                  device, model.facts.vocab_size)
            except PointRefused as refusal:
                points.append(refused_point(backend, strategy, model, batch, context, str(refusal)))
                continue
            median = statistics.median(times)
            kv_bytes = model.layout.bytes_per_token() * batch * context
            read_bytes = weight_bytes + model.layout.full_bytes_per_token * batch * context
            floor = read_bytes / bandwidth * 1e3 if bandwidth else None
            peak = device_in_use_mib(device)
            # The static decoder's buffers are allocated for its largest batch, whichever batch runs.
            cache_mib = (decoder.storage.numel() * decoder.storage.element_size() if hasattr(decoder, "storage")
                         else kv_bytes) / 2**20
            transient = None if peak is None else peak - before_mib - weight_bytes / 2**20 - cache_mib
            points.append(BenchPoint(
                backend=backend, strategy=strategy, batch=batch, context=context, prefill_ms=prefill,
                decode_ms_median=median, decode_ms_p90=float(np.percentile(times, 90)),
                tokens_per_s=batch / (median / 1e3), kv_bytes=kv_bytes, weight_bytes=weight_bytes,
                peak_device_mib=peak, floor_ms=floor, ratio_to_floor=median / floor if floor else None,
                cache_mib=cache_mib if peak is not None else None, transient_mib=transient))
        del decoder
        release(device)
    return points


def _fmt(value: float | None, spec: str = "{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def breakdown(point: dict) -> str:
    if point.get("transient_mib") is None:
        return "-"
    return f"{point['weight_bytes'] / 2**20:.0f} + {point['cache_mib']:.0f} + {point['transient_mib']:.0f}"


def measured_with(software: dict) -> str:
    """A report's software in one line: 'torch 2.11, ..., onnxruntime 1.31.1 (kvexport's CUDA sessions: ...)'."""
    named = ", ".join(f"{name} {version}" for name, version in software.items() if name != "ort_cuda_sessions")
    sessions = software.get("ort_cuda_sessions")
    if not sessions:
        return named
    return named + " (kvexport's CUDA sessions: " + ", ".join(f"{name}={value}" for name, value in sessions.items()) + ")"


def table(report: dict) -> str:
    header = ("| backend | strategy | batch | context | prefill ms | decode ms (median) | p90 | tokens/s | KV MiB | "
              "peak MiB | = weights + cache + transient | floor ms | measured/floor |")
    lines = [f"Measured on {report['device']} with {measured_with(report['software'])}", "", header, "|" + "---|" * 13]
    for p in report["points"]:
        if p["decode_ms_median"] is None:
            lines.append(f"| {p['backend']} | {p['strategy']} | {p['batch']} | {p['context']} | n/a: {p['note']} |"
                         + " |" * 8)
            continue
        lines.append(f"| {p['backend']} | {p['strategy']} | {p['batch']} | {p['context']} | {_fmt(p['prefill_ms'])} | "
                     f"{p['decode_ms_median']:.3f} | {p['decode_ms_p90']:.3f} | {p['tokens_per_s']:.0f} | "
                     f"{p['kv_bytes'] / 2**20:.1f} | {_fmt(p['peak_device_mib'], '{:.0f}')} | {breakdown(p)} | "
                     f"{_fmt(p['floor_ms'], '{:.3f}')} | {_fmt(p['ratio_to_floor'])} |")
    rates = report.get("memory_rate")
    if rates:
        lines += ["", (f"floor ms = (weights + cache read) / {rates['bytes_per_s'] / 1e9:.0f} GB/s, the larger of a "
                       f"read-only reduction ({rates['read_only_gb_s']:.0f} GB/s read) and a device copy "
                       f"({rates['copy_traffic_gb_s']:.0f} GB/s read + written)")]
    budget = (f"Max batch in a {report['settings']['memory_budget_gib']} GiB budget "
              "(weights + owner-only KV cache, computed from the cache layout):")
    contexts = report["settings"]["contexts"]
    lines += ["", budget, "", "| strategy | " + " | ".join(f"context {c}" for c in contexts) + " |",
              "|---|" + "---|" * len(contexts)]
    for strategy, by_context in report["max_batch_in_budget"].items():
        lines.append(f"| {strategy} | " + " | ".join(str(v) for v in by_context.values()) + " |")
    if report.get("allocated_mib_at_max_batch"):
        caption = "Allocated at that batch (ort-static: session, cache buffers, a row's prefill, one decode step), MiB:"
        lines += ["", caption, "",
                  "| strategy | " + " | ".join(f"context {c}" for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
        for strategy, by_context in report["allocated_mib_at_max_batch"].items():
            lines.append(f"| {strategy} | " + " | ".join(f"{v:.0f}" for v in by_context.values()) + " |")
    return "\n".join(lines)


def plot(report: dict, output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, paths = [p for p in report["points"] if p["decode_ms_median"] is not None], []
    largest = max(p["batch"] for p in points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(p["backend"], p["strategy"]) for p in points}):
        line = sorted((p["context"], p["decode_ms_median"]) for p in points
                      if (p["backend"], p["strategy"]) == key and p["batch"] == largest)
        ax.plot(*zip(*line), marker="o", label=f"{key[0]} / {key[1]}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)"), ax.set_ylabel("decode ms / step (median)")
    ax.set_title(f"decode latency vs context, batch {largest} ({report['device']})"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(output / "bench_latency.png") as partial:
        fig.savefig(partial, format="png", dpi=100)
    paths.append(output / "bench_latency.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    context = max(report["settings"]["contexts"])
    for strategy in sorted({p["strategy"] for p in points}):
        sample = next(p for p in points if p["strategy"] == strategy)
        batches = sorted({p["batch"] for p in points})
        per_token = sample["kv_bytes"] / (sample["batch"] * sample["context"])
        ax.plot(batches, [(sample["weight_bytes"] + per_token * b * context) / 2**30 for b in batches], marker="o",
                label=f"{strategy}: weights + KV")
    ax.set_xlabel("batch"), ax.set_ylabel(f"GiB at context {context}"), ax.legend(), ax.grid(alpha=0.3)
    ax.set_title("memory vs batch per strategy")
    fig.tight_layout()
    with atomic_path(output / "bench_memory.png") as partial:
        fig.savefig(partial, format="png", dpi=100)
    plt.close(fig)
    return [*paths, output / "bench_memory.png"]


def write_report(report: dict, output: Path) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    return [write_text_atomic(output / "bench.json", json.dumps(report, indent=2)),
            write_text_atomic(output / "bench.md", table(report) + "\n"), *plot(report, output)]
