"""Write a random-weight model with the exact pythia-160m configuration, for GPU benchmarks where the hub is
unreachable (latency and memory do not depend on the weights' values).

    python samples/make_pythia_160m.py /tmp/pythia-160m-random
"""

import sys

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

# EleutherAI/pythia-160m's config.json, field by field.
PYTHIA_160M = {
    "vocab_size": 50304, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "max_position_embeddings": 2048, "rotary_pct": 0.25, "rotary_emb_base": 10000,
    "use_parallel_residual": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0,
    "eos_token_id": 0, "tie_word_embeddings": False,
}

if __name__ == "__main__":
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_160M)).save_pretrained(sys.argv[1])
    print(f"wrote {sys.argv[1]}")
