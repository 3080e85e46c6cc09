"""What the generator needs from a backend: a cache for a batch, and one forward pass over it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from .exported import ExportedModel
from .kv_cache import TORCH_DTYPES, KVCache


class Decoder(ABC):
    model: ExportedModel
    max_batch: int | None = None  # sequences one cache holds; None: no limit of the decoder's own
    max_length: int | None = None  # tokens per sequence the cache holds; None: the model's positions

    @abstractmethod
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache: KVCache, logits_to_keep: int = 0) -> np.ndarray | torch.Tensor:
        """One forward pass: advance the cache and return the last `logits_to_keep` positions' logits (0: all)
        [batch, kept, vocab] (numpy on the host, or a torch tensor where the backend keeps logits on the device)."""

    @abstractmethod
    def wrap_past(self, tensor: torch.Tensor):
        """A past K/V tensor as this backend binds it."""

    def _cache(self, batch: int, length: int, make) -> KVCache:
        layout = self.model.layout
        cache = KVCache(layout)
        shape, dtype = layout.buffer_shape(batch, length), TORCH_DTYPES[layout.dtype]
        cache.reset(batch, {past: self.wrap_past(make(shape).to(dtype)) for past, _ in layout.names()})
        cache.length = length
        return cache

    def new_cache(self, batch: int) -> KVCache:
        """An empty owner-only cache (past length 0) for `batch` sequences."""
        return self._cache(batch, 0, torch.zeros)

    def random_cache(self, batch: int, length: int, generator: torch.Generator) -> KVCache:
        """A cache holding `length` tokens of random K/V: for timing decode steps without a prefill."""
        return self._cache(batch, length, lambda shape: torch.randn(shape, generator=generator,
                                                                    device=generator.device))

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: KVCache) -> np.ndarray | torch.Tensor:
        """One forward pass returning only the last position's logits [batch, vocab]."""
        return self.forward(input_ids, attention_mask, position_ids, cache, logits_to_keep=1)[:, -1, :]
