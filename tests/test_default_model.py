"""The shipped default model is trained, not random: its held-out perplexity is far below the unigram baseline."""

import json
import math

import torch
from conftest import DEFAULT_MODEL_DIR, REPO_ROOT

from kvexport.exporter import load_model

# Training measured 23.3 on the whole held-out split and 1008 for the unigram baseline (training_log.json);
# a random model sits near the vocabulary size, 8192.
PERPLEXITY_BOUND = 40.0


def test_default_model_loads_offline_and_is_trained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("tiny-neox")
    tokenizer = loaded.tokenizer()
    ids = tokenizer((DEFAULT_MODEL_DIR / "heldout.txt").read_text())["input_ids"][: 8 * 256]
    windows = torch.tensor(ids).view(8, 256)
    with torch.no_grad():
        loss = loaded.hf_model(input_ids=windows, labels=windows).loss.item()
    summary = json.loads((REPO_ROOT / "samples/models/tiny-neox-pydoc/training_log.json").read_text())["summary"]
    assert math.exp(loss) < PERPLEXITY_BOUND < summary["unigram_heldout_ppl"] / 10
