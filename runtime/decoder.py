"""What the generator needs from a backend: a cache for a batch, and one forward pass over it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from .exported import ExportedModel
from .kv_cache import TORCH_DTYPES, KVCache


class Decoder(ABC):
    model: ExportedModel

    @abstractmethod
    def new_cache(self, batch: int) -> KVCache:
        """An empty owner-only cache (past length 0) for `batch` sequences."""

    @abstractmethod
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache: KVCache) -> np.ndarray:
        """One forward pass: advance the cache and return all positions' logits [batch, seq, vocab]."""

    @abstractmethod
    def wrap_past(self, tensor: torch.Tensor):
        """A past K/V tensor as this backend binds it."""

    def random_cache(self, batch: int, length: int, generator: torch.Generator) -> KVCache:
        """A cache holding `length` tokens of random K/V: for timing decode steps without a prefill."""
        layout = self.model.layout
        dtype = TORCH_DTYPES[layout.dtype]
        cache = self.new_cache(batch)
        values = {past: self.wrap_past(torch.randn(layout.buffer_shape(batch, length), generator=generator,
                                                   device=generator.device).to(dtype))
                  for past, _ in layout.names()}
        cache.values, cache.length = values, length
        return cache

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: KVCache) -> np.ndarray:
        """One forward pass returning only the last position's logits [batch, vocab]."""
        return self.forward(input_ids, attention_mask, position_ids, cache)[:, -1, :]
