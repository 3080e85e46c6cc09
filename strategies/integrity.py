"""The integrity section of an export's manifest: the size and sha256 of every file, checked when it is loaded.

Sizes are checked on every load (a stat per file); hashes on demand, since they read every byte (about a
second per GB on one core): the CLI checks them by default, the Python API when asked (ExportedModel.load).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .contract import IntegrityError

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(directory: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} for the named files of a finished export."""
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
            for name in sorted(names)}


def check_files(directory: Path, records: dict[str, dict], hashes: bool) -> None:
    """Every recorded file is there with its recorded size (and, with hashes, its recorded sha256)."""
    fix = f"copy the export again or re-export it ('kvexport verify {directory}' checks every file)"
    for name, record in records.items():
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing from the export: {fix}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise IntegrityError(f"{path} has {size} bytes where the manifest records {record['bytes']} "
                                 f"(truncated or replaced): {fix}")
    if hashes:
        for name, record in records.items():
            if sha256_of(directory / name) != record["sha256"]:
                raise IntegrityError(f"{directory / name} does not have the sha256 the manifest records (its bytes "
                                     f"changed): {fix}")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its own digest (canonical JSON): an edited field changes it."""
    integrity = manifest.get("integrity")
    integrity = {k: v for k, v in integrity.items() if k != "manifest_sha256"} if isinstance(integrity, dict) else None
    return hashlib.sha256(json.dumps({**manifest, "integrity": integrity}, sort_keys=True).encode()).hexdigest()


def seal(manifest: dict) -> dict:
    """Record the manifest's own digest in its integrity section (the last step before it is written)."""
    manifest["integrity"]["manifest_sha256"] = manifest_digest(manifest)
    return manifest


def check_seal(manifest: dict, path: Path) -> None:
    integrity = manifest.get("integrity")
    recorded = integrity.get("manifest_sha256") if isinstance(integrity, dict) else None
    if recorded != manifest_digest(manifest):
        raise IntegrityError(f"{path} was changed after the export was made (its digest does not match): re-export "
                             "the model rather than editing its manifest")
