"""Llama family (Llama, Qwen2): RMSNorm, SwiGLU MLP, grouped-query attention, full rotary."""

from __future__ import annotations

import torch

from .description import DecoderDescription, Layer, LazyLayers, Linear, Norm, UnsupportedModelError, rope_settings


def describe(config, weights: dict[str, torch.Tensor], release=lambda: None) -> DecoderDescription:
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if config.hidden_act != "silu":
        raise UnsupportedModelError(f"Llama-family model with activation '{config.hidden_act}' is not supported")
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedModelError("sliding-window attention is not supported: export a model without it")
    theta, fraction = rope_settings(config, default_theta=10000.0, default_fraction=1.0)

    def linear(name: str) -> Linear:
        return Linear.from_hf(weights[f"{name}.weight"], weights.get(f"{name}.bias"))

    def layer(i: int) -> Layer:
        p = f"model.layers.{i}."
        return Layer(
            input_norm=Norm(weights[p + "input_layernorm.weight"]),
            post_attention_norm=Norm(weights[p + "post_attention_layernorm.weight"]),
            q=linear(p + "self_attn.q_proj"), k=linear(p + "self_attn.k_proj"), v=linear(p + "self_attn.v_proj"),
            o=linear(p + "self_attn.o_proj"), gate=linear(p + "mlp.gate_proj"), up=linear(p + "mlp.up_proj"),
            down=linear(p + "mlp.down_proj"),
        )

    missing = [name for name in ("model.embed_tokens.weight", "model.norm.weight") if name not in weights]
    if missing:
        raise UnsupportedModelError(f"the checkpoint has no {', '.join(missing)}: it is not a Llama-family "
                                    "causal LM checkpoint (AutoModelForCausalLM.save_pretrained writes one)")
    lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])  # tied embeddings
    return DecoderDescription(
        architecture=config.model_type, num_layers=config.num_hidden_layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings, rotary_dim=int(head_dim * fraction), rope_theta=theta,
        norm="rmsnorm", norm_eps=config.rms_norm_eps, activation="silu", parallel_residual=False,
        embed=weights["model.embed_tokens.weight"], layers=LazyLayers(config.num_hidden_layers, layer, release),
        final_norm=Norm(weights["model.norm.weight"]), lm_head=Linear.from_hf(lm_head), release=release,
    )


def state_dict(d: DecoderDescription) -> dict[str, torch.Tensor]:
    """Hugging Face Llama-family tensors of a description (describe's inverse; nn.Linear stores [out, in])."""
    state = {"model.embed_tokens.weight": d.embed, "model.norm.weight": d.final_norm.weight,
             **d.lm_head.to_hf("lm_head")}
    for i, layer in enumerate(d.layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = layer.input_norm.weight
        state[p + "post_attention_layernorm.weight"] = layer.post_attention_norm.weight
        for name, lin in (("self_attn.q_proj", layer.q), ("self_attn.k_proj", layer.k), ("self_attn.v_proj", layer.v),
                          ("self_attn.o_proj", layer.o), ("mlp.gate_proj", layer.gate), ("mlp.up_proj", layer.up),
                          ("mlp.down_proj", layer.down)):
            state.update(lin.to_hf(p + name))
    return state
