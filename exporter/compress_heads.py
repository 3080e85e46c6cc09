"""`kvexport compress-heads`: fewer KV heads (multi-head to grouped-query attention) from calibration activations.

Heads are grouped consecutively (query head h reads KV head h // (heads / G), as grouped-query attention does),
and each group's keys and values become one head, fitted to the group's keys and values on calibration text
(arXiv 2406.07056's idea: the KV cache is low-rank). The math works on the architecture-neutral
DecoderDescription, so the result is a description with num_kv_heads = G that the exporter and the reference
take as they are.

- method "rope-svd" (kvexport's): values: the group's values side by side, [tokens, g * head_dim], projected on
  their top head_dim right singular vectors U; the new V projection is the group's V projections times U, and
  U's block for each original head is folded into the output projection. Keys: rotary rotates each pair of
  dimensions (i, i + rotary_dim / 2) by a position-dependent angle, a multiplication by a unit complex number
  per frequency. Per frequency, the group's keys form a complex [tokens, g] matrix, replaced by its rank-1 SVD
  k_j ~= b_j c: a complex scale commutes with the rotation, so the cache still stores rotated keys at absolute
  positions, and conj(b_j) folds into query head j's projection. (This needs full rotary, as the Llama family
  has; GPT-NeoX's partial rotary and biases are not handled yet.)
- method "mean": the mean of the group's K and V projections (the initialisation of GQA up-training), queries
  and output projection unchanged: the baseline to beat.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from kvexport.strategies import KvexportError, no_sharing
from kvexport.strategies.atomic import write_text_atomic

from .models import DecoderDescription, Layer, Linear
from .reference import ReferenceDecoder

METHODS = ("rope-svd", "mean")


def check_kv_heads(description: DecoderDescription, kv_heads: int) -> None:
    heads = description.num_kv_heads
    if not 0 < kv_heads <= heads or heads % kv_heads:
        divisors = [g for g in range(1, heads + 1) if heads % g == 0]
        raise KvexportError(f"--kv-heads {kv_heads} does not divide the model's {heads} KV heads into equal "
                            f"groups: use one of {', '.join(map(str, divisors))}")
    if description.num_kv_heads != description.num_heads:
        raise KvexportError("the model already has grouped-query attention: compress-heads starts from "
                            "multi-head attention (as many KV heads as query heads)")


def layer_activations(description: DecoderDescription, windows: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Each layer's (rotated keys, values) on the windows, [tokens, heads, head_dim] in float64."""
    mask = torch.ones_like(windows)
    positions = torch.arange(windows.shape[1]).expand_as(windows)
    reference = ReferenceDecoder(description, no_sharing(description.num_layers), torch.float64)
    kv = reference.forward(windows, mask, positions, collect_layer_kv=True).layer_kv
    return [tuple(t.permute(0, 2, 1, 3).flatten(0, 1) for t in kv[i]) for i in range(description.num_layers)]


def heads_of(lin: Linear, heads: int, head_dim: int) -> torch.Tensor:
    """[in, heads * head_dim] weights as [in, heads, head_dim] (float64)."""
    return lin.weight.double().view(lin.weight.shape[0], heads, head_dim)


def complex_pairs(x: torch.Tensor, rotary: int) -> torch.Tensor:
    """The rotary dimensions of [..., head_dim] as rotary / 2 complex numbers (rotate-half pairing)."""
    half = rotary // 2
    return torch.complex(x[..., :half], x[..., half:rotary])


def real_pairs(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.real, z.imag], dim=-1)


def compress_layer(layer: Layer, keys: torch.Tensor, values: torch.Tensor, d: DecoderDescription, kv_heads: int,
                   method: str) -> tuple[Layer, dict]:
    heads, hd, rot = d.num_heads, d.head_dim, d.rotary_dim
    g = heads // kv_heads
    wq, wk, wv = (heads_of(lin, heads, hd) for lin in (layer.q, layer.k, layer.v))
    wo = layer.o.weight.double().view(heads, hd, -1)  # [heads, head_dim, hidden]
    if layer.k.bias is not None or layer.v.bias is not None or rot != hd:
        raise KvexportError("compress-heads handles K/V projections without biases and full rotary (the Llama "
                            "family) so far: GPT-NeoX and Qwen2 are not supported yet")
    new_q, new_k, new_v, new_o = wq.clone(), [], [], wo.clone()
    errors = {"key": 0.0, "value": 0.0}
    for group in range(kv_heads):
        members = range(group * g, (group + 1) * g)
        k_group, v_group = keys[:, members], values[:, members]  # [tokens, g, hd]
        if method == "mean":
            new_k.append(wk[:, members].mean(1))
            new_v.append(wv[:, members].mean(1))
            k_fit = (k_group.mean(1, keepdim=True)).expand_as(k_group)
            v_fit = (v_group.mean(1, keepdim=True)).expand_as(v_group)
        else:
            # Values: the group's top-hd basis U [g * hd, hd]; v_j ~= v_new U_j^T.
            u = torch.linalg.svd(v_group.flatten(1), full_matrices=False).Vh[:hd].T
            blocks = u.view(g, hd, hd)  # U_j
            new_v.append(torch.einsum("igd,gde->ie", wv[:, members], blocks))
            for j, member in enumerate(members):
                new_o[member] = blocks[j].T @ wo[member]
            v_fit = torch.einsum("ne,gde->ngd", v_group.flatten(1) @ u, blocks)
            # Keys, rotary part: per frequency a complex rank-1 fit; k_j ~= b_j c, c = sum_j conj(b_j) k_j.
            kz = complex_pairs(k_group, rot)  # [tokens, g, rot / 2]
            b = torch.stack([torch.linalg.svd(kz[:, :, f], full_matrices=False).Vh[0]
                             for f in range(rot // 2)], dim=-1)  # [g, rot / 2], unit columns
            new_k.append(real_pairs((complex_pairs(wk[:, members], rot) * b.conj()).sum(1)))
            k_fit = real_pairs((kz * b.conj()).sum(1, keepdim=True) * b)
            for j, member in enumerate(members):  # fold conj(b_j) into query head j (scores stay Re(conj(q) k))
                new_q[:, member] = real_pairs(complex_pairs(wq[:, member], rot) * b[j].conj())
        for kind, actual, fit in (("key", k_group, k_fit), ("value", v_group, v_fit)):
            errors[kind] += float((actual - fit).pow(2).sum() / actual.pow(2).sum()) / kv_heads
    dtype = layer.q.weight.dtype

    def linear(weight: torch.Tensor) -> Linear:
        return Linear(weight.reshape(weight.shape[0], -1).to(dtype).contiguous())

    compressed = dataclasses.replace(
        layer, q=Linear(new_q.reshape(wq.shape[0], -1).to(dtype).contiguous(), layer.q.bias),
        k=linear(torch.stack(new_k, dim=1)), v=linear(torch.stack(new_v, dim=1)),
        o=Linear(new_o.reshape(heads * hd, -1).to(dtype).contiguous(), layer.o.bias))
    return compressed, {"relative_key_error": round(errors["key"], 6), "relative_value_error": round(errors["value"], 6)}


def compress_heads(description: DecoderDescription, windows: torch.Tensor, kv_heads: int,
                   method: str = "rope-svd") -> tuple[DecoderDescription, list[dict]]:
    """The description with kv_heads KV heads per layer, and each layer's relative reconstruction errors
    (||fit - actual||^2 / ||actual||^2 of its keys and values on the windows)."""
    if method not in METHODS:
        raise KvexportError(f"method must be one of {', '.join(METHODS)}")
    check_kv_heads(description, kv_heads)
    activations = layer_activations(description, windows)
    layers, report = [], []
    for layer, (keys, values) in zip(description.layers, activations):
        compressed, errors = compress_layer(layer, keys, values, description, kv_heads, method)
        layers.append(compressed)
        report.append(errors)
    return dataclasses.replace(description, num_kv_heads=kv_heads, layers=layers), report


def llama_state_dict(description: DecoderDescription) -> dict[str, torch.Tensor]:
    """A Llama-family Hugging Face state dict from a description (nn.Linear stores [out, in])."""
    state = {"model.embed_tokens.weight": description.embed, "model.norm.weight": description.final_norm.weight,
             "lm_head.weight": description.lm_head.weight.t()}
    for i, layer in enumerate(description.layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = layer.input_norm.weight
        state[p + "post_attention_layernorm.weight"] = layer.post_attention_norm.weight
        for name, lin in (("self_attn.q_proj", layer.q), ("self_attn.k_proj", layer.k), ("self_attn.v_proj", layer.v),
                          ("self_attn.o_proj", layer.o), ("mlp.gate_proj", layer.gate), ("mlp.up_proj", layer.up),
                          ("mlp.down_proj", layer.down)):
            state[p + name + ".weight"] = lin.weight.t()
            if lin.bias is not None:
                state[p + name + ".bias"] = lin.bias
    return {name: tensor.contiguous() for name, tensor in state.items()}


def run_compress_heads(model: str, kv_heads: int, method: str, calib: str | None, samples: int, length: int,
                       output: Path) -> dict:
    """`kvexport compress-heads`: load, check, calibrate, compress and write; returns the record it wrote.
    Everything a user can get wrong is refused before the calibration runs."""
    from .calibration import read_text, token_windows
    from .loading import load_model

    if output.exists():
        raise KvexportError(f"{output} exists: choose another -o")
    loaded = load_model(model)
    description = loaded.description
    check_kv_heads(description, kv_heads)
    windows = token_windows(loaded.tokenizer(), read_text(calib), samples, length)
    compressed, errors = compress_heads(description, windows, kv_heads, method)
    record = {"method": method, "source": loaded.reference, "kv_heads": kv_heads,
              "original_kv_heads": description.num_kv_heads,
              "calibration": {"text": str(calib or "the default model's held-out text"), "samples": samples,
                              "length": length, "from": "start"},
              "layers": errors}
    write_compressed(compressed, loaded.directory, loaded.config, output, record)
    return record


def write_compressed(description: DecoderDescription, source_dir: Path, config, output: Path, record: dict) -> Path:
    """A Hugging Face checkpoint with num_key_value_heads = G that transformers loads, written under a temporary
    name and renamed when complete, with kvexport_compression.json (method, calibration, per-layer errors)."""
    import shutil

    from safetensors.torch import save_file

    from .loading import SIDE_FILES

    if description.architecture not in ("llama", "qwen2"):
        raise KvexportError(f"compress-heads writes Llama-family checkpoints; {description.architecture} has no "
                            "grouped-query attention in transformers to load it: use a Llama-family model")
    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for name in SIDE_FILES:
            if (source_dir / name).is_file() and name != "config.json":
                shutil.copy2(source_dir / name, partial / name)
        config.num_key_value_heads = description.num_kv_heads
        config.save_pretrained(partial)
        stored = getattr(config, "dtype", None)  # the source checkpoint's dtype (a torch.dtype in transformers 5)
        dtype = stored if isinstance(stored, torch.dtype) else torch.float32
        save_file({k: v.to(dtype) for k, v in llama_state_dict(description).items()},
                  partial / "model.safetensors", metadata={"format": "pt"})
        write_text_atomic(partial / "kvexport_compression.json", json.dumps(record, indent=2) + "\n")
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output
