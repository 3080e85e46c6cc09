"""GPT-NeoX (Pythia): parallel residual, partial rotary, LayerNorm with bias, fused QKV, GELU MLP."""

from __future__ import annotations

import torch

from .description import DecoderDescription, Layer, LazyLayers, Linear, Norm, UnsupportedModelError, rope_settings


def describe(config, weights: dict[str, torch.Tensor], release=lambda: None) -> DecoderDescription:
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
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
        q, k, v = (
            Linear.from_hf(fused_w[:, j].reshape(heads * head_dim, hidden),
                           None if fused_b is None else fused_b[:, j].reshape(-1))
            for j in range(3)
        )
        return Layer(
            input_norm=norm(p + "input_layernorm"), post_attention_norm=norm(p + "post_attention_layernorm"),
            q=q, k=k, v=v, o=linear(p + "attention.dense"),
            up=linear(p + "mlp.dense_h_to_4h"), down=linear(p + "mlp.dense_4h_to_h"),
        )

    if prefix + "embed_in.weight" not in weights:
        raise UnsupportedModelError("the checkpoint has no gpt_neox.embed_in.weight: it is not a GPT-NeoX causal LM "
                                    "checkpoint (GPTNeoXForCausalLM.save_pretrained writes one)")
    head = "embed_out" if "embed_out.weight" in weights else "lm_head"  # transformers 5 renamed embed_out
    return DecoderDescription(
        architecture="gpt_neox", num_layers=config.num_hidden_layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=heads, head_dim=head_dim, vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings, rotary_dim=int(head_dim * fraction), rope_theta=theta,
        norm="layernorm", norm_eps=config.layer_norm_eps, activation="gelu",
        parallel_residual=config.use_parallel_residual, embed=weights[prefix + "embed_in.weight"],
        layers=LazyLayers(config.num_hidden_layers, layer, release), final_norm=norm(prefix + "final_layer_norm"),
        lm_head=linear(head), release=release,
    )
