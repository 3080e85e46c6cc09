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
    state = tmp_path / ".resumed.uptrain" / "state.pt"
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
