"""TensorRT builder and backend: what can be checked without a GPU; the build itself skips without one."""

import importlib.util
import json

import pytest

from kvexport.exporter.cli import main
from kvexport.exporter.tensorrt_build import BuildOptions, engine_key, profile_shapes, rebuild_reason
from kvexport.runtime import ExportedModel, OrtDecoder
from kvexport.runtime.compare import compare_decoders
from kvexport.runtime.tensorrt_support import TensorRTMissingError, import_tensorrt
from kvexport.strategies import CacheLayout, KvexportError

HAS_TENSORRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))
LAYOUT = CacheLayout(owners=(0, 2), num_layers=4, num_kv_heads=4, head_dim=16, dtype="float16")


def test_prefill_profile_covers_prompts_with_an_empty_past():
    shapes = profile_shapes(LAYOUT, "prefill", max_batch=8, max_length=512)
    assert shapes["input_ids"] == ((1, 1), (4, 256), (8, 512))
    assert shapes["attention_mask"] == shapes["input_ids"]
    assert shapes["past_key_values.2.value"] == ((1, 4, 0, 16), (4, 4, 0, 16), (8, 4, 0, 16))
    assert sorted(shapes) == sorted(["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in (0, 2) for k in ("key", "value")])


def test_decode_profile_is_one_token_over_a_past_up_to_the_max():
    shapes = profile_shapes(LAYOUT, "decode", max_batch=8, max_length=512)
    assert shapes["input_ids"] == ((1, 1), (4, 1), (8, 1))
    assert shapes["attention_mask"] == ((1, 2), (4, 257), (8, 512))
    assert shapes["past_key_values.0.key"] == ((1, 4, 1, 16), (4, 4, 256, 16), (8, 4, 511, 16))
    # the mask always covers past + the new token
    for low, high in zip(shapes["attention_mask"], shapes["past_key_values.0.key"]):
        assert low[1] == high[2] + 1 or (low, high) == ((4, 257), (4, 4, 256, 16))


def test_engine_is_rebuilt_when_anything_it_was_built_for_changes(tiny_neox, export_cache):
    model = ExportedModel.load(export_cache(tiny_neox, "every:2", "float16"))
    key = engine_key(model, BuildOptions(), "10.13.0", "9.0")
    assert rebuild_reason(key, key) is None
    assert rebuild_reason(None, key) == "no engine yet"
    assert rebuild_reason({**key, "onnx_sha256": "0"}, key) == "the ONNX model changed"
    assert rebuild_reason(key, {**key, "tensorrt_version": "10.14.1"}) == "TensorRT version 10.13.0 -> 10.14.1"
    assert rebuild_reason(key, {**key, "compute_capability": "8.9"}) == "GPU compute capability 9.0 -> 8.9"
    other = engine_key(model, BuildOptions(max_batch=64), "10.13.0", "9.0")
    assert rebuild_reason(key, other) == "build options changed: max_batch 8 -> 64"
    assert len(key["onnx_sha256"]) == 64 and key == engine_key(model, BuildOptions(), "10.13.0", "9.0")


def test_build_options_are_checked_against_the_export(tiny_neox, export_cache):
    model = ExportedModel.load(export_cache(tiny_neox, "every:2", "float16"))
    BuildOptions(precision="fp16", max_length=64).check(model)
    with pytest.raises(KvexportError, match="needs a float32 export.*re-export with --dtype float32"):
        BuildOptions(precision="fp32", max_length=64).check(model)
    with pytest.raises(KvexportError, match="subset of prefill,decode"):
        BuildOptions(profiles=("warmup",), max_length=64).check(model)
    with pytest.raises(KvexportError, match="exceeds the model's 128 positions"):
        BuildOptions(max_length=4096).check(model)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_extras(tiny_neox, export_cache, capsys):
    with pytest.raises(TensorRTMissingError, match=r"kvexport\[tensorrt\].*kvexport\[tensorrt-rtx\]"):
        import_tensorrt()
    assert main(["build-engine", str(export_cache(tiny_neox, "every:2", "float16")), "--max-length", "64"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_backend_without_engine_says_how_to_build_one(tiny_neox, export_cache, capsys):
    directory = export_cache(tiny_neox, "every:2", "float16")
    assert main(["generate", str(directory), "--backend", "tensorrt", "--provider", "cuda"]) == 2
    assert f"run 'kvexport build-engine {directory}'" in capsys.readouterr().err


def test_compare_reports_float16_against_float32(tiny_neox, export_cache):
    """The comparison used for ORT vs TensorRT, here on two ORT exports of different precision."""
    fp32 = OrtDecoder(ExportedModel.load(export_cache(tiny_neox, "every:2", "float32")))
    fp16 = OrtDecoder(ExportedModel.load(export_cache(tiny_neox, "every:2", "float16")))
    result = compare_decoders(fp32, fp16, batch=2, prompt=6, decode_steps=5)
    assert len(result.steps) == 6
    assert 0 < result.max_abs < 5e-2 and result.greedy_agreement >= 0.9
    same = compare_decoders(fp32, fp32, batch=2, prompt=6, decode_steps=3)
    assert same.max_abs == 0 and same.greedy_agreement == 1.0


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed (pip install 'kvexport[tensorrt]'); "
                    "the build is proven on the GPU machine, see docs/results.md")
def test_build_engine_parses_and_builds(tiny_neox, export_cache, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("building a TensorRT engine needs an NVIDIA GPU")
    from kvexport.exporter.tensorrt_build import build_engine

    directory = export_cache(tiny_neox, "every:2", "float16")
    first = build_engine(directory, BuildOptions(max_batch=2, max_length=64))
    assert first.built and first.engine_bytes > 0
    info = json.loads((directory / "model.engine.json").read_text())
    assert set(info["profile_index"]) == {"prefill", "decode"}
    assert not build_engine(directory, BuildOptions(max_batch=2, max_length=64)).built
