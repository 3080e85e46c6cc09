"""One description per architecture, chosen by the Hugging Face config's model_type."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import gpt_neox, llama
from .description import DecoderDescription, Layer, LazyLayers, Linear, Norm, UnsupportedModelError

READERS: dict[str, Callable[..., DecoderDescription]] = {
    "gpt_neox": gpt_neox.describe,
    "llama": llama.describe,
    "qwen2": llama.describe,
}


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


__all__ = ["READERS", "DecoderDescription", "Layer", "LazyLayers", "Linear", "Norm", "UnsupportedModelError", "describe"]
