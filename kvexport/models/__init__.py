"""The models kvexport ships inside its wheel: the default model and its held-out text, usable offline.

Each is a Hugging Face model directory of package data, found through importlib.resources so that it works
from a checkout, an editable install and a wheel alike. Their training script, log and licence stay in the
repository's samples/ (see MODEL_CARD.md beside this file).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# alias -> directory of package data
SHIPPED = {"tiny-neox": "tiny-neox-pydoc", "tiny-llama": "tiny-llama-pydoc"}
DEFAULT_MODEL = "tiny-neox"
HELDOUT_FILE = "heldout.txt"  # held-out text of the model's corpus: default calibration and evaluation text


def shipped_directory(alias: str) -> Path:
    """The directory of a shipped model (wheels install unzipped, so package data is a real directory)."""
    return Path(str(files(__name__) / SHIPPED[alias]))
