"""What the generator needs from a backend: a cache for a batch, and one forward pass over it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .exported import ExportedModel
from .kv_cache import KVCache


class Decoder(ABC):
    model: ExportedModel

    @abstractmethod
    def new_cache(self, batch: int) -> KVCache:
        """An empty owner-only cache (past length 0) for `batch` sequences."""

    @abstractmethod
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache: KVCache) -> np.ndarray:
        """One forward pass: advance the cache and return all positions' logits [batch, seq, vocab]."""

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: KVCache) -> np.ndarray:
        """One forward pass returning only the last position's logits [batch, vocab]."""
        return self.forward(input_ids, attention_mask, position_ids, cache)[:, -1, :]
