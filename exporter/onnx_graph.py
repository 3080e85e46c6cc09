"""Build the ONNX decoder graph with the compacted KV signature from a DecoderDescription.

Inputs: input_ids, attention_mask, position_ids, past_key_values.{i}.key|value for owner layers i.
Outputs: logits (float32), present.{i}.key|value for owner layers i. Shared layers project only their
queries and attend over their owner's present K/V. The dynamic graph uses standard ONNX ops (opset 17) only, so
that ONNX Runtime and TensorRT's parser both take it, unless its projections are quantized (MatMulNBits).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from kvexport.runtime.kv_cache import cache_element_type
from kvexport.strategies import Strategy
from kvexport.strategies import contract as c

from .cache_codes import QuantizedCache
from .models import BlockQuantized, DecoderDescription, Layer, Linear, Norm, UnsupportedModelError
from .onnx_weights import WeightFile, converted
from .quantize import packed, quantize
from .reference import MASKED

OPSET = 17
FLOAT8_OPSET = 19  # Cast to and from float8 types: the dynamic graph of a float8 cache
IR_VERSION = 9
ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
NUMPY_TYPES = {"float32": np.float32, "float16": np.float16}


class GraphBuilder:
    """Appends nodes and initializers with unique names; each op call returns its output name(s). Weights go to
    the export's external-data file as they are added; small constants stay in the graph."""

    def __init__(self, dtype: str, weights: WeightFile, opset: int = OPSET):
        self.dtype, self.weights, self.opset = dtype, weights, opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple, str] = {}
        self._weight_names: set[str] = set()
        self._count = 0

    def _unique(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def weight(self, name: str, tensor: torch.Tensor | np.ndarray, dtype: str | None = None) -> str:
        """An initializer of the graph (in the graph's dtype unless `dtype` is given), once however often it is
        used (names identify values)."""
        if name not in self._weight_names:
            self._weight_names.add(name)
            self.initializers.append(self.weights.initializer(name, tensor, dtype or self.dtype))
        return name

    def quantized(self, name: str, weight: torch.Tensor, fmt: BlockQuantized) -> tuple[str, str]:
        """MatMulNBits' packed codes and scales (in the graph's dtype) of a weight [in, out], quantized on the
        weight file's threads."""
        outputs, blocks = weight.shape[1], weight.shape[0] // fmt.block

        def compute() -> list[np.ndarray]:
            codes, scales = quantize(weight, fmt)
            return [packed(codes, fmt), converted(scales.reshape(-1), self.dtype)]

        names = [f"{name}.q{fmt.bits}", f"{name}.scales"]
        shapes = [(outputs, blocks, fmt.block * fmt.bits // 8), (outputs * blocks,)]
        self.initializers += self.weights.derived(names, shapes, ["uint8", self.dtype], compute)
        return names[0], names[1]

    def const(self, values, dtype=np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self._unique("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def reduce_mean(self, x: str, axis: int) -> str:
        """The mean over one axis, kept; its axes an input from opset 18 on, an attribute before."""
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.const([axis]), keepdims=1)
        return self.op("ReduceMean", x, axes=[axis], keepdims=1)

    def op(self, op_type: str, *inputs: str, outputs: int | list[str | None] = 1, **attrs) -> str | list[str]:
        """outputs: a count of new names, or the names (None: a new one; "": an optional output left out)."""
        wanted = [None] * outputs if isinstance(outputs, int) else outputs
        names = [self._unique(op_type.lower()) if name is None else name for name in wanted]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self._unique(op_type), **attrs))
        return names[0] if len(names) == 1 else names


class DecoderGraph:
    """Emits the nodes of one decoder under one strategy.

    static=False: the dynamic graph (prefill and decode, past grows by concatenation).
    static=True: the decode-only graph over preallocated cache buffers (see docs/design.md).
    """

    def __init__(self, description: DecoderDescription, strategy: Strategy, dtype: str, weights: WeightFile,
                 static: bool = False, kv_quant: QuantizedCache | None = None):
        self.d, self.strategy, self.dtype, self.static = description, strategy, dtype, static
        self.kv_quant = kv_quant  # a quantized cache: its element type and scales
        casts_float8 = not static and self.layout().dtype.startswith("float8")  # (static: inside GroupQueryAttention)
        self.g = GraphBuilder(dtype, weights, FLOAT8_OPSET if casts_float8 else OPSET)
        self.positions: str | None = None  # static graph: [batch, seq] int64 from seqlens_k, made when first used
        self._seqlens: str | None = None  # static graph: seqlens_k as int64, made when first used
        self._offsets: tuple[str, str] | None = None  # static graph: (0 .. seq - 1, seq - 1), made when first used
        self._length: str | None = None  # static graph: the input's sequence length, made when first used

    # -- building blocks ---------------------------------------------------------------------------
    def linear(self, x: str, lin: Linear, name: str, bias: bool = True, projection: bool = True,
               column_scale: torch.Tensor | None = None) -> str:
        """x W (+ b; bias=False leaves the bias to the caller, which folds it into a fused kernel). A layer's
        projection (not the LM head) is stored in the description's weight format; column_scale multiplies a float
        W's columns (a quantized W cannot take it exactly: see attention_scale)."""
        fmt = self.d.weight_format if projection else None
        if fmt is None:
            weight = lin.weight if column_scale is None else lin.weight * column_scale
            y = self.g.op("MatMul", x, self.g.weight(f"{name}.weight", weight))
        else:
            inputs, outputs = lin.weight.shape
            assert column_scale is None, name
            codes, scales = self.g.quantized(f"{name}.weight", lin.weight, fmt)
            y = self.g.op("MatMulNBits", x, codes, scales, domain="com.microsoft", K=inputs, N=outputs,
                          bits=fmt.bits, block_size=fmt.block)
        return y if lin.bias is None or not bias else self.g.op("Add", y, self.g.weight(f"{name}.bias", lin.bias))

    def norm(self, x: str, norm: Norm, name: str) -> str:
        g, eps = self.g, self.d.norm_eps
        if self.d.norm == "layernorm":
            return g.op("LayerNormalization", x, g.weight(f"{name}.weight", norm.weight),
                        g.weight(f"{name}.bias", norm.bias), axis=-1, epsilon=eps)
        if self.static:  # ONNX Runtime's RMSNorm kernel (ORT-only graph); it accumulates in float32 itself
            return g.op("SimplifiedLayerNormalization", x, g.weight(f"{name}.weight", norm.weight), axis=-1,
                        epsilon=eps)
        # RMSNorm in float32: squares of fp16 activations overflow.
        x32 = g.op("Cast", x, to=TensorProto.FLOAT)
        mean_square = g.reduce_mean(g.op("Mul", x32, x32), -1)
        rms = g.op("Sqrt", g.op("Add", mean_square, g.const(eps, np.float32)))
        normed = g.op("Cast", g.op("Div", x32, rms), to=ONNX_TYPES[self.dtype])
        return g.op("Mul", normed, g.weight(f"{name}.weight", norm.weight))

    def residual_norm(self, x: str, deltas: list[str], biases: list[torch.Tensor | None], norm: Norm,
                      name: str) -> tuple[str, str]:
        """(norm(s), s) for the residual stream s = x + the deltas, each delta the output of a linear whose bias
        is in `biases`.

        The static graph does it in one ONNX Runtime kernel, Skip(Simplified)LayerNormalization, which also
        adds those biases (its linears leave them out: see build); the dynamic graph keeps standard ops, its
        linears having added their biases.
        """
        g = self.g
        if not self.static:
            for delta in deltas:
                x = g.op("Add", x, delta)
            return self.norm(x, norm, name), x
        delta = deltas[0] if len(deltas) == 1 else g.op("Add", *deltas)
        inputs = [delta, x, g.weight(f"{name}.weight", norm.weight)]
        if self.d.norm == "layernorm":
            inputs.append(g.weight(f"{name}.bias", norm.bias))
        present_biases = [b for b in biases if b is not None]
        if present_biases:
            inputs.append(g.weight(f"{name}.residual_bias", sum(present_biases)))
        op = "SkipLayerNormalization" if self.d.norm == "layernorm" else "SkipSimplifiedLayerNormalization"
        normed, _, _, total = g.op(op, *inputs, outputs=[None, "", "", None], domain="com.microsoft",
                                   epsilon=self.d.norm_eps)
        return normed, total

    def activation(self, x: str) -> str:
        g = self.g
        if self.d.activation == "silu":
            return g.op("Mul", x, g.op("Sigmoid", x))
        # Exact GELU, x * (1 + erf(x / sqrt(2))) * 0.5, in the op order ONNX Runtime fuses into one (Bias)Gelu.
        dtype = NUMPY_TYPES[self.dtype]
        erf = g.op("Erf", g.op("Div", x, g.const(np.sqrt(2.0), dtype)))
        return g.op("Mul", g.op("Mul", x, g.op("Add", erf, g.const(1.0, dtype))), g.const(0.5, dtype))

    def split_heads(self, x: str, heads: int) -> str:
        """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]."""
        shaped = self.g.op("Reshape", x, self.g.const([0, 0, heads, self.d.head_dim]))
        return self.g.op("Transpose", shaped, perm=[0, 2, 1, 3])

    def rotary(self, x: str, cos: str, sin: str, heads: int) -> str:
        """Rotate the leading rotary_dim of each head (rotate-half form): x is [batch, heads, seq, head_dim], or
        in the static graph [batch, 1, heads * head_dim]."""
        g, rot, head_dim = self.g, self.d.rotary_dim, self.d.head_dim
        if self.static:  # ONNX Runtime's fused kernel (ORT-only graph), at each row's own position
            if self.positions is None:
                # Compact rows: the new tokens sit at seqlens_k + 1 - seq .. seqlens_k; a right-padded first prompt
                # (seqlens_k + 1 < seq) at 0 .., as GroupQueryAttention places them.
                offsets, last = self.chunk_offsets()
                row_last = g.op("Unsqueeze", self.seqlens(), g.const([1]))
                first = g.op("Max", g.op("Sub", row_last, last), g.const([0]))
                self.positions = g.op("Add", first, offsets)
            return g.op("RotaryEmbedding", x, self.positions, cos, sin, domain="com.microsoft", interleaved=0,
                        num_heads=heads, rotary_embedding_dim=rot if rot < head_dim else 0)
        if rot < head_dim:
            rotated_part, rest = g.op("Split", x, g.const([rot, head_dim - rot]), axis=-1, outputs=2)
        else:
            rotated_part, rest = x, None
        first, second = g.op("Split", rotated_part, g.const([rot // 2, rot // 2]), axis=-1, outputs=2)
        half_turn = g.op("Concat", g.op("Neg", second), first, axis=-1)
        out = g.op("Add", g.op("Mul", rotated_part, cos), g.op("Mul", half_turn, sin))
        return out if rest is None else g.op("Concat", out, rest, axis=-1)

    # -- the graph ---------------------------------------------------------------------------------
    def rotary_tables(self) -> tuple[str, str]:
        """cos/sin tables computed in float64 at export time: for the static graph, [max_positions,
        rotary_dim / 2] as ONNX Runtime's RotaryEmbedding takes them; otherwise gathered by position_ids into
        [batch, 1, seq, rotary_dim]."""
        d, g = self.d, self.g
        inv_freq = 1.0 / (d.rope_theta ** (np.arange(0, d.rotary_dim, 2, dtype=np.float64) / d.rotary_dim))
        angles = np.arange(d.max_positions, dtype=np.float64)[:, None] * inv_freq
        if self.static:
            return g.weight("rotary.cos_half", np.cos(angles)), g.weight("rotary.sin_half", np.sin(angles))
        angles = np.concatenate([angles, angles], axis=-1)
        tables = []
        for name, values in (("rotary.cos", np.cos(angles)), ("rotary.sin", np.sin(angles))):
            gathered = g.op("Gather", g.weight(name, values), c.POSITION_IDS, axis=0)
            tables.append(g.op("Unsqueeze", gathered, g.const([1])))
        return tables[0], tables[1]

    def attention_bias(self) -> str:
        """[batch, 1, seq, total]: 0 where a query may attend a key, MASKED elsewhere.

        float32, for the float32 softmax. (The static graph needs none: see attend_fused.)
        """
        g = self.g
        seq = g.op("Gather", g.op("Shape", c.INPUT_IDS), g.const(1), axis=0)
        total = g.op("Gather", g.op("Shape", c.ATTENTION_MASK), g.const(1), axis=0)
        query_pos = g.op("Range", g.op("Sub", total, seq), total, g.const(1))
        key_pos = g.op("Range", g.const(0), total, g.const(1))
        causal = g.op("LessOrEqual", g.op("Unsqueeze", key_pos, g.const([0])),
                      g.op("Unsqueeze", query_pos, g.const([1])))
        not_padding = g.op("Unsqueeze", g.op("Equal", c.ATTENTION_MASK, g.const(1)), g.const([1, 2]))
        return g.op("Where", g.op("And", causal, not_padding), g.const(0.0, np.float32), g.const(MASKED, np.float32))

    def attend(self, q: str, keys: str, values: str, bias: str) -> str:
        """softmax(q k^T * attention_scale + bias) v with the softmax in float32; K/V heads repeated for GQA."""
        g, d = self.g, self.d
        if d.kv_groups > 1:
            expand = g.const([1, 1, d.kv_groups, 1, 1])
            merged = g.const([0, d.num_heads, -1, d.head_dim])
            keys, values = (
                g.op("Reshape", g.op("Expand", g.op("Unsqueeze", t, g.const([2])), expand), merged)
                for t in (keys, values)
            )
        probs = self.softmax(g.op("MatMul", q, g.op("Transpose", keys, perm=[0, 1, 3, 2])), bias)
        context = g.op("Transpose", g.op("MatMul", probs, values), perm=[0, 2, 1, 3])
        return g.op("Reshape", context, g.const([0, 0, d.num_heads * d.head_dim]))

    @property
    def attention_scale(self) -> float:
        """The factor the attention applies to q k^T: 1 where 1/sqrt(head_dim) is folded into the Q weights, which
        quantized weights cannot take exactly (their stored scales would round the product, which the reference
        does not)."""
        return 1.0 if self.d.weight_format is None else self.d.head_dim**-0.5

    def softmax(self, scores: str, bias: str) -> str:
        """softmax(scores * attention_scale + bias) over the last axis, computed in float32."""
        g = self.g
        if self.dtype != "float32":
            scores = g.op("Cast", scores, to=TensorProto.FLOAT)
        if self.attention_scale != 1.0:
            scores = g.op("Mul", scores, g.const(self.attention_scale, np.float32))
        probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
        return probs if self.dtype == "float32" else g.op("Cast", probs, to=ONNX_TYPES[self.dtype])

    def attend_fused(self, h: str, layer: Layer, i: int, cos: str, sin: str,
                     owner_kv: dict[int, tuple[str, str]], appended: Linear | None = None) -> tuple[str, str | None]:
        """Static graph: ONNX Runtime's GroupQueryAttention over the owner's whole cache buffer, which it updates
        in place (the runtime binds present.{i}.* to the same buffer as past_key_values.{owner}.*): it writes the
        new K/V at each row's slot seqlens_k, attends over slots 0..seqlens_k, and reads the cache once.

        A shared layer runs the same op on its owner's buffer, fed the owner's new (unrotated) K/V again: it
        rewrites the values the owner wrote at the same slot, so nothing is copied and the buffer stays right
        (validate_static checks that both writes agree). Rotary runs inside the op where its kernel takes the
        shape (head_dim a multiple of 16, rotary_dim / 2 a multiple of 8), else in RotaryEmbedding before it.
        An owner that no layer shares with passes Q|K|V packed, as one input. Returns (context, the output of
        `appended`, a linear of h run in the same MatMul: see project_qkv).
        """
        d, g = self.d, self.g
        owner = self.strategy.kv_source[i]
        inside = d.head_dim % 16 == 0 and (d.rotary_dim // 2) % 8 == 0
        if self.strategy.is_owner(i) and inside and not self.has_sharers(i):
            (query, extra), key, value = self.project_qkv(h, layer, i, split=False, appended=appended), "", ""
        else:
            q, k, v, extra = self.project_qkv(h, layer, i, appended=appended)
            if not inside:
                q = self.rotary(q, cos, sin, d.num_heads)
                k = None if k is None else self.rotary(k, cos, sin, d.num_kv_heads)
            if k is not None:
                owner_kv[i] = (k, v)
            query, (key, value) = q, owner_kv[owner]
        rotary = (cos, sin) if inside else ("", "") if self.kv_quant else ()
        # a quantized cache: the op quantizes the new K/V with these scales to the cache's element type (that of
        # its past and present) and dequantizes what it reads (inputs 12, 13)
        quantized = ("", "", "", *self.kv_scale_names(owner)) if self.kv_quant else ()
        granularity = "PER_TENSOR" if self.kv_quant and self.kv_quant.per_tensor else "PER_CHANNEL"
        attributes = ({"k_quant_type": granularity, "v_quant_type": granularity, "kv_cache_bit_width": 8}
                      if self.kv_quant else {})
        context, _, _ = g.op(
            "GroupQueryAttention", query, key, value, c.past_name(owner, "key"), c.past_name(owner, "value"),
            c.SEQLENS_K, c.TOTAL_SEQUENCE_LENGTH, *rotary, *quantized,
            outputs=[None, *(c.present_name(i, kind) for kind in c.KV_KINDS)], domain="com.microsoft",
            num_heads=d.num_heads, kv_num_heads=d.num_kv_heads, scale=self.attention_scale, do_rotary=int(inside),
            **attributes)
        return context, extra

    def kv_scale_names(self, owner: int) -> tuple[str, str]:
        """The initializers of an owner's K and V scales (both graphs share them), in float32 whatever the graph's
        dtype: GroupQueryAttention takes its scales so. Per-tensor scales are one initializer, named for K and V
        alike: XQA takes a quantized cache only where both inputs are the same tensor."""
        if self.kv_quant.per_tensor:
            return (self.g.weight(f"layers.{owner}.attn.kv_scale", self.kv_quant.scales[owner][0], "float32"),) * 2
        return tuple(self.g.weight(f"layers.{owner}.attn.{kind}_scale", scale, "float32")
                     for kind, scale in zip(c.KV_KINDS, self.kv_quant.scales[owner], strict=True))

    def cached(self, i: int, kind: str, new: str) -> str:
        """Dynamic graph: an owner's present K or V, past then new. With a quantized cache the past is dequantized,
        the whole quantized again as present (the past's values are on the grid: unchanged), and the attention
        reads the present dequantized, as GroupQueryAttention does in the static graph: in float32, with the
        float32 scales, whatever the graph's dtype."""
        g, past, present = self.g, c.past_name(i, kind), c.present_name(i, kind)
        if not self.kv_quant:
            return g.op("Concat", past, new, axis=2, outputs=[present])
        scale = self.kv_scale_names(i)[c.KV_KINDS.index(kind)]
        fp32 = ONNX_TYPES["float32"]
        new = new if self.dtype == "float32" else g.op("Cast", new, to=fp32)
        whole = g.op("Div", g.op("Concat", g.op("Mul", g.op("Cast", past, to=fp32), scale), new, axis=2), scale)
        element = self.kv_quant.element
        low, high = (g.const(limit, np.float32) for limit in self.kv_quant.limits)
        codes = g.op("Clip", g.op("Round", whole) if element == "int8" else whole, low, high)  # float8: Cast rounds
        g.op("Cast", codes, to=cache_element_type(element), outputs=[present])
        values = g.op("Mul", g.op("Cast", present, to=fp32), scale)
        return values if self.dtype == "float32" else g.op("Cast", values, to=ONNX_TYPES[self.dtype])

    def has_sharers(self, owner: int) -> bool:
        return any(source == owner for j, source in enumerate(self.strategy.kv_source) if j != owner)

    def project_qkv(self, h: str, layer: Layer, i: int, split: bool = True, appended: Linear | None = None):
        """(q, k, v, extra) from one MatMul: owners project Q|K|V (split=False: (packed Q|K|V, extra)), shared layers
        only Q (k and v None: no K/V weights exist for them). `appended` is a further linear of the same input run
        in the same MatMul (a parallel-residual layer's MLP up projection, see fold_parallel_norms); extra is its
        output, or None.

        The attention scale 1/sqrt(head_dim) is folded into float Q weights (rotary is linear, so it commutes):
        one multiplication less per layer and step. Quantized Q weights keep it out (see attention_scale).
        """
        scale = self.d.head_dim**-0.5 / self.attention_scale  # the part of 1/sqrt(head_dim) the Q weights take
        q = Linear(layer.q.weight, None if layer.q.bias is None else layer.q.bias * scale)
        owner = self.strategy.is_owner(i)
        parts = [q, layer.k, layer.v] if owner else [q]
        column_scale = None
        if scale != 1.0:
            column_scale = torch.ones(sum(lin.weight.shape[1] for lin in parts) + (
                0 if appended is None else appended.weight.shape[1]))
            column_scale[:q.weight.shape[1]] = scale
        widths = [lin.weight.shape[1] for lin in parts] if split else [sum(lin.weight.shape[1] for lin in parts)]
        if appended is not None:
            parts.append(appended)
            widths.append(appended.weight.shape[1])
        name = f"layers.{i}." + ("in_proj" if appended is not None else "attn.qkv_proj" if owner else "attn.q_proj")
        out = self.linear(h, concat_linears(parts), name, column_scale=column_scale)
        pieces = [out] if len(widths) == 1 else self.g.op("Split", out, self.g.const(widths), axis=-1,
                                                           outputs=len(widths))
        extra = pieces.pop() if appended is not None else None
        if not split:
            return pieces[0], extra
        q_out, k_out, v_out = pieces if owner else (pieces[0], None, None)
        return q_out, k_out, v_out, extra

    def mlp(self, h: str, layer: Layer, i: int, down_bias: bool = True) -> str:
        """down(act(up(h))), or SwiGLU's down(act(gate(h)) * up(h)) with gate|up packed in one MatMul."""
        if layer.gate is None:
            inner = self.activation(self.linear(h, layer.up, f"layers.{i}.mlp.up_proj"))
        else:
            gate_up = self.linear(h, concat_linears([layer.gate, layer.up]), f"layers.{i}.mlp.gate_up_proj")
            gate, up = self.g.op("Split", gate_up, self.g.const([layer.gate.weight.shape[1], layer.up.weight.shape[1]]),
                                 axis=-1, outputs=2)
            inner = self.g.op("Mul", self.activation(gate), up)
        return self.linear(inner, layer.down, f"layers.{i}.mlp.down_proj", bias=down_bias)

    def build(self) -> onnx.ModelProto:
        d, g = self.d, self.g
        cos, sin = self.rotary_tables()
        bias = None if self.static else self.attention_bias()
        x = g.op("Gather", g.weight("embed_tokens.weight", d.embed), c.INPUT_IDS, axis=0)
        # A parallel-residual layer's two norms fold into its projections (fold_parallel_norms), except where the
        # projections are quantized: a quantized weight cannot absorb a norm's scale exactly.
        folded = d.parallel_residual and d.weight_format is None
        unit = unit_norm(d)
        h = self.norm(x, unit if folded else d.layers[0].input_norm, "layers.0.input_norm")
        fold = self.static  # the output biases go into the fused residual-norm kernel (residual_norm)
        new_kv: dict[int, tuple[str, str]] = {}  # owner -> this step's (k, v), static graph
        present: dict[int, tuple[str, str]] = {}  # owner -> past + new, dynamic graph
        for i, layer in enumerate(d.layers):
            block = fold_parallel_norms(layer, self.strategy.is_owner(i)) if folded else layer
            appended = block.up if folded else None
            if self.static:
                context, up = self.attend_fused(h, block, i, cos, sin, new_kv, appended)
            else:
                q, k, v, up = self.project_qkv(h, block, i, appended=appended)
                q = self.rotary(self.split_heads(q, d.num_heads), cos, sin, d.num_heads)
                if k is not None:
                    k = self.rotary(self.split_heads(k, d.num_kv_heads), cos, sin, d.num_kv_heads)
                    v = self.split_heads(v, d.num_kv_heads)
                    present[i] = tuple(self.cached(i, kind, new) for kind, new in zip(c.KV_KINDS, (k, v)))
                context = self.attend(q, *present[self.strategy.kv_source[i]], bias)
            if d.parallel_residual and not folded:  # the MLP's own norm of the same input
                up = self.linear(self.norm(x, layer.post_attention_norm, f"layers.{i}.post_attention_norm"),
                                 layer.up, f"layers.{i}.mlp.up_proj")
            last = i + 1 == len(d.layers)
            following, following_name = ((d.final_norm, "final_norm") if last else
                                         (unit if folded else d.layers[i + 1].input_norm,
                                          f"layers.{i + 1}.input_norm"))
            if d.parallel_residual:
                # The attention's output projection and the MLP's down projection as one MatMul over their
                # inputs side by side: x + context Wo + act(up) Wdown = x + [context, act(up)] [Wo; Wdown].
                out = concat_linears([layer.o, layer.down], axis=0)
                inputs = g.op("Concat", context, self.activation(up), axis=-1)
                delta = self.linear(inputs, out, f"layers.{i}.out_proj", bias=not fold)
                h, x = self.residual_norm(x, [delta], [out.bias], following, following_name)
            else:
                attn = self.linear(context, layer.o, f"layers.{i}.attn.o_proj", bias=not fold)
                h, x = self.residual_norm(x, [attn], [layer.o.bias], layer.post_attention_norm,
                                          f"layers.{i}.post_attention_norm")
                mlp = self.mlp(h, layer, i, down_bias=not fold)
                h, x = self.residual_norm(x, [mlp], [layer.down.bias], following, following_name)
        logits = self.linear(self.kept_positions(h), d.lm_head, "lm_head", projection=False)
        g.op("Cast", logits, to=TensorProto.FLOAT, outputs=[c.LOGITS])
        d.release()
        return self._model()

    def seqlens(self) -> str:
        """seqlens_k as int64 [batch] (static graph)."""
        if self._seqlens is None:
            self._seqlens = self.g.op("Cast", c.SEQLENS_K, to=TensorProto.INT64)
        return self._seqlens

    def chunk_length(self) -> str:
        """The input's sequence length as int64 [1], from its shape: ONNX Runtime keeps it on the host."""
        if self._length is None:
            self._length = self.g.op("Gather", self.g.op("Shape", c.INPUT_IDS), self.g.const([1]), axis=0)
        return self._length

    def chunk_offsets(self) -> tuple[str, str]:
        """0 .. seq - 1 [seq] and seq - 1 [1] as int64 on the device (static graph): sliced from a constant range
        by the input's shape, which ONNX Runtime reads on the host when it launches the Slice. Values computed on
        the host from the shape and copied to the device would be read from a host buffer that a replayed CUDA
        graph (one per prefill shape) finds overwritten by the last run of another shape."""
        if self._offsets is None:
            g = self.g
            offsets = g.op("Slice", g.const(np.arange(self.d.max_positions, dtype=np.int64)), g.const([0]),
                           self.chunk_length(), g.const([0]))
            self._offsets = offsets, g.op("Slice", offsets, g.const([-1]), g.const([np.iinfo(np.int64).max]),
                                          g.const([0]))
        return self._offsets

    def kept_positions(self, h: str) -> str:
        """The positions whose logits are computed: the last logits_to_keep ones in the dynamic graph (0: all, for
        evaluation); one per row in the static graph (it generates), given by the runtime as flat indices
        (logits_index): the last token of a decode step or of a prompt chunk appended to a row, and the last real
        token of a right-padded first prompt. The full-vocabulary logits of every prompt position would otherwise be
        the largest tensor of a prefill.

        The static graph picks them with one Gather over the flattened tokens: computing the positions in the graph
        from seqlens_k took four small device kernels per step (Slice, Min, Expand, GatherElements), and a decode
        step's indices never change (row b's one token is b), so the runtime writes them once per batch size."""
        g = self.g
        if not self.static:
            return g.op("Slice", h, g.op("Neg", c.LOGITS_TO_KEEP), g.const([np.iinfo(np.int64).max]), g.const([1]))
        flat = g.op("Reshape", h, g.const([-1, self.d.hidden_size]))  # [batch * seq, hidden]: no copy
        return g.op("Unsqueeze", g.op("Gather", flat, c.LOGITS_INDEX, axis=0), g.const([1]))  # [batch, 1, hidden]

    def _model(self) -> onnx.ModelProto:
        d, static = self.d, self.static
        kv_type = cache_element_type(self.layout().dtype)
        value_info = helper.make_tensor_value_info
        past_dims = [c.BATCH, d.num_kv_heads, c.CACHE if static else c.PAST, d.head_dim]
        present_dims = [c.BATCH, d.num_kv_heads, c.CACHE if static else c.TOTAL, d.head_dim]
        inputs = [value_info(c.INPUT_IDS, TensorProto.INT64, [c.BATCH, c.SEQUENCE])]
        if static:
            inputs += [value_info(c.SEQLENS_K, TensorProto.INT32, [c.BATCH]),
                       value_info(c.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [1]),
                       value_info(c.LOGITS_INDEX, TensorProto.INT32, [c.BATCH])]
        else:
            inputs += [value_info(c.ATTENTION_MASK, TensorProto.INT64, [c.BATCH, c.TOTAL]),
                       value_info(c.POSITION_IDS, TensorProto.INT64, [c.BATCH, c.SEQUENCE]),
                       value_info(c.LOGITS_TO_KEEP, TensorProto.INT64, [1])]
        inputs += [value_info(past, kv_type, past_dims) for past, _ in self.layout().names()]
        outputs = [value_info(c.LOGITS, TensorProto.FLOAT, [c.BATCH, 1 if static else c.KEPT, d.vocab_size])]
        present_layers = range(d.num_layers) if static else self.strategy.owners
        outputs += [value_info(c.present_name(i, kind), kv_type, present_dims)
                    for i in present_layers for kind in c.KV_KINDS]
        graph = helper.make_graph(self.g.nodes, "kvexport_decoder", inputs, outputs, self.g.initializers)
        contrib = static or d.weight_format is not None  # GroupQueryAttention and friends; MatMulNBits
        opsets = [helper.make_opsetid("", self.g.opset)]
        opsets += [helper.make_opsetid("com.microsoft", 1)] if contrib else []
        model = helper.make_model(graph, opset_imports=opsets, producer_name="kvexport", ir_version=IR_VERSION)
        helper.set_model_props(model, {"kvexport.strategy": json.dumps(self.strategy.to_dict()),
                                       "kvexport.dtype": self.dtype,
                                       "kvexport.variant": "static_decode" if static else "dynamic"})
        return model

    def layout(self) -> c.CacheLayout:
        return cache_layout(self.d, self.strategy, self.dtype, self.kv_quant)


def concat_linears(parts: list[Linear], axis: int = 1) -> Linear:
    """Linears as one: of one input side by side (axis=1: their outputs concatenated), or of inputs side by side
    summed (axis=0: their weights stacked, their biases added)."""
    if len(parts) == 1:
        return parts[0]
    weight = torch.cat([lin.weight for lin in parts], dim=axis)
    if all(lin.bias is None for lin in parts):
        return Linear(weight)
    biases = [torch.zeros(lin.weight.shape[1]) if lin.bias is None else lin.bias.float() for lin in parts]
    return Linear(weight, torch.cat(biases) if axis == 1 else sum(biases))


# The unit norm's bias in every dimension, which carries a parallel-residual block's projection biases (see
# fold_parallel_norms): a power of two, small so that adding it keeps a float16 n(x)'s precision (relative logit
# error of a float16 pythia-160m-shape export: 1.3e-3 with 1/8, 1.1e-3 with the biases added, 5.5e-3 with 1).
MEAN_CARRIER = 2.0**-3


def unit_norm(description: DecoderDescription) -> Norm:
    """What a parallel-residual block keeps of its norms once fold_parallel_norms has moved their weights and
    biases into the projections: weight 1 and, for LayerNorm, bias MEAN_CARRIER in every dimension."""
    ones = torch.ones(description.hidden_size)
    return Norm(ones, ones * MEAN_CARRIER if description.norm == "layernorm" else None)


def fold_parallel_norms(layer: Layer, owner: bool) -> Layer:
    """A parallel-residual layer's two norms normalise the same input and differ only in weight and bias, so each
    folds into the projections it feeds: (n(x) * w + b) W + c = n(x) (w^T * W) + (b W + c). Then one normalisation
    feeds one MatMul for Q|K|V and the MLP's up projection (GPT-NeoX: one norm and one MatMul less per layer),
    LayerNorm's biases included. A shared layer (owner False) keeps its unused K/V projections as they are."""

    def fold(lin: Linear, norm: Norm) -> Linear:
        weight = lin.weight.float()
        bias = torch.zeros(weight.shape[1]) if lin.bias is None else lin.bias.float()
        if norm.bias is None:  # RMSNorm: the bias stays an Add
            return Linear(norm.weight.float()[:, None] * weight, bias)
        # LayerNorm's n(x) has zero mean, so the unit norm's output is n + c with c = MEAN_CARRIER in every
        # dimension and, with H the hidden size, (n + c) (W - 1 mean(W) + 1 b / (c H)) = n W + b: the bias rides in
        # the MatMul (one Add less per layer).
        bias = bias + norm.bias.float() @ weight
        weight = norm.weight.float()[:, None] * weight
        return Linear(weight - weight.mean(dim=0, keepdim=True) + bias / (MEAN_CARRIER * weight.shape[0]))

    attention, mlp = layer.input_norm, layer.post_attention_norm
    key_value = {"k": fold(layer.k, attention), "v": fold(layer.v, attention)} if owner else {}
    return replace(layer, q=fold(layer.q, attention), up=fold(layer.up, mlp), **key_value)


def cache_layout(description: DecoderDescription, strategy: Strategy, dtype: str,
                 kv_quant: QuantizedCache | None = None) -> c.CacheLayout:
    """The cache of an export in `dtype`: its elements in that dtype, or those of its quantized cache."""
    return c.CacheLayout(owners=strategy.owners, num_layers=description.num_layers,
                         num_kv_heads=description.num_kv_heads, head_dim=description.head_dim,
                         dtype=kv_quant.element if kv_quant else dtype)


def build_decoder(description: DecoderDescription, strategy: Strategy, dtype: str, weights: WeightFile,
                  static: bool = False, kv_quant: QuantizedCache | None = None) -> onnx.ModelProto:
    """The dynamic graph, or with static=True the decode-only graph over preallocated cache buffers; their weights
    are appended to `weights` (shared by both graphs of an export). kv_quant: a quantized cache."""
    if dtype not in ONNX_TYPES:
        raise ValueError(f"dtype must be one of {sorted(ONNX_TYPES)}")
    if static and description.head_dim % 8:
        raise UnsupportedModelError(f"the static decode graph needs a head dim that is a multiple of 8 (ONNX "
                                    f"Runtime's GroupQueryAttention); this model's is {description.head_dim}: "
                                    "export without --static")
    return DecoderGraph(description, strategy, dtype, weights, static, kv_quant).build()
