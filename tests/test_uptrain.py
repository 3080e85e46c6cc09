"""kvexport uptrain on a tiny random model: the loss goes down, an interrupted run resumes to the same result, and
the output exports under its strategy only."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from kvexport.exporter import export
from kvexport.models import HELDOUT_FILE, shipped_directory
from kvexport.strategies import KvexportError
from kvexport.training import UptrainSettings, run_uptrain

TEXT = str(shipped_directory("tiny-neox") / HELDOUT_FILE)
SETTINGS = {"steps": 60, "batch_size": 4, "length": 64, "lr": 1e-3, "eval_every": 10, "eval_windows": 8}


def uptrain(model, output, resume=False):
    return run_uptrain(str(model), "every:2", [TEXT], output, UptrainSettings(**SETTINGS), resume=resume,
                       device="cpu", show_progress=False, log=lambda _: None)


@pytest.fixture(scope="module")
def uninterrupted(tiny_neox, tmp_path_factory):
    output = tmp_path_factory.mktemp("uptrain") / "full"
    return output, uptrain(tiny_neox, output)


def test_uptraining_lowers_the_held_out_loss_and_the_output_exports(uninterrupted, tmp_path):
    output, record = uninterrupted
    assert record["best"]["heldout_ppl"] < 0.9 * record["before"]["heldout_ppl"]
    assert (output / "loss.png").stat().st_size > 1000
    assert json.loads((output / "kvexport_uptrain.json").read_text())["strategy"]["kv_source"] == [0, 0, 2, 2]
    result = export(str(output), str(output / "strategy.json"), tmp_path / "export", log=lambda _: None)
    assert result.validation.passed
    with pytest.raises(KvexportError, match="trained or fitted for the strategy"):
        export(str(output), "none", tmp_path / "other", log=lambda _: None)


def test_a_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, tiny_neox, tmp_path):
    expected_dir, expected = uninterrupted
    output = tmp_path / "resumed"
    state = tmp_path / ".resumed.uptrain" / "state" / "progress.json"
    args = ["uptrain", "--model", str(tiny_neox), "--share", "every:2", "--data", TEXT, "--device", "cpu",
            "-o", str(output)] + [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    command = [sys.executable, "-c", "import sys; from kvexport.exporter.cli import main; sys.exit(main(sys.argv[1:]))"]
    process = subprocess.Popen([*command, *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)  # mid-run: after its first checkpoint
    process.wait()
    assert not output.exists(), "the run finished before it could be killed: make it longer"
    with pytest.raises(KvexportError, match="pass --resume"):
        uptrain(tiny_neox, output)
    resumed = uptrain(tiny_neox, output, resume=True)
    assert resumed["history"] == expected["history"]
    actual, wanted = load_file(output / "model.safetensors"), load_file(expected_dir / "model.safetensors")
    assert all((actual[name] == wanted[name]).all() for name in wanted)


def held_out(model, settings: UptrainSettings):
    """The held-out windows run_uptrain evaluates on, when given no --eval-data."""
    from kvexport.exporter.loading import load_model
    from kvexport.training.data import held_out_windows, split_tail, text_files, token_stream

    tokenizer = load_model(str(model)).tokenizer()
    ids = token_stream(tokenizer, text_files([TEXT]), tokenizer.eos_token_id)
    return held_out_windows(split_tail(ids, settings.held_out_fraction, settings.length)[1], settings.length,
                            settings.eval_windows)


def perplexity_of(model_dir, strategy_spec: str, windows) -> float:
    """Held-out perplexity of a checkpoint under a strategy, through the reference decoder in float32."""
    import math

    import torch
    import torch.nn.functional as F

    from kvexport.exporter.loading import load_model
    from kvexport.exporter.reference import ReferenceDecoder
    from kvexport.strategies import make_strategy

    loaded = load_model(str(model_dir))
    strategy = make_strategy(strategy_spec, loaded.config.num_hidden_layers, loaded.reference)
    reference = ReferenceDecoder(loaded.description, strategy, torch.float32)
    ones = torch.ones_like(windows)
    with torch.no_grad():
        logits = reference.forward(windows, ones, torch.arange(windows.shape[1]).expand_as(windows)).logits
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item())


def test_lora_trains_adapters_alone_and_merges_them_into_the_output(tiny_neox, tmp_path):
    """Rank-4 adapters lower the held-out loss; the written checkpoint (adapters merged into the projections
    through the description, GPT-NeoX's fused Q|K|V included) scores what the adapters scored; the layers'
    norms and the embeddings are the source's."""
    settings = UptrainSettings(**{**SETTINGS, "steps": 30, "lr": 3e-3}, lora_rank=4)
    output = tmp_path / "lora"
    record = run_uptrain(str(tiny_neox), "every:2", [TEXT], output, settings, device="cpu", show_progress=False,
                         log=lambda _: None)
    assert record["best"]["heldout_ppl"] < 0.95 * record["before"]["heldout_ppl"]
    merged = perplexity_of(output, str(output / "strategy.json"), held_out(tiny_neox, settings))
    assert abs(merged / record["best"]["heldout_ppl"] - 1) < 1e-4
    source, written = load_file(tiny_neox / "model.safetensors"), load_file(output / "model.safetensors")
    changed = {name for name in source if not (source[name] == written[name]).all()}
    assert changed and all("query_key_value" in n or "dense" in n for n in changed)
    assert not any("layernorm" in n or "embed" in n for n in changed)
    assert export(str(output), str(output / "strategy.json"), tmp_path / "export", log=lambda _: None).validation.passed


def test_gradient_checkpointing_changes_memory_not_results(tiny_neox, tmp_path):
    runs = [run_uptrain(str(tiny_neox), "every:2", [TEXT], tmp_path / f"run{flag}",
                        UptrainSettings(**{**SETTINGS, "steps": 10}, gradient_checkpointing=flag, lora_rank=2),
                        device="cpu", show_progress=False, log=lambda _: None) for flag in (False, True)]
    losses = [[h["loss"] for h in run["history"] if "loss" in h] for run in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def descendants(pid: int) -> list[int]:
    from pathlib import Path

    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    return children + [d for child in children for d in descendants(child)]


def torchrun(processes: int, model, output, cwd, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    args = ["uptrain", "--model", str(model), "--share", "every:2", "--data", TEXT, "--device", "cpu",
            "-o", str(output), *extra] + [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                             "--standalone", "-m", "kvexport", *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_with_fsdp_match_one_and_resume_from_their_shards(uninterrupted, tiny_neox, tmp_path):
    """torchrun over gloo: each process takes half of every batch and FSDP2 shards the model. Killed after its
    first checkpoint and resumed, the run gives the single process's losses, evaluations and weights, up to the
    order of floating-point sums (the gradients are averaged over the processes in another order)."""
    expected_dir, expected = uninterrupted
    output = tmp_path / "sharded"
    state = tmp_path / ".sharded.uptrain" / "state" / "progress.json"
    process = torchrun(2, tiny_neox, output, tmp_path)
    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    for pid in [process.pid, *descendants(process.pid)]:  # torchrun starts its workers in sessions of their own
        os.kill(pid, signal.SIGKILL)
    process.wait()
    assert not output.exists(), "the run finished before it could be killed: make it longer"
    shards = {p.name for p in state.parent.iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp"} <= shards  # one file per process
    resumed = torchrun(2, tiny_neox, output, tmp_path, ("--resume",))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    history = json.loads((output / "kvexport_uptrain.json").read_text())["history"]
    assert len(history) == len(expected["history"])
    for got, want in zip(history, expected["history"], strict=True):
        assert got == pytest.approx(want, rel=1e-4), (got, want)
    actual, wanted = load_file(output / "model.safetensors"), load_file(expected_dir / "model.safetensors")
    # Relative to each tensor's norm: an element whose gradient sums to nearly zero can get Adam's full step in
    # either direction from rounding alone (a few embedding rows do), so elementwise bounds would test rounding.
    differences = {name: ((actual[name] - wanted[name]).norm() / wanted[name].norm()).item() for name in wanted}
    assert max(differences.values()) < 1e-3, differences
