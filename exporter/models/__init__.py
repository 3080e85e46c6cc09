"""One description per architecture, chosen by the Hugging Face config's model_type."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import gpt_neox, llama
from .description import DecoderDescription, Layer, Linear, Norm, UnsupportedModelError

READERS: dict[str, Callable[..., DecoderDescription]] = {
    "gpt_neox": gpt_neox.describe,
    "llama": llama.describe,
    "qwen2": llama.describe,
}


def describe(config, weights: dict[str, torch.Tensor]) -> DecoderDescription:
    """Read a decoder description from a Hugging Face config and its (float32) state dict."""
    reader = READERS.get(config.model_type)
    if reader is None:
        raise UnsupportedModelError(
            f"architecture '{config.model_type}' is not supported: kvexport exports {', '.join(sorted(READERS))}"
        )
    return reader(config, {name: tensor.float() for name, tensor in weights.items()})


__all__ = ["READERS", "DecoderDescription", "Layer", "Linear", "Norm", "UnsupportedModelError", "describe"]
