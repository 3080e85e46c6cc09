"""KVSharer's training-free search (Yang et al., 2024): share the caches of *dissimilar* layers first.

The algorithm is independent of how the model runs: it takes each layer's calibration K/V and a callback
that scores a candidate strategy (higher is closer to the full model). kvexport.exporter.calibration wires
it to the PyTorch reference.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .strategy import Strategy, StrategyError

ORDERS = ("dissimilar", "similar")


def layer_distances(layer_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[L, L] distances between layers' calibration K/V.

    layer_kv[i] = (keys, values), each [samples, kv_heads, positions, head_dim] with a fixed number of
    positions. K and V are averaged over samples; the distance is the L2 norm over head_dim of the
    difference, averaged over heads and positions, for K and for V, then the mean of the two.
    """
    means = [(k.double().mean(0), v.double().mean(0)) for k, v in layer_kv]
    count = len(means)
    distances = torch.zeros(count, count, dtype=torch.float64)
    for a in range(count):
        for b in range(a + 1, count):
            key = (means[a][0] - means[b][0]).norm(dim=-1).mean()
            value = (means[a][1] - means[b][1]).norm(dim=-1).mean()
            distances[a, b] = distances[b, a] = ((key + value) / 2).item()  # from any device
    return distances


def ranked_pairs(distances: torch.Tensor, order: str = "dissimilar") -> list[tuple[int, int]]:
    """Layer pairs (earlier, later), most dissimilar first (or most similar first, for comparison)."""
    if order not in ORDERS:
        raise StrategyError(f"order must be one of {ORDERS}")
    count = distances.shape[0]
    pairs = [(a, b) for a in range(count) for b in range(a + 1, count)]
    # Ties broken by layer indices so that the ranking is deterministic.
    return sorted(pairs, key=lambda p: ((-1 if order == "dissimilar" else 1) * float(distances[p]), p))


def apply_pair(kv_source: tuple[int, ...], earlier: int, later: int) -> tuple[int, ...] | None:
    """`later` reuses `earlier`'s cache, resolved to its owner; layers that used `later` move along.

    None when `later` is already shared (the pair is skipped).
    """
    if kv_source[later] != later:
        return None
    owner = kv_source[earlier]
    return tuple(owner if source == later else source for source in kv_source)


@dataclass
class SearchStep:
    earlier: int
    later: int
    distance: float
    score: float
    accepted: bool

    def to_dict(self) -> dict:
        return {"pair": [self.earlier, self.later], "distance": round(self.distance, 6),
                "score": round(self.score, 6), "accepted": self.accepted}


def search(
    distances: torch.Tensor,
    score: Callable[[Strategy], float],
    shared_layers: int,
    threshold: float,
    order: str = "dissimilar",
    progress: Callable[[SearchStep, int], None] | None = None,
) -> tuple[Strategy, list[SearchStep]]:
    """Walk the ranked pairs, keeping a pair only while score(candidate) > threshold.

    Stops once `shared_layers` layers are shared or the ranking is exhausted.
    """
    count = distances.shape[0]
    if not 0 <= shared_layers < count:
        raise StrategyError(f"can share 0..{count - 1} of {count} layers, not {shared_layers}")
    kv_source = tuple(range(count))
    steps: list[SearchStep] = []
    for earlier, later in ranked_pairs(distances, order):
        if sum(s != i for i, s in enumerate(kv_source)) >= shared_layers:
            break
        candidate = apply_pair(kv_source, earlier, later)
        if candidate is None:
            continue
        value = score(Strategy(candidate, method="candidate"))
        step = SearchStep(earlier, later, float(distances[earlier, later]), value, value > threshold)
        steps.append(step)
        if step.accepted:
            kv_source = candidate
        if progress:
            progress(step, sum(s != i for i, s in enumerate(kv_source)))
    return Strategy(kv_source, method="kvsharer"), steps


def random_strategy(num_layers: int, shared_layers: int, seed: int) -> Strategy:
    """A valid strategy with `shared_layers` random layers each reusing a random earlier owner."""
    rng = random.Random(seed)
    shared = set(rng.sample(range(1, num_layers), shared_layers))
    kv_source = list(range(num_layers))
    for layer in sorted(shared):
        kv_source[layer] = rng.choice([o for o in range(layer) if o not in shared])
    return Strategy(tuple(kv_source), method="random", params={"seed": seed, "shared_layers": shared_layers})
