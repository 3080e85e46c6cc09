"""`kvexport eval`: what a strategy costs in quality, measured on the exported ONNX that users deploy.

Perplexity and next-token accuracy on held-out windows for the full model and each strategy, retention
relative to the baseline's full model (the model itself, or the model a compress-heads or uptrain output was made
from), and KV bytes per token. With torch=True the PyTorch reference computes the
same numbers, as a cross-check of the exported graphs. On a GPU the float32 reference computes them there, with
the weights held once in their stored dtype (an export's validation bounds the graph's difference from it at
1e-4): exporting and running a large model on the CPU once per strategy would take far longer.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kvexport.runtime import ExportedModel, OrtDecoder
from kvexport.strategies import KvexportError, Strategy, no_sharing
from kvexport.strategies.atomic import atomic_path, write_text_atomic
from kvexport.strategies.contract import KV_CACHE_ELEMENTS, positions_from_mask

from .cache_codes import QuantizedCache
from .calibration import next_token_stats
from .loading import LoadedModel, fitted_strategy, load_model, original_model
from .models import BlockQuantized
from .onnx_graph import cache_layout
from .pipeline import cache_quantization, export
from .reference import ReferenceDecoder

BATCH = 4  # windows per forward pass: bounds the logits held in memory


@dataclass
class EvalRow:
    name: str
    kv_source: list[int]
    shared_layers: int
    kv_bytes_per_token: int
    perplexity: float
    accuracy: float
    perplexity_ratio: float  # strategy / full (1.0 = no loss)
    accuracy_retention: float  # strategy / full, in percent
    torch_perplexity: float | None = None
    torch_accuracy: float | None = None


def onnx_logits(directory: Path, windows: torch.Tensor) -> torch.Tensor:
    model = ExportedModel.load(directory)
    decoder = OrtDecoder(model)
    chunks = []
    for start in range(0, len(windows), BATCH):
        ids = windows[start:start + BATCH].numpy()
        mask = np.ones_like(ids)
        chunks.append(torch.from_numpy(decoder.forward(ids, mask, positions_from_mask(mask), decoder.new_cache(len(ids)))))
    return torch.cat(chunks)


def reference_logits(description, strategy: Strategy, windows: torch.Tensor, device: torch.device,
                     kv_quant: QuantizedCache | None = None) -> torch.Tensor:
    reference = ReferenceDecoder(description, strategy, torch.float32, device, kv_quant)
    chunks = []
    with torch.no_grad():
        for chunk in windows.split(BATCH):
            ones = torch.ones_like(chunk)
            chunks.append(reference.forward(chunk, ones, positions_from_mask(ones)).logits)
    return torch.cat(chunks)


def evaluate(loaded: LoadedModel, strategies: dict[str, Strategy], windows: torch.Tensor,
             with_torch: bool = False, log=print, baseline: LoadedModel | None = None,
             device: torch.device | None = None, weight_format: BlockQuantized | None = None,
             kv_cache: str | None = None) -> list[EvalRow]:
    """Rows for the baseline's full model (named 'BASELINE: none'; given, the ratios are against it), the full
    model ('none') and each named strategy; a model uptrained or fitted for one strategy gets no 'none' row (it
    is not meant to run without its sharing). device: where the float32 reference computes the logits instead of
    the exported graphs on ONNX Runtime (None). weight_format, kv_cache: every row but the first with its
    projections or its cache quantized so (the first, the model as it is, is what the ratios are against)."""
    bound = fitted_strategy(loaded.directory) is not None
    named = {**({} if bound else {"none": no_sharing(loaded.description.num_layers)}), **strategies}
    quantized = weight_format is not None or kv_cache is not None
    suffix = "".join([f", {weight_format.label}" if weight_format else "", f", {kv_cache} KV" if kv_cache else ""])
    runs = [(loaded, name + suffix, strategy, weight_format, kv_cache) for name, strategy in named.items()]
    if baseline is not None or (quantized and not bound):
        reference = baseline or loaded
        runs.insert(0, (reference, f"{Path(reference.reference).name}: none",
                        no_sharing(reference.description.num_layers), None, None))
    rows: list[EvalRow] = []
    on_device: dict[int, object] = {}  # a model's description on the GPU, made once for all its strategies
    with tempfile.TemporaryDirectory(prefix="kvexport-eval-") as tmp:
        for index, (model, name, strategy, fmt, kv) in enumerate(runs):
            description = replace(model.description, weight_format=fmt)
            if device is None:
                directory = export(model, strategy, Path(tmp) / f"s{index}", log=lambda _: None, static=False,
                                   weight_format=fmt, kv_cache=kv).directory
                nll, accuracy = next_token_stats(onnx_logits(directory, windows), windows)
            else:
                on_device = on_device if id(model) in on_device else {id(model): model.description_on(device)}
                quantized_model = replace(on_device[id(model)], weight_format=fmt)
                quantized_cache = None if kv is None else cache_quantization(model, quantized_model, strategy, kv)
                logits = reference_logits(quantized_model, strategy, windows, device, quantized_cache)
                nll, accuracy = next_token_stats(logits, windows.to(device))
            torch_ppl = torch_accuracy = None
            if with_torch:
                reference = ReferenceDecoder(description, strategy, torch.float32)
                ones = torch.ones_like(windows)
                torch_nll, torch_accuracy = next_token_stats(
                    reference.forward(windows, ones, positions_from_mask(ones)).logits, windows)
                torch_ppl = math.exp(torch_nll)
            layout = cache_layout(description, strategy, KV_CACHE_ELEMENTS[kv] if kv else "float32")
            full = rows[0] if rows else None
            ppl = math.exp(nll)
            rows.append(EvalRow(
                name=name, kv_source=list(strategy.kv_source), shared_layers=len(strategy.shared),
                kv_bytes_per_token=layout.bytes_per_token(), perplexity=ppl, accuracy=accuracy,
                perplexity_ratio=ppl / full.perplexity if full else 1.0,
                accuracy_retention=(100 * accuracy / full.accuracy if full.accuracy else math.nan) if full else 100.0,
                torch_perplexity=torch_ppl, torch_accuracy=torch_accuracy,
            ))
            log(f"{name}: perplexity {ppl:.2f}, accuracy {accuracy:.2%}")
    return rows


def load_baseline(loaded: LoadedModel, requested: str | None, log=print) -> LoadedModel | None:
    """The model whose full accuracy the ratios are against: `requested`, else the model that `loaded` was made
    from by compress-heads or uptrain (None where there is none, or where it does not load here: then said in one
    line, and the ratios are against the first row). It must read the same token ids."""
    source = requested or original_model(loaded.directory)
    if source is None:
        return None
    try:
        baseline = load_model(source)
    except KvexportError as error:
        if requested:
            raise
        log(f"no baseline: {source}, which {loaded.reference} was made from, does not load here ({error}); the "
            "ratios are against the first row: pass --baseline MODEL")
        return None
    if baseline.config.vocab_size != loaded.config.vocab_size:
        raise KvexportError(f"the baseline {source} has {baseline.config.vocab_size} token ids and "
                            f"{loaded.reference} {loaded.config.vocab_size}: pass a baseline with the same tokenizer")
    return baseline


def table(rows: list[EvalRow]) -> str:
    has_torch = rows[0].torch_perplexity is not None
    head = "| strategy | shared | KV bytes/token | perplexity | ppl ratio | accuracy | acc retention |"
    head += " torch ppl |" if has_torch else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r.name} | {r.shared_layers} | {r.kv_bytes_per_token} | {r.perplexity:.2f} | "
                f"{r.perplexity_ratio:.3f} | {r.accuracy:.2%} | {r.accuracy_retention:.1f}% |")
        lines.append(line + (f" {r.torch_perplexity:.2f} |" if has_torch else ""))
    return "\n".join(lines)


def write_report(rows: list[EvalRow], output: Path, meta: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    paths = [write_text_atomic(output / "eval.json", json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2)),
             write_text_atomic(output / "eval.md", table(rows) + "\n")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r.name for r in rows]
    left.bar(names, [r.perplexity for r in rows], color="tab:blue")
    left.set_ylabel("held-out perplexity (lower is better)")
    right.bar(names, [r.kv_bytes_per_token / 1024 for r in rows], color="tab:orange")
    right.set_ylabel("KV cache KiB per token")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{meta.get('model', '')}: quality vs KV cache")
    fig.tight_layout()
    with atomic_path(output / "eval.png") as partial:
        fig.savefig(partial, format="png", dpi=100)
    plt.close(fig)
    return [*paths, output / "eval.png"]
