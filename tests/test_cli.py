import json

import pytest

from kvexport.exporter.cli import main


def test_headline_command_exports_validates_and_generates(tiny_neox, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["--model", str(tiny_neox), "--share", "every:2", "--output", str(out), "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "validation (float32)" in printed and "2 of 4 layers cache K/V" in printed
    assert "50% saved" in printed
    manifest = json.loads((out / "kvexport.json").read_text())
    assert manifest["cache"]["owners"] == [0, 2]
    assert manifest["files"]["static_decode"] == "model_static.onnx"  # serve and ort-static run it as it is
    assert main(["inspect", str(out)]) == 0
    inspect = capsys.readouterr().out
    assert "layer   0 owns, shared by 1" in inspect and "KV bytes per token  1024 vs 2048 full" in inspect


def test_no_static_writes_the_dynamic_graph_only(tiny_neox, tmp_path):
    out = tmp_path / "export"
    assert main(["--model", str(tiny_neox), "--share", "none", "--output", str(out), "--max-new-tokens", "0",
                 "--no-static"]) == 0
    assert json.loads((out / "kvexport.json").read_text())["files"]["static_decode"] is None
    assert not (out / "model_static.onnx").exists()


def test_strategy_make_then_export(tiny_neox, tmp_path, capsys):
    strategy = tmp_path / "s.json"
    assert main(["strategy", "make", "every:4", "--model", str(tiny_neox), "-o", str(strategy)]) == 0
    assert json.loads(strategy.read_text())["kv_source"] == [0, 0, 0, 0]
    out = tmp_path / "e"
    assert main(["export", "--model", str(tiny_neox), "--share", str(strategy), "--output", str(out),
                 "--max-new-tokens", "0"]) == 0


@pytest.mark.parametrize("kv_source, message", [
    ([0, 0, 1, 3], "itself reuses layer 0"),
    ([0, 2, 2, 3], "from later layer 2"),
    ([0, 1, 2], "has 3 layers but the model has 4"),
])
def test_bad_strategy_exits_non_zero_with_one_line_and_no_output(tiny_neox, tmp_path, capsys, kv_source, message):
    strategy = tmp_path / "bad.json"
    strategy.write_text(json.dumps({"version": 1, "num_layers": len(kv_source), "kv_source": kv_source}))
    out = tmp_path / "out"
    assert main(["--model", str(tiny_neox), "--share", str(strategy), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvexport: error:") and message in err and "\n" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_hub_model_offline_says_how_to_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["--model", "pythia-160m", "--share", "every:2", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'EleutherAI/pythia-160m' is not in the local Hugging Face cache" in err and "--model DIR" in err


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert main(["--model", str(tmp_path / "gpt2"), "--share", "none", "--output", str(tmp_path / "o")]) == 2
    assert "architecture 'gpt2' of" in capsys.readouterr().err


def test_generate_rejects_bad_sampling_and_long_prompts(tiny_neox, export_cache, capsys):
    directory = str(export_cache(tiny_neox, "none"))
    assert main(["generate", directory, "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", directory, "--prompt", "word " * 200]) == 2
    assert "shorten the prompt" in capsys.readouterr().err


def test_model_without_tokenizer_exports_and_skips_generation(tiny_neox, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_neox, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    assert main(["--model", str(bare), "--share", "none", "--output", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "skipped the sample generation" in printed and "has no tokenizer files" in printed
    assert (tmp_path / "o" / "kvexport.json").is_file()


def test_long_texts_print_no_tokenizer_warning(tiny_neox, export_cache):
    """Past the tokenizer's model_max_length (512): kvexport's own one-line refusal, nothing from transformers."""
    import subprocess
    import sys

    directory = str(export_cache(tiny_neox, "none"))
    run = subprocess.run([sys.executable, "-m", "kvexport", "generate", directory, "--prompt", "word " * 600],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "shorten the prompt" in run.stderr


def test_a_model_too_large_for_the_provider_skips_the_sample_in_one_line(tiny_neox, export_cache, tmp_path, capsys,
                                                                         monkeypatch):
    from kvexport.runtime import ExportedModel, memory

    model = ExportedModel.load(export_cache(tiny_neox, "none"))
    assert memory.shortfall(model, "cpu") is None
    model.manifest["weight_bytes"] = 1 << 50
    assert "this machine has" in memory.shortfall(model, "cpu")
    monkeypatch.setattr(memory, "shortfall", lambda model, provider: "it needs about 26.0 GiB")
    assert main(["--model", str(tiny_neox), "--share", "none", "--output", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "skipped the sample generation on cpu: it needs about 26.0 GiB" in printed


def test_provider_auto_takes_the_gpu_where_the_export_runs_there(monkeypatch):
    """With a GPU and onnxruntime-gpu: cuda, except for a float32 export's static graph, whose attention has no
    float32 CUDA kernel (it stays on the CPU), and for an int8 cache; an explicit provider is kept."""
    import onnxruntime
    import torch

    from kvexport.runtime.ort_session import resolve_provider

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_provider("auto", "float16", static=True) == "cuda"
    assert resolve_provider("auto", "float32", static=False) == "cuda"
    assert resolve_provider("auto", "float32", static=True) == "cpu"
    assert resolve_provider("cpu", "float16", static=True) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_provider("auto", "float16", static=True) == "cpu"


def test_dtype_auto_keeps_a_16_bit_checkpoint_in_float16_on_a_gpu(tiny_llama, monkeypatch):
    """--dtype auto (the default): float16 for a checkpoint stored in 16 bits where the export will run on a GPU,
    float32 on the CPU (also where --provider cpu is asked for) and for a float32 checkpoint; an explicit dtype
    is kept."""
    from dataclasses import replace

    import onnxruntime
    import torch

    from kvexport.exporter.loading import load_model
    from kvexport.exporter.pipeline import export_dtype

    stored32 = load_model(str(tiny_llama)).description
    stored16 = replace(stored32, embed=stored32.embed.half())
    assert [export_dtype("auto", d) for d in (stored16, stored32)] == ["float32", "float32"]  # no GPU here
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [export_dtype("auto", d) for d in (stored16, stored32)] == ["float16", "float32"]
    assert export_dtype("auto", stored16, provider="cpu") == "float32"  # --provider cpu: it will run on the CPU
    assert export_dtype("float32", stored16) == "float32"
