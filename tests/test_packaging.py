"""kvexport as a user installs it: the shipped models are package data, `--version`, `python -m kvexport`."""

import subprocess
import sys
import zipfile

import pytest
from conftest import REPO_ROOT

from kvexport.exporter.cli import main
from kvexport.exporter.loading import resolve_model
from kvexport.models import SHIPPED, shipped_directory


def test_shipped_models_resolve_from_the_package_by_alias():
    for alias in SHIPPED:
        reference, directory = resolve_model(alias)
        assert reference == alias and directory == shipped_directory(alias)
        assert (directory / "config.json").is_file() and (directory / "heldout.txt").is_file()


def test_version_from_the_script_and_from_python_m(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("kvexport ")
    run = subprocess.run([sys.executable, "-m", "kvexport", "--version"], capture_output=True, text=True, check=True)
    assert run.stdout.startswith("kvexport 0.")


def test_unknown_alias_is_not_listed_as_known(tmp_path, capsys):
    assert main(["--model", "tiny-nexo", "--share", "none", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    known = err[err.index("alias (") + 7:err.index("):")].split(", ")
    assert "'tiny-nexo' is neither" in err and "tiny-neox" in known and "tiny-nexo" not in known


@pytest.mark.parametrize("argv, status", [(["--version"], 0), (["--help"], 0), (["generate", "x"], 2),
                                          (["--model", "tiny-neox", "--share", "every:2"], 2)])
def test_without_onnxruntime_help_works_and_commands_name_the_extra(argv, status):
    """A bare `pip install kvexport` has no ONNX Runtime (the cpu and gpu extras pick one): --help and --version
    work, and a command that needs it says in one line which extra to install."""
    blocked = "import sys; sys.modules['onnxruntime'] = None; from kvexport.exporter.cli import main; sys.exit(main())"
    run = subprocess.run([sys.executable, "-c", blocked, *argv], capture_output=True, text=True, check=False)
    assert run.returncode == status, run.stderr
    if status:
        assert run.stderr.count("\n") == 1 and "kvexport[cpu]" in run.stderr and "kvexport[gpu]" in run.stderr
    else:
        assert "kvexport" in run.stdout and not run.stderr


@pytest.mark.slow
def test_wheel_carries_the_models_and_not_their_provenance(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO_ROOT)], check=True)
    names = zipfile.ZipFile(next(tmp_path.glob("kvexport-*.whl"))).namelist()
    for alias, folder in SHIPPED.items():
        shipped = {n.split("/")[-1] for n in names if n.startswith(f"kvexport/models/{folder}/")}
        assert {"config.json", "tokenizer.json", "heldout.txt", "model.safetensors.index.json"} <= shipped, alias
        assert not {"training_log.json", "loss.png"} & shipped
    assert "kvexport/__main__.py" in names and "kvexport/models/MODEL_CARD.md" in names
