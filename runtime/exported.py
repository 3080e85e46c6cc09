"""An export directory as the runtime sees it: the manifest (kvexport.json), the ONNX file, the tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvexport.strategies import CacheLayout, KvexportError, ModelFacts, Strategy
from kvexport.strategies import contract as c

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one of them makes a tokenizer


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
    def load(cls, directory: str | Path) -> ExportedModel:
        directory = Path(directory)
        manifest_path = directory / c.MANIFEST_FILE
        if not manifest_path.is_file():
            raise KvexportError(f"{directory} is not a kvexport export (no {c.MANIFEST_FILE}): run 'kvexport export' first")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != c.FORMAT_NAME or manifest.get("version") != c.FORMAT_VERSION:
            raise KvexportError(f"{manifest_path} is format {manifest.get('format')} v{manifest.get('version')}; "
                                f"this kvexport reads {c.FORMAT_NAME} v{c.FORMAT_VERSION}: re-export the model")
        facts = ModelFacts(**manifest["model"])
        strategy = Strategy.from_dict(manifest["strategy"])
        layout = CacheLayout(owners=strategy.owners, num_layers=facts.num_layers, num_kv_heads=facts.num_kv_heads,
                             head_dim=facts.head_dim, dtype=manifest["dtype"])
        return cls(directory, manifest, facts, strategy, layout)

    @property
    def has_tokenizer(self) -> bool:
        return any((self.directory / name).is_file() for name in TOKENIZER_FILES)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.directory)
