"""Training text: files, or folders of them, tokenized into one stream and read as fixed-length windows."""

from __future__ import annotations

from pathlib import Path

import torch

from kvexport.strategies import KvexportError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl"}


def text_files(paths: list[str | Path]) -> list[Path]:
    """The files named, and the text files under the folders named, in a fixed (sorted) order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise KvexportError(f"{path} has no text files ({', '.join(sorted(TEXT_SUFFIXES))}): pass text "
                                    "files or a folder of them with --data")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise KvexportError(f"training data {path} does not exist: pass text files or folders with --data")
    return files


def token_stream(tokenizer, files: list[Path], eos_id: int) -> torch.Tensor:
    """Every file's tokens followed by the end-of-text id, as one int64 tensor."""
    ids: list[int] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise KvexportError(f"{file} is not UTF-8 text: pass text files with --data") from None
        ids += tokenizer(text, verbose=False)["input_ids"] + [eos_id]
    return torch.tensor(ids, dtype=torch.int64)


def split_tail(ids: torch.Tensor, fraction: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out part is the stream's last `fraction`, at least one window."""
    held = max(length, int(len(ids) * fraction))
    if len(ids) - held < 2 * length:
        raise KvexportError(f"the training text has {len(ids)} tokens: too few for windows of {length} and a "
                            "held-out part; give more text or a smaller --length")
    return ids[:-held], ids[-held:]


def train_batch(ids: torch.Tensor, step: int, size: int, length: int, seed: int) -> torch.Tensor:
    """Batch `step`: `size` windows at random starts drawn from (seed, step) alone, so a resumed run reads the same
    batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(ids) - length + 1, (size,), generator=generator)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def held_out_windows(ids: torch.Tensor, length: int, limit: int) -> torch.Tensor:
    """Consecutive windows of the held-out stream, at most `limit`."""
    count = min(limit, len(ids) // length)
    if count == 0:
        raise KvexportError(f"the held-out text has {len(ids)} tokens, fewer than one window of {length}: give more "
                            "--eval-data or a smaller --length")
    return ids[:count * length].view(count, length)
