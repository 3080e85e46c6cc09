"""The owner-only KV cache: one key and one value buffer per owner layer, none for shared layers."""

from __future__ import annotations

from typing import Any

import torch

from kvexport.strategies import CacheLayout

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}  # cache element dtypes


class KVCache:
    """Holds the past K/V that the next step reads, keyed by graph input name.

    The values are whatever the backend binds (numpy arrays on the CPU, device OrtValues on CUDA); the
    cache only knows the contract: which names exist and how many bytes they hold.
    """

    def __init__(self, layout: CacheLayout):
        self.layout = layout
        self.batch = 0
        self.length = 0
        self.values: dict[str, Any] = {}

    def reset(self, batch: int, empty_buffers: dict[str, Any]) -> None:
        missing = {past for past, _ in self.layout.names()} ^ set(empty_buffers)
        if missing:
            raise ValueError(f"cache buffers do not match the export's owners: {sorted(missing)}")
        self.batch, self.length, self.values = batch, 0, dict(empty_buffers)

    def update(self, presents: dict[str, Any], new_tokens: int) -> None:
        """Take this step's presents (by present name) as the next step's pasts."""
        self.values = {past: presents[present] for past, present in self.layout.names()}
        self.length += new_tokens

    @property
    def bytes_in_use(self) -> int:
        return self.batch * self.length * self.layout.bytes_per_token()

    @property
    def full_cache_bytes(self) -> int:
        """What the same batch and length would hold if every layer kept its own cache."""
        return self.batch * self.length * self.layout.full_bytes_per_token
