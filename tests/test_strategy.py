import json

import pytest

from kvexport.strategies import Strategy, StrategyError, every, load_strategy, make_strategy, no_sharing


def test_every_groups_adjacent_layers_under_the_first():
    assert every(2, 5).kv_source == (0, 0, 2, 2, 4)
    assert every(3, 6).owners == (0, 3)
    assert no_sharing(4).shared == ()


def test_sparse_form_normalises_to_kv_source():
    strategy = Strategy.from_dict({"version": 1, "num_layers": 6, "share": {"5": 2, "3": 0}})
    assert strategy.kv_source == (0, 1, 2, 0, 4, 2)
    assert strategy.owners == (0, 1, 2, 4)


def test_round_trip_through_file(tmp_path):
    strategy = Strategy((0, 0, 2, 0), method="explicit", model="org/m", provenance={"note": "x"})
    path = strategy.save(tmp_path / "s.json")
    assert load_strategy(path) == strategy
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("data, message", [
    ({"version": 2, "num_layers": 2, "kv_source": [0, 1]}, "version 2 is not supported"),
    ({"version": 1, "kv_source": [0, 1]}, "needs 'num_layers'"),
    ({"version": 1, "num_layers": 3, "kv_source": [0, 1]}, "has 2 entries but 'num_layers' is 3"),
    ({"version": 1, "num_layers": 3, "kv_source": [0, 1, 7]}, "outside 0..2"),
    ({"version": 1, "num_layers": 3, "kv_source": [0, 2, 2]}, "from later layer 2"),
    ({"version": 1, "num_layers": 3, "kv_source": [0, 0, 1]}, "itself reuses layer 0"),
    ({"version": 1, "num_layers": 3, "share": {"2": 1}, "kv_source": [0, 1, 1]}, "exactly one of"),
    ({"version": 1, "num_layers": 3, "share": {"9": 1}}, "names layer 9"),
    ({"version": 1, "num_layers": 3, "share": {"x": 1}}, "not a layer index"),
    ({"version": 1, "num_layers": 2, "kv_source": [0, "a"]}, "list of layer indices"),
    ([0, 1], "JSON object"),
])
def test_each_rule_rejects_its_bad_strategy(data, message):
    with pytest.raises(StrategyError, match=message):
        Strategy.from_dict(data)


def test_strategy_for_another_model_is_rejected(tmp_path):
    path = Strategy((0, 0, 2, 2), model="EleutherAI/pythia-160m").save(tmp_path / "s.json")
    with pytest.raises(StrategyError, match="has 4 layers but the model has 6"):
        make_strategy(str(path), 6, "EleutherAI/pythia-160m")
    with pytest.raises(StrategyError, match="made for model 'EleutherAI/pythia-160m'"):
        make_strategy(str(path), 4, "EleutherAI/pythia-70m")
    assert make_strategy(str(path), 4, "/models/pythia-160m").kv_source == (0, 0, 2, 2)  # same model, local copy


def test_bad_files_and_specs_name_the_problem(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(StrategyError, match="not valid JSON"):
        load_strategy(tmp_path / "bad.json")
    with pytest.raises(StrategyError, match="does not exist"):
        make_strategy(str(tmp_path / "missing.json"), 4)
    with pytest.raises(StrategyError, match="unknown strategy 'sometimes'"):
        make_strategy("sometimes", 4)
    with pytest.raises(StrategyError, match="positive integer"):
        make_strategy("every:x", 4)


def test_sample_strategy_fits_the_default_model():
    from conftest import DEFAULT_MODEL_DIR, REPO_ROOT

    layers = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["num_hidden_layers"]
    strategy = make_strategy(str(REPO_ROOT / "samples/strategy.json"), layers, "tiny-neox")
    assert 0 < len(strategy.shared) < layers
