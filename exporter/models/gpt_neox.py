"""GPT-NeoX (Pythia): parallel residual, partial rotary, LayerNorm with bias, fused QKV, GELU MLP.

transformers has no grouped-query attention for GPT-NeoX, so a model with fewer KV heads (kvexport compress-heads)
is stored as the multi-head model it equals: each KV head repeated for its group's query heads, and
`num_key_value_heads` in the config. transformers runs it as it is; kvexport reads each KV head once.
"""

from __future__ import annotations

import torch

from .description import DecoderDescription, Layer, LazyLayers, Linear, Norm, UnsupportedModelError, rope_settings


def describe(config, weights: dict[str, torch.Tensor], release=lambda: None) -> DecoderDescription:
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = hidden // heads
    if heads % kv_heads:
        raise UnsupportedModelError(f"num_key_value_heads {kv_heads} does not divide the {heads} attention heads")
    if config.hidden_act not in ("gelu", "gelu_python"):
        raise UnsupportedModelError(f"GPT-NeoX with activation '{config.hidden_act}' is not supported (only exact gelu)")
    theta, fraction = rope_settings(config, default_theta=10000.0, default_fraction=0.25)
    prefix = "gpt_neox."

    def norm(name: str) -> Norm:
        return Norm(weights[f"{name}.weight"], weights[f"{name}.bias"])

    def linear(name: str) -> Linear:
        return Linear.from_hf(weights[f"{name}.weight"], weights.get(f"{name}.bias"))

    def layer(i: int) -> Layer:
        p = f"{prefix}layers.{i}."
        # The fused projection interleaves per head: rows are [head][q|k|v][head_dim].
        fused_w = weights[p + "attention.query_key_value.weight"].view(heads, 3, head_dim, hidden)
        fused_b = weights.get(p + "attention.query_key_value.bias")
        fused_b = None if fused_b is None else fused_b.view(heads, 3, head_dim)
        q = Linear.from_hf(fused_w[:, 0].reshape(heads * head_dim, hidden),
                           None if fused_b is None else fused_b[:, 0].reshape(-1))
        k, v = (Linear.from_hf(kv_heads_of(fused_w[:, j], i), None if fused_b is None else
                               kv_heads_of(fused_b[:, j], i).reshape(-1)) for j in (1, 2))
        return Layer(
            input_norm=norm(p + "input_layernorm"), post_attention_norm=norm(p + "post_attention_layernorm"),
            q=q, k=k, v=v, o=linear(p + "attention.dense"),
            up=linear(p + "mlp.dense_h_to_4h"), down=linear(p + "mlp.dense_4h_to_h"),
        )

    def kv_heads_of(rows: torch.Tensor, layer: int) -> torch.Tensor:
        """[heads, head_dim, ...] -> [kv_heads * head_dim, ...]: the mean of each group's repeated copies (the
        same values; the mean lets training through the description update every copy alike)."""
        if kv_heads == heads:
            return rows.reshape(heads * head_dim, *rows.shape[2:])
        groups = rows.unflatten(0, (kv_heads, heads // kv_heads))
        mean = groups.float().mean(1, keepdim=True)
        if (groups - mean).abs().max() > 1e-3 * mean.abs().max():
            raise UnsupportedModelError(
                f"layer {layer}: the config says {kv_heads} KV heads, but the K/V projections of grouped heads "
                "differ (the checkpoint was changed as a multi-head model): remove num_key_value_heads from "
                "config.json to export it as multi-head attention")
        return mean.squeeze(1).to(rows.dtype).reshape(kv_heads * head_dim, *rows.shape[2:])

    if prefix + "embed_in.weight" not in weights:
        raise UnsupportedModelError("the checkpoint has no gpt_neox.embed_in.weight: it is not a GPT-NeoX causal LM "
                                    "checkpoint (GPTNeoXForCausalLM.save_pretrained writes one)")
    head = "embed_out" if "embed_out.weight" in weights else "lm_head"  # transformers 5 renamed embed_out
    return DecoderDescription(
        architecture="gpt_neox", num_layers=config.num_hidden_layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings, rotary_dim=int(head_dim * fraction), rope_theta=theta,
        norm="layernorm", norm_eps=config.layer_norm_eps, activation="gelu",
        parallel_residual=config.use_parallel_residual, embed=weights[prefix + "embed_in.weight"],
        layers=LazyLayers(config.num_hidden_layers, layer, release), final_norm=norm(prefix + "final_layer_norm"),
        lm_head=linear(head), release=release,
    )


def state_dict(d: DecoderDescription) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-NeoX tensors of a description (describe's inverse), KV heads repeated per group."""
    heads, hd, p = d.num_heads, d.head_dim, "gpt_neox."

    def per_head(t: torch.Tensor, count: int) -> torch.Tensor:  # [count * hd, ...] -> [heads, hd, ...]
        return t.unflatten(0, (count, hd)).repeat_interleave(heads // count, dim=0)

    state = {p + "embed_in.weight": d.embed, p + "final_layer_norm.weight": d.final_norm.weight,
             p + "final_layer_norm.bias": d.final_norm.bias, **d.lm_head.to_hf("lm_head")}
    for i, layer in enumerate(d.layers):
        prefix = f"{p}layers.{i}."
        qkv = (layer.q, heads), (layer.k, d.num_kv_heads), (layer.v, d.num_kv_heads)
        state[prefix + "attention.query_key_value.weight"] = torch.stack(
            [per_head(lin.weight.t(), n) for lin, n in qkv], dim=1).flatten(0, 2)
        if layer.q.bias is not None:
            state[prefix + "attention.query_key_value.bias"] = torch.stack(
                [per_head(lin.bias, n) for lin, n in qkv], dim=1).flatten()
        for name, norm in (("input_layernorm", layer.input_norm), ("post_attention_layernorm",
                                                                   layer.post_attention_norm)):
            state[prefix + name + ".weight"], state[prefix + name + ".bias"] = norm.weight, norm.bias
        for name, lin in (("attention.dense", layer.o), ("mlp.dense_h_to_4h", layer.up),
                          ("mlp.dense_4h_to_h", layer.down)):
            state.update(lin.to_hf(prefix + name))
    return state
