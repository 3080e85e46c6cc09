"""Damaged exports and bad requests end in a KvexportError subclass (one line and exit 2 from the CLI), before
anything runs: each damaged file and each bad request, one by one."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys

import pytest

from kvexport.exporter import export
from kvexport.exporter.cli import main
from kvexport.runtime import ExportedModel, Generator, SamplingConfig
from kvexport.runtime.ort_session import open_graph
from kvexport.strategies import (
    ContractMismatchError,
    ExportDirectoryError,
    InputError,
    IntegrityError,
    KvexportError,
    make_strategy,
)


@pytest.fixture
def damaged(tiny_neox, export_cache, tmp_path):
    """A fresh copy of the tiny model's every:2 export, to damage."""
    copy = tmp_path / "every2"
    shutil.copytree(export_cache(tiny_neox, "every:2"), copy)
    return copy


def expect_refusal(directory, error_type, message, capsys, verify=True):
    with pytest.raises(error_type, match=message):
        Generator(directory, verify=verify).generate([[5, 6, 7]], SamplingConfig(max_new_tokens=2))
    assert main(["generate", str(directory), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvexport: error:") and err.count("\n") == 1


def test_truncated_graph(damaged, capsys):
    with open(damaged / "model.onnx", "r+b") as graph:
        graph.truncate(100_000)
    expect_refusal(damaged, IntegrityError, "model.onnx has 100000 bytes where the manifest records", capsys)


def test_empty_graph(damaged, capsys):
    (damaged / "model.onnx").write_bytes(b"")
    expect_refusal(damaged, IntegrityError, "has 0 bytes", capsys)


def test_graph_copied_from_another_strategy(damaged, tiny_neox, export_cache, capsys):
    shutil.copy(export_cache(tiny_neox, "none") / "model.onnx", damaged / "model.onnx")
    expect_refusal(damaged, IntegrityError, "model.onnx has", capsys)


def test_a_graph_of_another_strategy_is_refused_when_opened(tiny_neox, export_cache):
    """Even where sizes and hashes are not consulted: the graph's inputs and outputs must be the strategy's."""
    model = ExportedModel.load(export_cache(tiny_neox, "none"))
    other = dataclasses.replace(model, strategy=make_strategy("every:2", 4))
    with pytest.raises(ContractMismatchError, match="not the graph of this export's strategy"):
        open_graph(other, "model.onnx")


def test_malformed_manifest(damaged, capsys):
    (damaged / "kvexport.json").write_text('{"format": "kvexport", "version": ')
    expect_refusal(damaged, ExportDirectoryError, "kvexport.json is not valid JSON", capsys)


def test_edited_manifest(damaged, capsys):
    manifest = json.loads((damaged / "kvexport.json").read_text())
    manifest["model"]["vocab_size"] = 100
    (damaged / "kvexport.json").write_text(json.dumps(manifest))
    expect_refusal(damaged, IntegrityError, "was changed after the export was made", capsys)


def test_deleted_tokenizer(damaged, capsys):
    (damaged / "tokenizer.json").unlink()
    expect_refusal(damaged, IntegrityError, "tokenizer.json is missing", capsys)


def test_strategy_rewritten_to_another(damaged, capsys):
    strategy = json.loads((damaged / "strategy.json").read_text())
    strategy["kv_source"] = [0, 1, 1, 3]  # another valid strategy of the same byte length
    (damaged / "strategy.json").write_text(json.dumps(strategy, indent=2) + "\n")
    # (with hashes, strategy.json's sha256 catches it first; without, the comparison with the manifest does)
    expect_refusal(damaged, ContractMismatchError, "is not the strategy the model was exported with", capsys,
                   verify=False)


def test_flipped_weight_bytes_are_caught_by_hashes(damaged, capsys):
    data = bytearray((damaged / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the weights: same size, other numbers
    (damaged / "model.onnx").write_bytes(bytes(data))
    ExportedModel.load(damaged)  # sizes alone cannot see it
    expect_refusal(damaged, IntegrityError, "does not have the sha256 the manifest records", capsys)
    assert main(["verify", str(damaged)]) == 2
    assert "sha256" in capsys.readouterr().err


def test_verify_reports_an_intact_export(tiny_neox, export_cache, capsys):
    directory = export_cache(tiny_neox, "every:2")
    assert main(["verify", str(directory)]) == 0
    out = capsys.readouterr().out
    assert ": ok:" in out and "match their sizes and sha256" in out and "2 of 4 layers own a cache" in out


@pytest.mark.parametrize("prompts, config, message", [
    ([[1_000_000]], {}, r"token id 1000000 outside the vocabulary \[0, 8192\)"),
    ([[5, -3]], {}, r"token id -3 outside the vocabulary"),
    ([[1.5, 2.0]], {}, "not an integer"),
    ("hello", {}, "must be a list of prompts"),
    ([None], {}, "prompt 0 is a NoneType"),
    ([[5]], {"temperature": math.nan}, "temperature must be a finite number"),
    ([[5]], {"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
    ([[5]], {"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ([[5]], {"stop_token_ids": [9999]}, "stop token id 9999 is outside"),
    ([], {}, "no prompts"),
    ([[]], {}, "prompt 0 has no tokens"),
])
def test_bad_requests_are_input_errors(tiny_neox, export_cache, prompts, config, message):
    generator = Generator(export_cache(tiny_neox, "none"))
    with pytest.raises(InputError, match=message):
        generator.generate(prompts, SamplingConfig(**{"max_new_tokens": 2, **config}))


def test_batch_over_the_static_decoders_max_batch_is_refused_before_running(tiny_neox, tmp_path):
    directory = export(str(tiny_neox), "none", tmp_path / "static", static=True, log=lambda _: None).directory
    generator = Generator(directory, backend="ort-static", max_batch=2, max_length=32)
    with pytest.raises(InputError, match="exceed the decoder's max_batch 2"):
        generator.generate([[1], [2], [3]], SamplingConfig(max_new_tokens=2))
    with pytest.raises(InputError, match=r"exceeds the decoder's cache length \(32\)"):
        generator.generate([[1] * 30], SamplingConfig(max_new_tokens=3))
    assert not generator.decoder._bindings  # nothing ran


def test_leftover_partial_of_a_dead_process_is_removed(tiny_neox, tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    stale = tmp_path / f".out.partial-{finished.stdout.strip()}"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    export(str(tiny_neox), "none", tmp_path / "out", log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_error_hierarchy():
    for error in (ExportDirectoryError, IntegrityError, ContractMismatchError, InputError):
        assert issubclass(error, KvexportError)
    assert issubclass(IntegrityError, ExportDirectoryError) and issubclass(InputError, ValueError)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["compress-heads", "--kv-heads", "2"],
                                     ["uptrain", "--share", "every:2", "--data", "README.md", "--steps", "1"]])
def test_device_cuda_without_cuda_is_one_line_and_nothing_is_written(tiny_neox, tmp_path, capsys, command):
    assert main([*command, "--model", str(tiny_neox), "--device", "cuda", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "use --device cpu" in err and not list(tmp_path.iterdir())


def test_a_damaged_fit_record_is_one_line_and_nothing_is_written(tiny_neox, tmp_path, capsys):
    """A model directory whose kvexport_compression.json (or kvexport_uptrain.json) is damaged: export and eval
    refuse it in one line instead of a JSON traceback."""
    model = tmp_path / "model"
    shutil.copytree(tiny_neox, model)
    (model / "kvexport_compression.json").write_text("{broken")
    assert main(["--model", str(model), "--share", "none", "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kvexport_compression.json is not valid JSON" in err
    assert not (tmp_path / "e").exists()
