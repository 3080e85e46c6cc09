import json
import math

import pytest
import torch

from kvexport.exporter.calibration import Calibration, token_windows
from kvexport.exporter.cli import main
from kvexport.exporter.evaluate import evaluate
from kvexport.exporter.loading import load_model
from kvexport.exporter.search import SearchSettings, run_search
from kvexport.strategies import Strategy, StrategyError
from kvexport.strategies.kvsharer import apply_pair, layer_distances, random_strategy, ranked_pairs, search

TEXT = " ".join(f"Item {i} is a value; the list holds {i * 7 % 13} more." for i in range(400))


@pytest.fixture(scope="module")
def calibration(tiny_neox):
    loaded = load_model(str(tiny_neox))
    return loaded, Calibration(loaded, token_windows(loaded.tokenizer(), TEXT, 6, 32))


def test_distances_are_the_mean_head_dim_norm_of_kv_means():
    keys = [torch.zeros(3, 2, 4, 8), torch.ones(3, 2, 4, 8), torch.full((3, 2, 4, 8), 3.0)]
    values = [torch.zeros(3, 2, 4, 8)] * 3
    distances = layer_distances(list(zip(keys, values)))
    # K differs by 1 in each of 8 dims: norm sqrt(8); V does not differ; mean of the two.
    assert distances[0, 1] == pytest.approx(math.sqrt(8) / 2)
    assert distances[0, 2] == pytest.approx(3 * math.sqrt(8) / 2)
    assert torch.equal(distances, distances.T) and distances.diagonal().abs().sum() == 0
    assert ranked_pairs(distances)[0] == (0, 2) and ranked_pairs(distances, "similar")[0] == (0, 1)


def test_apply_pair_resolves_owners_and_moves_users():
    assert apply_pair((0, 1, 2, 3), 1, 3) == (0, 1, 2, 1)
    assert apply_pair((0, 0, 2, 3), 1, 3) == (0, 0, 2, 0)  # earlier is shared: its owner 0
    assert apply_pair((0, 1, 2, 2), 1, 2) == (0, 1, 1, 1)  # later owned a cache: its user 3 moves too
    assert apply_pair((0, 1, 1, 3), 0, 2) is None  # later already shared: skipped


@pytest.mark.parametrize("target", [0, 1, 2, 3])
def test_search_reaches_the_target_with_a_valid_strategy(calibration, target):
    loaded, calib = calibration
    strategy = run_search(loaded, TEXT, SearchSettings(target, threshold=-1.0), calib, show_progress=False)
    assert len(strategy.shared) == target
    Strategy.from_dict(json.loads(json.dumps(strategy.to_dict())))  # passes every validation rule
    assert strategy.provenance["reached_target"]


def test_search_is_deterministic_and_records_its_steps(calibration):
    loaded, calib = calibration
    settings = SearchSettings(2)
    first = run_search(loaded, TEXT, settings, calib, show_progress=False)
    fresh = Calibration(loaded, token_windows(loaded.tokenizer(), TEXT, 6, 32))
    second = run_search(loaded, TEXT, settings, fresh, show_progress=False)
    assert first.to_dict() == second.to_dict()
    steps = first.provenance["steps"]
    assert [s["accepted"] for s in steps].count(True) == len(first.shared)
    assert all(s["score"] > 0.5 for s in steps if s["accepted"])
    assert first.params["criterion"] == "cosine" and first.params["threshold"] == 0.5


def test_threshold_one_accepts_nothing(calibration):
    """Cosine similarity never exceeds 1; perplexity retention can (sharing may help a random model), so the
    ppl criterion is checked with a bound no candidate reaches."""
    loaded, calib = calibration
    for criterion, threshold in (("cosine", 1.0), ("ppl", 1e6)):
        strategy = run_search(loaded, TEXT, SearchSettings(3, criterion, threshold), calib, show_progress=False)
        assert strategy.shared == () and not strategy.provenance["reached_target"]
        assert len(strategy.provenance["steps"]) == 6  # every pair of 4 layers was tried and rejected


def test_scores_resumed_from_the_first_changed_layer_equal_whole_passes(calibration):
    """A candidate runs from its first layer whose source differs from the last run's; its scores must be those of
    a pass through every layer, in any order of candidates."""
    import torch.nn.functional as F

    from kvexport.exporter.calibration import next_token_stats
    from kvexport.exporter.reference import ReferenceDecoder

    loaded, calib = calibration
    ones = torch.ones_like(calib.windows)
    positions = torch.arange(calib.windows.shape[1]).expand_as(ones)
    full = ReferenceDecoder(loaded.description, Strategy((0, 1, 2, 3)), torch.float32).forward(
        calib.windows, ones, positions)
    for kv_source in [(0, 1, 2, 2), (0, 0, 2, 2), (0, 1, 1, 3), (0, 1, 2, 2), (0, 0, 0, 0), (0, 1, 2, 3)]:
        whole = ReferenceDecoder(loaded.description, Strategy(kv_source), torch.float32).forward(
            calib.windows, ones, positions)
        cosine = F.cosine_similarity(whole.final_hidden.flatten(1).double(), full.final_hidden.flatten(1).double(),
                                     dim=-1).mean().item()
        retention = math.exp(next_token_stats(full.logits, calib.windows)[0]
                             - next_token_stats(whole.logits, calib.windows)[0])
        assert calib.cosine(Strategy(kv_source)) == pytest.approx(cosine, abs=1e-6)
        assert calib.perplexity_retention(Strategy(kv_source)) == pytest.approx(retention, rel=1e-6)


def test_a_candidate_resumes_where_shallower_layer_inputs_were_evicted(calibration):
    """The kept layer inputs are bounded, oldest first, so a deep input can outlive a shallower one of the same
    strategy: here (0, 1) is evicted while (0, 1, 1) is kept, and the last candidate resumes from the latter."""
    loaded, _ = calibration
    calib = Calibration(loaded, token_windows(loaded.tokenizer(), TEXT, 6, 32))
    for kv_source in [(0, 1, 1, 3), (0, 0, 2, 3), (0, 0, 0, 3), (0, 0, 2, 2)]:
        calib.cosine(Strategy(kv_source))
    assert (0, 1, 1) in calib._layer_inputs and (0, 1) not in calib._layer_inputs
    alone = Calibration(loaded, token_windows(loaded.tokenizer(), TEXT, 6, 32)).cosine(Strategy((0, 1, 1, 1)))
    assert calib.cosine(Strategy((0, 1, 1, 1))) == pytest.approx(alone, abs=1e-6)


def test_full_model_scores_one(calibration):
    _, calib = calibration
    assert calib.cosine(Strategy((0, 1, 2, 3))) == pytest.approx(1.0, abs=1e-9)
    assert calib.perplexity_retention(Strategy((0, 1, 2, 3))) == pytest.approx(1.0, abs=1e-9)
    assert calib.cosine(Strategy((0, 0, 0, 0))) < 1.0


def test_search_rejects_impossible_targets():
    with pytest.raises(StrategyError, match="can share 0..3"):
        search(torch.zeros(4, 4), lambda s: 1.0, 4, 0.5)


def test_random_strategies_are_valid_and_seeded():
    for seed in range(20):
        strategy = random_strategy(8, 3, seed)
        assert len(strategy.shared) == 3
    assert random_strategy(8, 3, 1) == random_strategy(8, 3, 1)


def test_eval_of_none_reproduces_the_full_model_perplexity(tiny_neox):
    loaded = load_model(str(tiny_neox))
    windows = token_windows(loaded.tokenizer(), TEXT, 4, 48, from_end=True)
    rows = evaluate(loaded, {"every:2": Strategy((0, 0, 2, 2))}, windows, with_torch=True, log=lambda _: None)
    with torch.no_grad():  # independently: Hugging Face's own loss on the same windows
        hf_ppl = math.exp(loaded.hf_model(input_ids=windows, labels=windows).loss.item())
    assert rows[0].name == "none" and rows[0].perplexity == pytest.approx(hf_ppl, rel=1e-4)
    for row in rows:  # the exported ONNX and the PyTorch reference agree
        assert row.perplexity == pytest.approx(row.torch_perplexity, rel=1e-4)
        assert row.accuracy == pytest.approx(row.torch_accuracy, abs=1e-9)
    assert rows[1].kv_bytes_per_token * 2 == rows[0].kv_bytes_per_token
    assert rows[1].perplexity_ratio == pytest.approx(rows[1].perplexity / rows[0].perplexity)
    # the GPU's way (the reference on a device, the weights held there once), here on the CPU: the same rows
    on_device = evaluate(loaded, {"every:2": Strategy((0, 0, 2, 2))}, windows, log=lambda _: None,
                         device=torch.device("cpu"))
    for row, again in zip(rows, on_device, strict=True):
        assert again.perplexity == pytest.approx(row.perplexity, rel=1e-4) and again.accuracy == row.accuracy


def test_search_and_eval_commands(tiny_neox, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    strategy = tmp_path / "found.json"
    assert main(["search", "--model", str(tiny_neox), "--calib", str(text), "--ratio", "0.5", "--samples", "4",
                 "--length", "32", "-o", str(strategy)]) == 0
    assert json.loads(strategy.read_text())["method"] == "kvsharer"
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_neox), "--share", str(strategy), "every:2", "--text", str(text),
                 "--windows", "2", "--length", "32", "--output", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["none", "found", "every:2"]
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG" and "| none | 0 |" in (out / "eval.md").read_text()
    assert main(["search", "--model", str(tiny_neox), "--calib", str(text), "--shared-layers", "9"]) == 2
    assert "can share 0..3" in capsys.readouterr().err
