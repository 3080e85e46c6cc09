import json

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
    assert (out / "bench.md").read_text().startswith("| backend | strategy |")
    for plot in ("bench_latency.png", "bench_memory.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("*.partial"))


def test_bench_tensorrt_needs_cuda(tiny_neox, tmp_path, capsys):
    assert main(["bench", "--model", str(tiny_neox), "--share", "none", "--backends", "tensorrt", "--batch", "1",
                 "--context", "16", "--provider", "cpu", "--dtype", "float32", "--output", str(tmp_path)]) == 2
    assert "needs --provider cuda" in capsys.readouterr().err
