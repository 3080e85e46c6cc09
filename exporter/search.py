"""`kvexport search`: the KVSharer search on a model, with calibration, progress and provenance."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from kvexport.strategies import Strategy, StrategyError
from kvexport.strategies.kvsharer import layer_distances, search

from .calibration import Calibration, token_windows
from .loading import LoadedModel
from .reference import CPU

CRITERIA = {
    # name: (Calibration method, default threshold)
    "cosine": ("cosine", 0.5),  # KVSharer's reference setting
    "ppl": ("perplexity_retention", 0.8),  # perplexity at most 25% above the full model's
}


@dataclass
class SearchSettings:
    shared_layers: int
    criterion: str = "cosine"
    threshold: float | None = None
    samples: int = 30
    length: int = 64
    order: str = "dissimilar"

    def resolved_threshold(self) -> float:
        return CRITERIA[self.criterion][1] if self.threshold is None else self.threshold


def shared_count(num_layers: int, shared_layers: int | None, ratio: float | None) -> int:
    if (shared_layers is None) == (ratio is None):
        raise StrategyError("give exactly one of --shared-layers N or --ratio R")
    count = shared_layers if shared_layers is not None else round(ratio * num_layers)
    if not 0 <= count < num_layers:
        raise StrategyError(f"can share 0..{num_layers - 1} of the model's {num_layers} layers, not {count}")
    return count


def run_search(loaded: LoadedModel, text: str, settings: SearchSettings, calibration: Calibration | None = None,
               show_progress: bool = True, device: torch.device = CPU) -> Strategy:
    if settings.criterion not in CRITERIA:
        raise StrategyError(f"criterion must be one of {', '.join(CRITERIA)}")
    if calibration is None:
        windows = token_windows(loaded.tokenizer(), text, settings.samples, settings.length)
        calibration = Calibration(loaded, windows, device=device)
    distances = layer_distances(calibration.layer_kv)
    score = getattr(calibration, CRITERIA[settings.criterion][0])
    threshold = settings.resolved_threshold()
    with tqdm(total=settings.shared_layers, desc="kvsharer search", unit="layer", disable=not show_progress) as bar:
        def progress(step, shared):
            bar.set_postfix(pair=f"{step.earlier}->{step.later}", score=f"{step.score:.3f}",
                            kept="yes" if step.accepted else "no")
            bar.update(shared - bar.n)
        found, steps = search(distances, score, settings.shared_layers, threshold, settings.order, progress)
    return Strategy(
        found.kv_source, method="kvsharer", model=loaded.reference,
        params={"shared_layers": settings.shared_layers, "criterion": settings.criterion, "threshold": threshold,
                "order": settings.order, "calibration_samples": settings.samples,
                "calibration_length": settings.length},
        provenance={"reached_target": len(found.shared) == settings.shared_layers,
                    "distances": [[round(float(d), 6) for d in row] for row in distances],
                    "steps": [step.to_dict() for step in steps]},
    )
