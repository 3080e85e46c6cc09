"""Next-token choice from logits: greedy, temperature, top-k, top-p, seeded.

Written in torch so that it runs where the logits are: on the GPU, only the chosen token ids leave the device.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from kvexport.strategies import InputError


def is_integer(value) -> bool:
    """An int or numpy integer, not a bool (True is an int in Python, never a meant token id or count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


GREEDY_BELOW = 1e-5


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Every setting is checked here, so a bad one is refused before anything runs."""
        if not is_integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer of at least 1, got {self.max_new_tokens!r}")
        if not is_finite_real(self.temperature) or self.temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if not is_finite_real(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if self.seed is not None and not is_integer(self.seed):
            raise InputError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not all(map(is_integer, self.stop_token_ids)):
            raise InputError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures this close to 0 are greedy: dividing by them overflows the logits (as in vLLM)."""
        return self.temperature < GREEDY_BELOW

    def generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def choose_tokens(logits, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [batch, vocab] (numpy or torch, any device) -> token ids [batch] on the same device."""
    logits = torch.as_tensor(logits)
    if config.greedy:
        return logits.argmax(-1)
    scaled = logits.float() / config.temperature
    if config.top_k and config.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, config.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= config.top_p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
