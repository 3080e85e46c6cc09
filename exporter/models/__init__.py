"""One description per architecture, chosen by the Hugging Face config's model_type."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import gpt_neox, llama
from .description import (
    BlockQuantized,
    DecoderDescription,
    Layer,
    LazyLayers,
    Linear,
    LowRank,
    Norm,
    UnsupportedModelError,
)

READERS: dict[str, Callable[..., DecoderDescription]] = {
    "gpt_neox": gpt_neox.describe,
    "llama": llama.describe,
    "qwen2": llama.describe,
}


WRITERS: dict[str, Callable[[DecoderDescription], dict[str, torch.Tensor]]] = {
    "gpt_neox": gpt_neox.state_dict,
    "llama": llama.state_dict,
    "qwen2": llama.state_dict,
}


def state_dict(description: DecoderDescription) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of a description, contiguous, that transformers loads as its architecture."""
    return {name: t.contiguous() for name, t in WRITERS[description.architecture](description).items()}


def describe(config, weights: dict[str, torch.Tensor], release: Callable[[], None] = lambda: None
             ) -> DecoderDescription:
    """A decoder description from a Hugging Face config and its tensors (any dtype; views are not copied).
    `release` is called between layers of a pass (Checkpoint.release)."""
    reader = READERS.get(config.model_type)
    if reader is None:
        raise UnsupportedModelError(
            f"architecture '{config.model_type}' is not supported: kvexport exports {', '.join(sorted(READERS))}"
        )
    return reader(config, weights, release)


__all__ = ["READERS", "WRITERS", "BlockQuantized", "DecoderDescription", "Layer", "LazyLayers", "Linear", "LowRank",
           "Norm", "UnsupportedModelError", "describe", "state_dict"]
