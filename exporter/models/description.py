"""An architecture-neutral decoder: explicit weights and the few switches that tell architectures apart.

Each architecture's reader (gpt_neox.py, llama.py) fills one of these from a Hugging Face config and state
dict; the ONNX builder and the PyTorch reference both work from it, so they cannot drift apart.
Linear weights are stored as [in_features, out_features] so that y = x @ W + b. Tensors keep the checkpoint's
dtype and may be views of a memory-mapped file: consumers cast what they use, and never write into them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from kvexport.strategies import KvexportError


class UnsupportedModelError(KvexportError):
    """A model kvexport cannot export, with what to do instead."""


@dataclass(frozen=True)
class BlockQuantized:
    """How an export stores the layers' projection weights: `bits`-bit integers with one scale per `block` inputs
    of each output (exporter/quantize.py), run by ONNX Runtime's MatMulNBits. The embeddings, norms and LM head
    keep the export's dtype."""
    bits: int = 4  # 4 or 8
    block: int = 32  # a power of two, at least 16
    scale_dtype: str = "float32"  # what the scales are stored in: the export's dtype, as MatMulNBits takes them

    @property
    def label(self) -> str:
        return f"int{self.bits}"


@dataclass
class LowRank:
    """A trained low-rank update of a linear map (LoRA): y = x @ W + bias + (x @ a) @ b * scale. Only uptraining
    builds these; its output merges them into the weights, so exports never see one."""
    a: torch.Tensor  # [in, rank]
    b: torch.Tensor  # [rank, out]
    scale: float


@dataclass
class Linear:
    weight: torch.Tensor  # [in, out]
    bias: torch.Tensor | None = None
    adapter: LowRank | None = None

    @classmethod
    def from_hf(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        """nn.Linear stores [out, in]; the transpose is a view (the checkpoint is not copied)."""
        return cls(weight.t(), bias)

    def to_hf(self, name: str) -> dict[str, torch.Tensor]:
        """from_hf's inverse: the Hugging Face tensors of the module `name`."""
        return {f"{name}.weight": self.weight.t(), **({} if self.bias is None else {f"{name}.bias": self.bias})}


@dataclass
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor | None = None  # None for RMSNorm


@dataclass
class Layer:
    input_norm: Norm
    post_attention_norm: Norm
    q: Linear
    k: Linear  # kept for every layer; the exporter drops it for shared layers
    v: Linear
    o: Linear
    up: Linear
    down: Linear
    gate: Linear | None = None  # SwiGLU: down(act(gate(x)) * up(x)); None: down(act(up(x)))


class LazyLayers(Sequence[Layer]):
    """Layers read from the checkpoint when they are used, not kept: a pass over a large model holds one layer.

    Iterating returns the checkpoint's pages read for the previous layer (`release`), so a sequential pass (the
    ONNX builder, the reference) keeps about one layer resident.
    """

    def __init__(self, count: int, read: Callable[[int], Layer], release: Callable[[], None] = lambda: None):
        self._count, self._read, self._release = count, read, release

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._read(i) for i in range(self._count)[index]]
        if not -self._count <= index < self._count:
            raise IndexError(index)
        return self._read(index % self._count)

    def __iter__(self) -> Iterator[Layer]:
        for i in range(self._count):
            self._release()
            yield self._read(i)
        self._release()


@dataclass
class DecoderDescription:
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rotary_dim: int  # leading dims of each head that are rotated (GPT-NeoX rotates 25%)
    rope_theta: float
    norm: Literal["layernorm", "rmsnorm"]
    norm_eps: float
    activation: Literal["gelu", "silu"]
    parallel_residual: bool  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    embed: torch.Tensor  # [vocab, hidden]
    layers: Sequence[Layer]  # a list, or LazyLayers read from a checkpoint
    final_norm: Norm
    lm_head: Linear  # [hidden, vocab]
    weight_format: BlockQuantized | None = None  # None: the projections in the export's dtype
    # Returns the checkpoint pages a pass has read (Checkpoint.release); passes call it when they are done.
    release: Callable[[], None] = lambda: None

    @property
    def kv_groups(self) -> int:
        """Query heads per K/V head (1: multi-head attention, >1: grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def parameter_bytes(self, bytes_per_element: int) -> int:
        """Bytes of the weights in an export of that element size (quantized projections: their codes and
        scales)."""
        total = (self.embed.numel() + self.lm_head.weight.numel()) * bytes_per_element
        fmt = self.weight_format
        for layer in self.layers:
            for lin in (layer.q, layer.k, layer.v, layer.o, layer.up, layer.down, layer.gate):
                if lin is None:
                    continue
                elements = lin.weight.numel()
                total += (elements * bytes_per_element if fmt is None else
                          elements * fmt.bits // 8 + elements // fmt.block * bytes_per_element)
                total += 0 if lin.bias is None else lin.bias.numel() * bytes_per_element
        return total


def rope_settings(config, default_theta: float, default_fraction: float) -> tuple[float, float]:
    """(theta, rotated fraction of each head) from a config of the transformers 4.x or 5.x line."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModelError(
            f"RoPE scaling '{rope_type}' is not supported yet: export a model with plain RoPE"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", getattr(config, "rotary_emb_base", default_theta)))
    fraction = params.get("partial_rotary_factor",
                          getattr(config, "partial_rotary_factor", getattr(config, "rotary_pct", default_fraction)))
    return float(theta), float(fraction)
