"""kvexport compress-heads: multi-head to grouped-query attention that transformers loads and kvexport exports."""

import json

import pytest
import torch

from kvexport.exporter import export, load_model
from kvexport.exporter.cli import main


@pytest.fixture(scope="module")
def tiny_mha_llama(tmp_path_factory):
    """4 layers, 4 query heads and 4 KV heads (multi-head attention), head dim 16, full rotary."""
    from conftest import _save_tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=128, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny-mha-llama", config, LlamaForCausalLM)


def logits(model_dir, ids):
    with torch.no_grad():
        return load_model(str(model_dir)).hf_model(input_ids=ids).logits


def compress(model_dir, out, kv_heads, method="rope-svd"):
    assert main(["compress-heads", "--model", str(model_dir), "--kv-heads", str(kv_heads), "--method", method,
                 "--samples", "4", "--length", "64", "-o", str(out)]) == 0
    return out


def test_as_many_groups_as_heads_reproduces_the_model(tiny_mha_llama, tmp_path):
    out = compress(tiny_mha_llama, tmp_path / "g4", 4)
    ids = torch.randint(0, 8192, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(out, ids), logits(tiny_mha_llama, ids), rtol=1e-4, atol=1e-4)
    errors = json.loads((out / "kvexport_compression.json").read_text())["layers"]
    assert max(e["relative_key_error"] + e["relative_value_error"] for e in errors) < 1e-10


def test_compressed_checkpoint_loads_in_transformers_and_exports(tiny_mha_llama, tmp_path, capsys):
    out = compress(tiny_mha_llama, tmp_path / "g2", 2)
    assert load_model(str(out)).config.num_key_value_heads == 2
    record = json.loads((out / "kvexport_compression.json").read_text())
    assert record["kv_heads"] == 2 and record["original_kv_heads"] == 4 and len(record["layers"]) == 4
    # `none` validates the export against transformers itself; every:2 combines both methods.
    for strategy in ("none", "every:2"):
        result = export(str(out), strategy, tmp_path / f"e-{strategy.replace(':', '')}", log=lambda _: None)
        assert result.validation.passed and result.manifest["cache"]["num_kv_heads"] == 2
    cache = result.manifest["cache"]  # every:2 over 2 of 4 KV heads: a quarter of the original cache per token
    assert cache["bytes_per_token"] * 2 == cache["full_bytes_per_token"] == 4 * 2 * 2 * 16 * 4


def test_fitted_heads_reconstruct_better_than_mean_pooling(tiny_mha_llama, tmp_path):
    errors = {}
    for method in ("rope-svd", "mean"):
        out = compress(tiny_mha_llama, tmp_path / method, 2, method)
        layers = json.loads((out / "kvexport_compression.json").read_text())["layers"]
        errors[method] = sum(e["relative_key_error"] + e["relative_value_error"] for e in layers)
    assert errors["rope-svd"] < errors["mean"]


@pytest.mark.parametrize("kv_heads", ["0", "3", "8"])
def test_bad_kv_heads_is_one_line_and_nothing_is_written(tiny_mha_llama, tmp_path, capsys, kv_heads):
    assert main(["compress-heads", "--model", str(tiny_mha_llama), "--kv-heads", kv_heads, "-o",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use one of 1, 2, 4" in err and not list(tmp_path.iterdir())


def test_gpt_neox_is_refused_clearly(tiny_neox, tmp_path, capsys):
    assert main(["compress-heads", "--model", str(tiny_neox), "--kv-heads", "2", "-o", str(tmp_path / "o")]) == 2
    assert "not supported yet" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_search_and_eval_work_on_a_compressed_model(tiny_mha_llama, tmp_path, capsys):
    out = compress(tiny_mha_llama, tmp_path / "g2", 2)
    strategy = tmp_path / "s.json"
    assert main(["search", "--model", str(out), "--shared-layers", "1", "--samples", "4", "--length", "32",
                 "-o", str(strategy)]) == 0
    assert main(["eval", "--model", str(out), "--share", str(strategy), "--windows", "2", "--length", "64",
                 "--output", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())["rows"]
    assert [r["kv_bytes_per_token"] for r in rows] == [1024, 768]  # 2 KV heads; then 3 of 4 layers cache
    assert main(["inspect", str(export(str(out), str(strategy), tmp_path / "e", log=lambda _: None).directory)]) == 0
    assert "4 heads / 2 KV heads" in capsys.readouterr().out
