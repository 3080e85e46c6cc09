"""Run the same inputs through two decoders and report how far apart they are (polygraphy-style)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvexport.strategies.contract import positions_from_mask

from .decoder import Decoder


@dataclass
class Comparison:
    steps: list[dict] = field(default_factory=list)  # per step: max_abs, max_rel, greedy_agree

    @property
    def max_abs(self) -> float:
        return max(s["max_abs"] for s in self.steps)

    @property
    def max_rel(self) -> float:
        return max(s["max_rel"] for s in self.steps)

    @property
    def greedy_agreement(self) -> float:
        return float(np.mean([s["greedy_agree"] for s in self.steps]))

    def summary(self, names: tuple[str, str]) -> str:
        return (f"{names[0]} vs {names[1]} over {len(self.steps)} steps: max abs diff {self.max_abs:.3e}, "
                f"max rel diff {self.max_rel:.3e}, greedy tokens agree {self.greedy_agreement:.1%}")


def compare_decoders(first: Decoder, second: Decoder, batch: int = 2, prompt: int = 8, decode_steps: int = 8,
                     seed: int = 0) -> Comparison:
    """Prefill a random prompt, then decode feeding the first decoder's greedy tokens to both."""
    vocab = first.model.facts.vocab_size
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, prompt), dtype=np.int64)
    mask = np.ones_like(ids)
    caches = (first.new_cache(batch), second.new_cache(batch))
    result = Comparison()
    for _ in range(decode_steps + 1):
        positions = positions_from_mask(mask)[:, -ids.shape[1]:]
        a, b = (torch.as_tensor(decoder.step(ids, mask, positions, cache)).double().cpu().numpy()
                for decoder, cache in zip((first, second), caches))
        diff = np.abs(a - b)
        result.steps.append({"max_abs": float(diff.max()),
                             "max_rel": float((diff / np.maximum(np.abs(a), 1e-6)).max()),
                             "greedy_agree": float((a.argmax(-1) == b.argmax(-1)).mean())})
        ids = a.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    return result
