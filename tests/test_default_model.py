"""The shipped models are trained, not random: their held-out perplexity is far below the unigram baseline."""

import json
import math

import pytest
import torch
from conftest import REPO_ROOT

from kvexport.exporter import load_model
from kvexport.models import HELDOUT_FILE, SHIPPED, shipped_directory

# Training measured 23.3 (tiny-neox) and 26.3 (tiny-llama) on the whole held-out split, and 1008 for the unigram
# baseline (training_log.json); a random model sits near the vocabulary size, 8192.
PERPLEXITY_BOUND = 40.0


@pytest.mark.parametrize("alias", sorted(SHIPPED))
def test_shipped_model_loads_offline_and_is_trained(monkeypatch, alias):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model(alias)
    tokenizer = loaded.tokenizer()
    ids = tokenizer((shipped_directory(alias) / HELDOUT_FILE).read_text(), verbose=False)["input_ids"][: 8 * 256]
    windows = torch.tensor(ids).view(8, 256)
    with torch.no_grad():
        loss = loaded.hf_model(input_ids=windows, labels=windows).loss.item()
    log = REPO_ROOT / "samples/models" / SHIPPED[alias] / "training_log.json"
    summary = json.loads(log.read_text())["summary"]
    assert math.exp(loss) < PERPLEXITY_BOUND < summary["unigram_heldout_ppl"] / 10
