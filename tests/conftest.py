"""Tiny random-weight models built from configs (no downloads), saved with the shipped model's real tokenizer."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvexport.models import shipped_directory

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = shipped_directory("tiny-neox")


def _save_tiny(path: Path, config, model_class) -> Path:
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory) -> Path:
    """4 layers, hidden 64, 4 heads, 25% rotary, parallel residual."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=256, max_position_embeddings=128, rotary_pct=0.25,
                           bos_token_id=0, eos_token_id=0)
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny-neox-random", config, GPTNeoXForCausalLM)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """4 layers, hidden 64, 4 query heads over 2 KV heads (GQA), SwiGLU, RMSNorm."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama-random", config, LlamaForCausalLM)


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    """Exports shared across tests: (model dir, strategy spec or Strategy, dtype) -> export dir."""
    from kvexport.exporter import export

    root, made = tmp_path_factory.mktemp("exports"), {}

    def get(model: Path, strategy, dtype: str = "float32") -> Path:
        key = (str(model), str(strategy), dtype)
        if key not in made:
            made[key] = export(str(model), strategy, root / f"e{len(made)}", dtype=dtype, log=lambda _: None).directory
        return made[key]

    return get


@pytest.fixture(scope="session")
def served_export(tmp_path_factory):
    """The shipped model (real tokenizer and chat template), every:2, with the static graph the engine runs."""
    from kvexport.exporter import export

    out = tmp_path_factory.mktemp("serve") / "export"
    return export("tiny-neox", "every:2", out, log=lambda _: None).directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(export_dir, cwd, *options: str, env: dict | None = None) -> tuple[str, subprocess.Popen]:
    """`kvexport serve` in a process of its own on a free port (4 slots, 8 queued unless options say otherwise),
    once /health answers."""
    import httpx

    port = free_port()
    command = [sys.executable, "-c", "import sys; from kvexport.exporter.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", str(export_dir), "--port", str(port), "--max-slots", "4", "--max-queue", "8", *options]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return url, process
