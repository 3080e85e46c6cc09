"""Write a random-weight model with the exact configuration of a public model, for GPU benchmarks where the hub
is unreachable (latency and memory do not depend on the weights' values). It gets the shipped model's tokenizer,
since tools such as GenAI's model builder want one (its 8192 ids fit either vocabulary).

    python samples/make_random_model.py pythia-160m /tmp/pythia-160m-random
    python samples/make_random_model.py llama-160m /tmp/llama-160m-random
    python samples/make_random_model.py llama-160m /tmp/llama-160m-kv4 --kv-heads 4    # grouped-query attention
    python samples/make_random_model.py pythia-160m /tmp/pythia-160m-kv4 --kv-heads 4  # as kvexport stores it
    python samples/make_random_model.py llama-7b /tmp/llama-7b-random                  # 13.5 GB, about a minute

Weights are drawn tensor by tensor (normal, std 0.02) and streamed into model.safetensors, so a 13B shape needs
no more memory than its largest tensor.
"""

import argparse
from pathlib import Path

from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from kvexport.exporter.checkpoint import write_random_checkpoint
from kvexport.models import DEFAULT_MODEL, shipped_directory

# The public config.json of each model (EleutherAI/pythia-160m, JackFram/llama-160m), field by field.
CONFIGS = {
    "pythia-160m": (GPTNeoXConfig, GPTNeoXForCausalLM, {
        "vocab_size": 50304, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000,
        "use_parallel_residual": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0,
        "eos_token_id": 0, "tie_word_embeddings": False}),
    "llama-160m": (LlamaConfig, LlamaForCausalLM, {
        "vocab_size": 32000, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "num_key_value_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 2048,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 2,
        "tie_word_embeddings": False}),
}
PYTHIA = CONFIGS["pythia-160m"][2]
LLAMA = CONFIGS["llama-160m"][2]
CONFIGS.update({  # the public configs of EleutherAI/pythia-1.4b, meta-llama/Llama-2-7b-hf and -13b-hf
    "pythia-1.4b": (GPTNeoXConfig, GPTNeoXForCausalLM, {
        **PYTHIA, "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
        "intermediate_size": 8192}),
    "llama-7b": (LlamaConfig, LlamaForCausalLM, {
        **LLAMA, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1}),
    "llama-13b": (LlamaConfig, LlamaForCausalLM, {
        **LLAMA, "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
        "intermediate_size": 13824, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "bos_token_id": 1}),
})


def repeat_kv_heads(directory: Path, config) -> None:
    """GPT-NeoX with fewer KV heads is stored as the multi-head model it equals (exporter/models/gpt_neox.py):
    make each group's K/V copies equal to its first."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, tensor in tensors.items():
        if "query_key_value" in name:
            kv = tensor.view(heads, 3, -1)[:, 1:].unflatten(0, (kv_heads, heads // kv_heads))
            kv[:] = kv[:, :1].clone()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(CONFIGS))
    parser.add_argument("output")
    parser.add_argument("--kv-heads", type=int, help="KV heads per layer (default: the model's)")
    parser.add_argument("--layers", type=int, help="layers (default: the model's; fewer for a quick per-layer check)")
    args = parser.parse_args()
    config_class, model_class, fields = CONFIGS[args.shape]
    if args.kv_heads:
        fields = {**fields, "num_key_value_heads": args.kv_heads}
    if args.layers:
        fields = {**fields, "num_hidden_layers": args.layers}
    config = config_class(**fields, dtype="float16")
    output = Path(args.output)
    size = write_random_checkpoint(model_class, config, output)
    if args.kv_heads and model_class is GPTNeoXForCausalLM:
        repeat_kv_heads(output, config)
    AutoTokenizer.from_pretrained(shipped_directory(DEFAULT_MODEL)).save_pretrained(output)
    print(f"wrote {output}: {size / 1e9:.2f} GB of float16 weights")
