"""PyTorch reference of a decoder under a KV-sharing strategy: explicit tensors in, explicit tensors out.

It computes what the exported graph computes, op for op, in any dtype (float64 for validation) and on any
device, and can also hand back every layer's K/V and the final hidden state for the strategy search. It is
differentiable where its weights are (kvexport uptrain trains through it); over a checkpoint's tensors no graph
is recorded. Weights are cast when they are used and not kept, so a pass holds one layer's weights in the compute
dtype at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from kvexport.strategies import KvexportError, Strategy

from .cache_codes import QuantizedCache
from .models import DecoderDescription, Layer, Linear, Norm

LINEAR_BLOCK_ELEMENTS = 1 << 25  # weights cast at a time by the reference: 256 MiB in float64
CPU = torch.device("cpu")
MASKED = -1e9  # additive bias for masked keys; finite so fully padded rows stay NaN-free

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ReferenceOutput:
    logits: torch.Tensor  # [batch, seq, vocab]
    present: dict[int, KV]  # owner layer -> (keys, values), each [batch, kv_heads, past + seq, head_dim]
    final_hidden: torch.Tensor  # [batch, seq, hidden], after the final norm
    layer_kv: dict[int, KV] = field(default_factory=dict)  # every layer's own new K/V, when asked for


@dataclass
class LayerInputs:
    x: torch.Tensor  # [batch, seq, hidden], the embeddings
    bias: torch.Tensor  # [batch, 1, seq, total], see attention_bias
    cos: torch.Tensor  # [batch, 1, seq, rotary_dim], see rotary_tables
    sin: torch.Tensor


def attention_bias(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, seq, total] additive bias: causal over absolute positions, and padding from the mask."""
    total = attention_mask.shape[1]
    query_pos = torch.arange(total - seq_len, total, device=attention_mask.device).unsqueeze(1)
    key_pos = torch.arange(total, device=attention_mask.device).unsqueeze(0)
    allowed = (key_pos <= query_pos)[None, None] & (attention_mask[:, None, None, :] == 1)
    return torch.where(allowed, 0.0, MASKED).to(dtype)


def rotary_tables(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype) -> KV:
    """cos and sin, [batch, 1, seq, rotary_dim], in the rotate-half convention."""
    steps = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=position_ids.device)
    inv_freq = 1.0 / (theta ** (steps / rotary_dim))
    freqs = position_ids.to(torch.float64).unsqueeze(-1) * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def compute_device(requested: str | None) -> torch.device:
    """The device a user asked for (cpu or cuda), cuda when there is one by default; a cuda that torch cannot
    reach is a one-line error, not a traceback from the first tensor moved there."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        build = "a build without CUDA" if torch.version.cuda is None else "no GPU visible"
        raise KvexportError(f"--device cuda: torch {torch.__version__} has {build} here: use --device cpu")
    return torch.device(requested)


@contextmanager
def tensor_float32_on(device: torch.device) -> Iterator[None]:
    """TensorFloat-32 matrix products within, on a GPU (float32 ones run several times slower there): for passes
    that compare runs made alike or descend, not for a reference."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if device.type == "cuda" else precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class ReferenceDecoder:
    def __init__(self, description: DecoderDescription, strategy: Strategy, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu", kv_quant: QuantizedCache | None = None):
        """kv_quant: the cache holds each owner's K/V as codes of these scales, as an export with a quantized cache
        does."""
        self.d = description
        self.strategy = strategy
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv_quant = kv_quant

    def _t(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The tensor on the compute device in the compute dtype: moved in its stored dtype and cast there, and a
        transposed view (Linear.from_hf) moved as the contiguous tensor it views, not gathered on the host."""
        if tensor is None:
            return None
        if tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous():
            return tensor.t().to(self.device).to(self.dtype).t()
        return tensor.to(self.device).to(self.dtype)

    def _linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        """x W + b, over blocks of W's columns: a large weight (the LM head) is never cast whole; plus a low-rank
        update's own product, kept apart from W's (merged into a bfloat16 W it would round away)."""
        block = max(1, LINEAR_BLOCK_ELEMENTS // lin.weight.shape[0])
        parts = [x @ self._t(columns) for columns in lin.weight.split(block, dim=1)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if lin.adapter is not None:
            y = y + (x @ self._t(lin.adapter.a)) @ self._t(lin.adapter.b) * lin.adapter.scale
        return y if lin.bias is None else y + self._t(lin.bias)

    def _projection(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        """A layer's projection as the export computes it: with its weight quantized and dequantized where the
        description stores projections quantized."""
        if self.d.weight_format is None:
            return self._linear(x, lin)
        from .quantize import round_trip

        return self._linear(x, replace(lin, weight=round_trip(self._t(lin.weight), self.d.weight_format)))

    def _norm(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        if self.d.norm == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self._t(norm.weight), self._t(norm.bias), self.d.norm_eps)
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.d.norm_eps) * self._t(norm.weight)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x) if self.d.activation == "gelu" else F.silu(x)

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, count, self.d.head_dim).transpose(1, 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: dict[int, KV] | None = None,
        collect_layer_kv: bool = False,
    ) -> ReferenceOutput:
        d = self.d
        inputs = self.prepare(input_ids, attention_mask, position_ids)
        x, present = inputs.x, {}
        layer_kv: dict[int, KV] | None = {} if collect_layer_kv else None
        for i, layer in enumerate(d.layers):
            context = self.attention(i, layer, x, inputs, present, past or {}, layer_kv)
            x = self.residual(layer, x, self.output(layer, context))
        final, logits = self.finish(x)
        d.release()
        return ReferenceOutput(logits, present, final, layer_kv or {})

    def finish(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm's output and the logits, from the residual stream after the last layer."""
        final = self._norm(x, self.d.final_norm)
        return final, self._linear(final, self.d.lm_head)

    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> LayerInputs:
        """The embeddings and what every layer's attention uses: a pass can then be run layer by layer."""
        input_ids, attention_mask, position_ids = (t.to(self.device) for t in (input_ids, attention_mask, position_ids))
        x = self._t(self.d.embed[input_ids.to(self.d.embed.device)])  # only the rows used
        cos, sin = rotary_tables(position_ids, self.d.rotary_dim, self.d.rope_theta, self.dtype)
        return LayerInputs(x, attention_bias(attention_mask, input_ids.shape[1], self.dtype), cos, sin)

    def attention(self, i: int, layer: Layer, x: torch.Tensor, inputs: LayerInputs, present: dict[int, KV],
                  past: dict[int, KV] | None = None, layer_kv: dict[int, KV] | None = None,
                  layer_queries: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Layer i's attention context [batch, seq, heads * head_dim], before its output projection; an owner adds
        its K/V (after `past`'s) to `present`; `layer_kv` / `layer_queries`, when given, get the layer's own."""
        d = self.d
        batch, seq, _ = x.shape
        h = self._norm(x, layer.input_norm)
        q = apply_rotary(self._heads(self._projection(h, layer.q), d.num_heads), inputs.cos, inputs.sin)
        if self.strategy.is_owner(i) or layer_kv is not None:
            k = apply_rotary(self._heads(self._projection(h, layer.k), d.num_kv_heads), inputs.cos, inputs.sin)
            v = self._heads(self._projection(h, layer.v), d.num_kv_heads)
            if layer_kv is not None:
                layer_kv[i] = (k, v)
            if self.strategy.is_owner(i):
                if self.kv_quant:
                    k, v = (self.kv_quant.round_trip(t, scale)
                            for t, scale in zip((k, v), self.kv_quant.scales[i], strict=True))
                if past and i in past:
                    k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
                present[i] = (k, v)
        if layer_queries is not None:
            layer_queries[i] = q
        keys, values = present[self.strategy.kv_source[i]]
        if d.kv_groups > 1:
            keys = keys.repeat_interleave(d.kv_groups, dim=1)
            values = values.repeat_interleave(d.kv_groups, dim=1)
        scores = (q @ keys.transpose(-1, -2)) * d.head_dim**-0.5 + inputs.bias
        context = torch.softmax(scores, dim=-1) @ values
        return context.transpose(1, 2).reshape(batch, seq, d.num_heads * d.head_dim)

    def output(self, layer: Layer, context: torch.Tensor) -> torch.Tensor:
        """The attention's output projection."""
        return self._projection(context, layer.o)

    def residual(self, layer: Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream after the layer, given its attention output."""
        if self.d.parallel_residual:
            return x + attn + self._mlp(self._norm(x, layer.post_attention_norm), layer)
        x = x + attn
        return x + self._mlp(self._norm(x, layer.post_attention_norm), layer)

    def _mlp(self, h: torch.Tensor, layer) -> torch.Tensor:
        if layer.gate is None:
            return self._projection(self._act(self._projection(h, layer.up)), layer.down)
        return self._projection(self._act(self._projection(h, layer.gate)) * self._projection(h, layer.up),
                                layer.down)

