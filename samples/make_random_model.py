"""Write a random-weight model with the exact configuration of a public model, for GPU benchmarks where the hub
is unreachable (latency and memory do not depend on the weights' values). It gets the shipped model's tokenizer,
since tools such as GenAI's model builder want one (its 8192 ids fit either vocabulary).

    python samples/make_random_model.py pythia-160m /tmp/pythia-160m-random
    python samples/make_random_model.py llama-160m /tmp/llama-160m-random
    python samples/make_random_model.py llama-160m /tmp/llama-160m-kv4 --kv-heads 4    # grouped-query attention
"""

import argparse

import torch
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

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

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(CONFIGS))
    parser.add_argument("output")
    parser.add_argument("--kv-heads", type=int, help="Llama shapes: KV heads per layer (default: the model's)")
    args = parser.parse_args()
    config_class, model_class, fields = CONFIGS[args.shape]
    if args.kv_heads:
        fields = {**fields, "num_key_value_heads": args.kv_heads}
    torch.manual_seed(0)
    model_class(config_class(**fields)).to(torch.float16).save_pretrained(args.output)
    AutoTokenizer.from_pretrained(shipped_directory(DEFAULT_MODEL)).save_pretrained(args.output)
    print(f"wrote {args.output}")
