import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kvexport.exporter import ReferenceDecoder, export, load_model
from kvexport.exporter import validate as validate_module
from kvexport.strategies import Strategy
from kvexport.strategies import contract as c

IRREGULAR = Strategy((0, 0, 2, 0), method="explicit")  # layer 3 reuses layer 0, skipping an owner in between


@pytest.mark.parametrize("strategy", ["none", "every:2", IRREGULAR], ids=["none", "every2", "irregular"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exported_logits_match_the_reference(tiny_neox, export_cache, strategy, dtype):
    manifest = json.loads((export_cache(tiny_neox, strategy, dtype) / c.MANIFEST_FILE).read_text())
    validation = manifest["validation"]
    assert validation["passed"]
    kinds = [s["kind"] for s in validation["steps"]]
    assert kinds[:4] == ["dynamic prefill", "dynamic decode", "dynamic decode", "dynamic decode"]
    assert kinds[4:] and all(kind.startswith("static") for kind in kinds[4:])  # then the static graph's
    assert validation["worst"] <= (1e-5 if dtype == "float32" else 5e-3)
    if strategy == "none":  # the reference itself reproduces Hugging Face
        assert validation["hf_relative"] <= 1e-5


def test_gqa_llama_exports_and_validates(tiny_llama, export_cache):
    manifest = json.loads((export_cache(tiny_llama, "every:2") / c.MANIFEST_FILE).read_text())
    assert manifest["model"]["num_kv_heads"] == 2 and manifest["model"]["num_heads"] == 4
    assert manifest["validation"]["worst"] <= 1e-5
    none = json.loads((export_cache(tiny_llama, "none") / c.MANIFEST_FILE).read_text())
    assert none["validation"]["hf_relative"] <= 1e-5


def test_graph_has_kv_io_and_projections_for_owners_only(tiny_neox, export_cache):
    directory = export_cache(tiny_neox, IRREGULAR)
    model = onnx.load(directory / c.MODEL_FILE)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    owners = IRREGULAR.owners
    assert inputs == ["input_ids", "attention_mask", "position_ids", "logits_to_keep"] + [
        f"past_key_values.{i}.{k}" for i in owners for k in ("key", "value")]
    assert outputs == ["logits"] + [f"present.{i}.{k}" for i in owners for k in ("key", "value")]
    weights = {init.name: init for init in model.graph.initializer}
    hidden, q_width, inner = 64, 64, 256
    for layer in range(4):
        # GPT-NeoX's parallel block: one MatMul for Q(|K|V) and the MLP's up projection (exporter.onnx_graph.
        # fold_parallel_norms); a shared layer projects its queries and no keys or values
        width = (3 if layer in owners else 1) * q_width + inner
        assert onnx.numpy_helper.to_array(weights[f"layers.{layer}.in_proj.weight"]).shape == (hidden, width)
        assert not any(name.startswith(f"layers.{layer}.attn.") for name in weights)
        assert f"layers.{layer}.in_proj.bias" not in weights  # carried by the norm's mean direction
    matmul_weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(matmul_weights) == 2 * 4 + 1  # per layer: in (q|k|v|up) and out (o|down); plus the LM head


def test_onnx_matches_a_longer_independent_decode(tiny_neox, export_cache):
    """Ten decode steps at batch 3 from ORT directly, against the float64 reference."""
    directory = export_cache(tiny_neox, "every:2")
    loaded = load_model(str(tiny_neox))
    strategy = Strategy.from_dict(json.loads((directory / c.STRATEGY_FILE).read_text()))
    reference = ReferenceDecoder(loaded.description, strategy, torch.float64)
    session = ort.InferenceSession(str(directory / c.MODEL_FILE), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 8192, (3, 6))
    mask = np.ones_like(ids)
    past = {p: np.zeros((3, 4, 0, 16), np.float32) for p, _ in ((f"past_key_values.{i}.{k}", 0) for i in (0, 2)
                                                              for k in ("key", "value"))}
    ref_past = None
    for _ in range(10):
        pos = c.positions_from_mask(mask)[:, -ids.shape[1]:]
        out = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                 "logits_to_keep": np.array([0]), **past})
        ref = reference.forward(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), ref_past)
        np.testing.assert_allclose(out[0], ref.logits.numpy(), atol=1e-4, rtol=1e-4)
        names = [o.name for o in session.get_outputs()]
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], out[1:])}
        ref_past = ref.present
        ids = rng.integers(0, 8192, (3, 1))
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)


def test_failed_validation_leaves_nothing_behind(tiny_neox, tmp_path, monkeypatch):
    monkeypatch.setitem(validate_module.TOLERANCE, "float32", 0.0)
    target = tmp_path / "out"
    with pytest.raises(validate_module.ValidationError, match="nothing was written"):
        export(str(tiny_neox), "every:2", target, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_both_graphs_share_one_weights_file_and_hold_no_weight_bytes(tiny_neox, tmp_path):
    result = export(str(tiny_neox), "every:2", tmp_path / "out", static=True, log=lambda _: None)
    weights = (result.directory / c.WEIGHTS_FILE).stat().st_size
    # Written once for both graphs (two copies would be twice the model's weights).
    assert 0.5 * result.manifest["weight_bytes"] < weights < 1.2 * result.manifest["weight_bytes"]
    for name in (c.MODEL_FILE, c.STATIC_MODEL_FILE):
        assert (result.directory / name).stat().st_size < 100_000
    assert result.manifest["integrity"]["files"][c.WEIGHTS_FILE]["bytes"] == weights  # hashed as it was written
    assert result.validation.passed


def test_export_dir_is_like_optimum(tiny_neox, export_cache):
    directory = export_cache(tiny_neox, "none")
    for name in ("model.onnx", "kvexport.json", "strategy.json", "config.json", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json"):
        assert (directory / name).is_file(), name
    props = {p.key: p.value for p in onnx.load(directory / c.MODEL_FILE, load_external_data=False).metadata_props}
    assert json.loads(props["kvexport.strategy"])["kv_source"] == [0, 1, 2, 3]


def test_output_that_is_not_an_export_is_refused_before_any_work(tiny_neox, tmp_path):
    from kvexport.strategies import KvexportError

    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(KvexportError, match="is not a kvexport export"):
        export(str(tiny_neox), "every:2", target, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]
    assert (target / "notes.txt").read_text() == "keep me"


def test_re_export_replaces_an_existing_export(tiny_neox, tmp_path):
    target = tmp_path / "out"
    export(str(tiny_neox), "none", target, log=lambda _: None)
    export(str(tiny_neox), "every:2", target, log=lambda _: None)
    assert json.loads((target / c.MANIFEST_FILE).read_text())["cache"]["owners"] == [0, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_validation_names_the_graph_and_step_it_failed_at():
    from kvexport.exporter.validate import ValidationReport

    steps = [{"kind": kind, "provider": "cuda", "max_abs_diff": 0.0, "relative": relative}
             for kind, relative in (("dynamic decode", 1e-3), ("static decode", 1.5), ("static prefill", 1e-2))]
    report = ValidationReport("float16", 2e-2, steps)
    assert not report.passed and "1.50e+00 (a static decode step on cuda) over 3 steps" in report.summary()
