"""An export directory as the runtime sees it: the manifest (kvexport.json), the ONNX files, the tokenizer.

Loading checks the directory before anything runs: the manifest parses and is of this format, every file it
records is there with its size (and, when asked, its sha256), and strategy.json is the manifest's strategy.
Opening a graph (ort_session.open_graph) checks its inputs and outputs against the strategy's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvexport.strategies import (
    CacheLayout,
    ContractMismatchError,
    ExportDirectoryError,
    KvexportError,
    ModelFacts,
    Strategy,
    load_strategy,
)
from kvexport.strategies import contract as c
from kvexport.strategies.integrity import check_files, check_seal

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one of them makes a tokenizer
DTYPES = ("float32", "float16")


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


@dataclass
class ExportedModel:
    directory: Path
    manifest: dict
    facts: ModelFacts
    strategy: Strategy
    layout: CacheLayout

    @property
    def onnx_path(self) -> Path:
        return self.directory / self.manifest["files"]["onnx"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @classmethod
    def load(cls, directory: str | Path, verify_hashes: bool = False) -> ExportedModel:
        """verify_hashes: also compare every file's sha256 with the manifest's, which catches changed bytes of the
        same size (flipped bits in the weights); it reads every byte, about a second per GB."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        path = directory / c.MANIFEST_FILE
        try:
            facts = ModelFacts(**manifest["model"])
            strategy = Strategy.from_dict(manifest["strategy"])
            records = manifest["integrity"]["files"]
            dtype, files = manifest["dtype"], manifest["files"]
            onnx_name = files["onnx"]
            if dtype not in DTYPES or not isinstance(records, dict) or onnx_name not in records:
                raise TypeError("dtype, files or integrity")
            layout = CacheLayout(owners=strategy.owners, num_layers=facts.num_layers,
                                 num_kv_heads=facts.num_kv_heads, head_dim=facts.head_dim,
                                 dtype=manifest["cache"].get("dtype", dtype))
        except (KeyError, TypeError, KvexportError) as error:
            raise ExportDirectoryError(f"{path} is damaged ({type(error).__name__}: {error}): re-export the "
                                       "model") from None
        if facts.num_layers != strategy.num_layers:
            raise ContractMismatchError(f"{path} records {facts.num_layers} layers but a strategy of "
                                        f"{strategy.num_layers}: re-export the model")
        check_files(directory, records, hashes=verify_hashes)
        on_disk = load_strategy(directory / c.STRATEGY_FILE)
        if on_disk.kv_source != strategy.kv_source:
            raise ContractMismatchError(f"{directory / c.STRATEGY_FILE} is not the strategy the model was exported "
                                        f"with (kv_source {list(on_disk.kv_source)} vs {list(strategy.kv_source)} in "
                                        f"{c.MANIFEST_FILE}): re-export with the strategy you want")
        return cls(directory, manifest, facts, strategy, layout)

    @property
    def has_tokenizer(self) -> bool:
        return has_tokenizer_files(self.directory)

    @property
    def quantized_weights(self) -> dict | None:
        """The projections' quantized format ({"format", "bits", "block"}), or None where they are in the dtype."""
        weights = self.manifest.get("weights", {})
        return weights if "bits" in weights else None

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.directory)
        except Exception as error:  # noqa: BLE001 - transformers raises many types for a bad tokenizer
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ExportDirectoryError(f"the tokenizer of {self.directory} cannot be loaded ({first}): copy the "
                                       "export again, or pass token ids instead of text") from None


def read_manifest(directory: Path) -> dict:
    """The parsed kvexport.json of this format, or a one-line ExportDirectoryError."""
    path = directory / c.MANIFEST_FILE
    if not path.is_file():
        raise ExportDirectoryError(f"{directory} is not a kvexport export (no {c.MANIFEST_FILE}): run "
                                   "'kvexport export' first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportDirectoryError(f"{path} is not valid JSON ({error}): the export is damaged; re-export "
                                   "the model") from None
    if not isinstance(manifest, dict):
        raise ExportDirectoryError(f"{path} is not a JSON object: the export is damaged; re-export the model")
    if manifest.get("format") != c.FORMAT_NAME or manifest.get("version") != c.FORMAT_VERSION:
        raise ExportDirectoryError(f"{path} is format {manifest.get('format')} v{manifest.get('version')}; this "
                                   f"kvexport reads {c.FORMAT_NAME} v{c.FORMAT_VERSION}: re-export the model")
    check_seal(manifest, path)
    return manifest
