import json

import onnxruntime
import pytest
import torch

from kvexport.exporter.cli import main


def test_bench_runs_end_to_end_on_cpu(tiny_neox, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_neox), "--share", "none", "every:2", "--backends", "hf", "ort",
                 "ort-static", "--batch", "1", "2", "--context", "16", "--provider", "cpu", "--dtype", "float32",
                 "--steps", "3", "--warmup", "1", "--memory-budget-gib", "1", "--output", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    points = report["points"]
    # hf runs for `none` only; ort and ort-static for both strategies; 2 batches each
    assert sorted({(p["backend"], p["strategy"]) for p in points}) == [
        ("hf", "none"), ("ort", "every2"), ("ort", "none"), ("ort-static", "every2"), ("ort-static", "none")]
    assert len(points) == 10 and all(p["decode_ms_median"] > 0 and p["tokens_per_s"] > 0 for p in points)
    by_key = {(p["backend"], p["strategy"], p["batch"]): p for p in points}
    assert by_key[("ort", "every2", 2)]["kv_bytes"] * 2 == by_key[("ort", "none", 2)]["kv_bytes"]
    capacity = report["max_batch_in_budget"]
    assert capacity["every2"]["16"] >= 2 * capacity["none"]["16"] - 1  # half the cache: twice the batch
    # what produced the numbers heads the table
    first, _, header = (out / "bench.md").read_text().splitlines()[:3]
    assert report["software"]["onnxruntime"] == onnxruntime.__version__ and "ort_cuda_sessions" not in report["software"]
    assert first.startswith("Measured on cpu with torch ") and f"onnxruntime {onnxruntime.__version__}" in first
    assert header.startswith("| backend | strategy |")
    for plot in ("bench_latency.png", "bench_memory.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.partial"))


def test_bench_tensorrt_needs_cuda(tiny_neox, tmp_path, capsys):
    assert main(["bench", "--model", str(tiny_neox), "--share", "none", "--backends", "tensorrt", "--batch", "1",
                 "--context", "16", "--provider", "cpu", "--dtype", "float32", "--output", str(tmp_path)]) == 2
    assert "needs --provider cuda" in capsys.readouterr().err


def test_bench_optimum_missing_is_one_clear_error(tiny_neox, tmp_path, capsys):
    from kvexport.runtime.baselines import optimum_installed

    if optimum_installed():
        pytest.skip("optimum is installed here")
    assert main(["bench", "--model", str(tiny_neox), "--share", "none", "--backends", "optimum", "--batch", "1",
                 "--context", "16", "--provider", "cpu", "--dtype", "float32", "--output", str(tmp_path / "b")]) == 2
    assert "kvexport[optimum]" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before any export


def test_optimum_baseline_matches_transformers_and_benches(tiny_neox, tmp_path):
    """The Optimum baseline computes the same model (so the comparison is fair) and runs in the bench."""
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx needs transformers < 4.58: pip install "
                        "'kvexport[optimum]' in its own environment")
    from kvexport.runtime.baselines import baseline_model

    cpu = torch.device("cpu")
    ids = torch.randint(0, 8192, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad(), baseline_model("hf", tiny_neox, cpu, torch.float32) as hf, \
            baseline_model("optimum", tiny_neox, cpu, torch.float32) as optimum:
        expected, got = hf(input_ids=ids, attention_mask=mask), optimum(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
        token, longer = torch.zeros((2, 1), dtype=torch.long), torch.ones((2, 10), dtype=torch.long)
        step = optimum(input_ids=token, attention_mask=longer, past_key_values=got.past_key_values)
        full = hf(input_ids=torch.cat([ids, token], 1), attention_mask=longer)
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-4)

    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_neox), "--share", "none", "every:2", "--batch", "1", "--context", "16",
                 "--provider", "cpu", "--dtype", "float32", "--steps", "2", "--warmup", "1",
                 "--output", str(out)]) == 0  # default backends: optimum is in because it is installed
    points = json.loads((out / "bench.json").read_text())["points"]
    assert sorted({(p["backend"], p["strategy"]) for p in points}) == [
        ("hf", "none"), ("optimum", "none"), ("ort", "every2"), ("ort", "none"), ("ort-static", "every2"),
        ("ort-static", "none")]


def test_baseline_cache_filled_in_chunks_decodes_like_one_prefill(tiny_neox, monkeypatch):
    """Large baseline points fill the cache in chunks (ONNX Runtime's CUDA kernels stop at 2^31 elements);
    the decode steps after it must see the same cache as after one prefill."""
    from kvexport.runtime import bench
    from kvexport.runtime.baselines import baseline_model

    class Recording:
        def __init__(self, model):
            self.model, self.config, self.last_logits = model, model.config, []
            self.forward = model.forward  # its signature names the cache argument

        def __call__(self, **inputs):
            output = self.model(**inputs)
            self.last_logits.append(output.logits[:, -1])
            return output

    cpu = torch.device("cpu")
    runs = {}
    with baseline_model("hf", tiny_neox, cpu, torch.float32) as model:
        for limit in (10**6, 16):  # one prefill; chunks of 16 tokens (8 positions at batch 2)
            monkeypatch.setattr(bench, "PREFILL_TOKEN_LIMIT", limit)
            torch.manual_seed(0)  # the same prompt ids both times
            recording = Recording(model)
            prefill_ms, _ = bench.time_baseline(recording, 2, 40, 3, 1, cpu)
            runs[limit] = (prefill_ms, recording.last_logits)
    (one_ms, one), (chunked_ms, chunked) = runs[10**6], runs[16]
    assert one_ms is not None and chunked_ms is None  # chunked fills are not reported as a prefill time
    assert len(one) == 1 + 4 and len(chunked) == 36 // 8 + 1 + 4  # 36 cached tokens, then 4 decode steps
    for expected, actual in zip(one[1:], chunked[-4:], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_bench_on_cuda_without_a_gpu_is_one_clear_error(tiny_neox, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--model", str(tiny_neox), "--batch", "1", "--context", "16",
                 "--output", str(tmp_path / "b")]) == 2  # --provider cuda is the default
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--provider cpu" in error[0]
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_compiled_static_cache_baseline_decodes_like_transformers(tiny_neox):
    """hf-compile (StaticCache + torch.compile) computes the same model as eager transformers, and the bench's
    decode loop times it."""
    from kvexport.runtime.baselines import baseline_model
    from kvexport.runtime.bench import time_baseline

    cpu = torch.device("cpu")
    ids = torch.randint(0, 8192, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), baseline_model("hf", tiny_neox, cpu, torch.float32) as hf, \
            baseline_model("hf-compile", tiny_neox, cpu, torch.float32) as compiled:
        cache = compiled.new_cache(12)
        logits = compiled(ids, cache, 0).logits[:, -1]
        for step in range(3):
            token = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            logits = compiled(token, cache, ids.shape[1] - 1).logits[:, -1]
            torch.testing.assert_close(logits, hf(input_ids=ids).logits[:, -1], rtol=1e-4, atol=1e-4)
        prefill_ms, times = time_baseline(compiled, batch=2, context=12, steps=2, warmup=1, device=cpu)
    assert prefill_ms > 0 and len(times) == 2 and min(times) > 0


def test_a_baseline_that_cannot_run_the_model_is_recorded_as_n_a(tiny_neox, export_cache):
    """GenAI's builder has no GPT-NeoX: every point of that backend is n/a with the reason, and the rest runs."""
    from kvexport.runtime import ExportedModel
    from kvexport.runtime.bench import BenchSettings, run_bench, table

    settings = BenchSettings(backends=("ort-genai", "ort"), batches=(1,), contexts=(16,), steps=2, warmup=1)
    report = run_bench({"none": export_cache(tiny_neox, "none")}, tiny_neox, settings)
    genai, ort = report["points"]
    assert genai["decode_ms_median"] is None and "no gpt_neox model" in genai["note"]
    assert ort["decode_ms_median"] > 0 and ort["note"] is None
    assert "| ort-genai | none | 1 | 16 | n/a: GenAI's model builder has no gpt_neox" in table(report)
    assert ExportedModel.load(export_cache(tiny_neox, "none")).facts.architecture == "gpt_neox"


def test_genai_baseline_runs_on_llama(tiny_llama, export_cache):
    pytest.importorskip("onnxruntime_genai", reason="ONNX Runtime GenAI is not installed (pip install "
                        "onnxruntime-genai, or 'kvexport[genai]' on a GPU)")
    from kvexport.runtime.bench import BenchSettings, run_bench

    settings = BenchSettings(backends=("ort-genai",), batches=(1, 2), contexts=(16,), steps=2, warmup=1)
    points = run_bench({"none": export_cache(tiny_llama, "none")}, tiny_llama, settings)["points"]
    assert [p["batch"] for p in points] == [1, 2] and all(p["decode_ms_median"] > 0 for p in points)


def test_allocate_needs_cuda_and_the_static_backend(tiny_neox, tmp_path, capsys):
    assert main(["bench", "--model", str(tiny_neox), "--share", "none", "--backends", "ort", "--allocate",
                 "--provider", "cpu", "--output", str(tmp_path / "b")]) == 2
    assert "--allocate measures device memory" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_bench_of_quantized_exports_refuses_float_baselines(tiny_llama, tmp_path):
    """--weights int4: kvexport's points run the int4 graphs; a float baseline is recorded as refused, not timed
    against them (GenAI's int4 build is the peer)."""
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_llama), "--share", "none", "every:2", "--weights", "int4",
                 "--backends", "hf", "ort-static", "--batch", "1", "--context", "16", "--provider", "cpu",
                 "--dtype", "float32", "--steps", "2", "--warmup", "1", "--output", str(out)]) == 0
    points = {(p["backend"], p["strategy"]): p for p in json.loads((out / "bench.json").read_text())["points"]}
    assert set(points) == {("hf", "none-int4"), ("ort-static", "none-int4"), ("ort-static", "every2-int4")}
    assert "runs float weights" in points[("hf", "none-int4")]["note"]
    assert points[("ort-static", "every2-int4")]["decode_ms_median"] > 0
    manifest = json.loads((out / "exports" / "every2-int4" / "kvexport.json").read_text())
    assert manifest["weights"]["format"] == "int4"


def test_bench_times_an_int8_cache_on_both_graphs(tiny_llama, tmp_path):
    """--kv-cache int8: the decode points start from random int8 codes, on the dynamic and the static graph."""
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_llama), "--share", "every:2", "--kv-cache", "int8", "--backends", "ort",
                 "ort-static", "--batch", "2", "--context", "16", "--provider", "cpu", "--dtype", "float32",
                 "--steps", "2", "--warmup", "1", "--output", str(out)]) == 0
    points = json.loads((out / "bench.json").read_text())["points"]
    assert {p["strategy"] for p in points} == {"every2-int8kv"} and len(points) == 2
    assert all(p["decode_ms_median"] > 0 for p in points)


def test_bench_times_a_float8_cache_on_the_dynamic_graph(tiny_llama, tmp_path):
    """--kv-cache fp8 on the CPU: the dynamic graph's decode points start from random float8 codes."""
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_llama), "--share", "every:2", "--kv-cache", "fp8", "--backends", "ort",
                 "--batch", "2", "--context", "16", "--provider", "cpu", "--dtype", "float32", "--steps", "2",
                 "--warmup", "1", "--output", str(out)]) == 0
    points = json.loads((out / "bench.json").read_text())["points"]
    assert [p["strategy"] for p in points] == ["every2-fp8kv"] and points[0]["decode_ms_median"] > 0
