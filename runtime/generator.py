"""Prefill + decode over an exported model: batches of prompts, sampling, streaming, per-run report."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kvexport.strategies import InputError, KvexportError
from kvexport.strategies.contract import positions_from_mask

from .decoder import Decoder
from .exported import ExportedModel
from .ort_session import OrtDecoder
from .sampling import SamplingConfig, choose_tokens, is_integer

Prompt = str | Sequence[int]


@dataclass
class GenerationStats:
    batch: int
    prompt_tokens: int  # longest prompt, the prefill length
    new_tokens: int  # decode steps taken (tokens per sequence, at most max_new_tokens)
    prefill_ms: float
    decode_ms_per_token: float  # mean over decode steps; 0 when only the prefill ran
    kv_bytes: int  # cache held at the end, owners only
    kv_bytes_full: int  # the same batch and length with every layer caching

    def summary(self) -> str:
        saved = 1 - self.kv_bytes / self.kv_bytes_full if self.kv_bytes_full else 0.0
        return (f"batch {self.batch}, prompt {self.prompt_tokens} tokens, {self.new_tokens} new: prefill "
                f"{self.prefill_ms:.1f} ms, decode {self.decode_ms_per_token:.2f} ms/token; KV cache "
                f"{self.kv_bytes / 1024:.1f} KiB vs {self.kv_bytes_full / 1024:.1f} KiB full ({saved:.0%} saved)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StreamEvent:
    step: int
    token_ids: np.ndarray  # [batch], this step's token per sequence (pad for finished ones)
    text_deltas: list[str]  # new text per sequence ("" for finished ones)
    finished: list[bool]


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # new tokens per prompt, a stop token included if one ended it
    texts: list[str]
    stats: GenerationStats


BACKENDS = ("ort", "ort-static", "tensorrt")


def make_decoder(model: ExportedModel, backend: str = "ort", provider: str = "cpu", device_id: int = 0,
                 max_batch: int = 8, cuda_graph: bool = False, max_length: int | None = None,
                 prefill_chunk: int = 512, prefill_batch: int | None = None) -> Decoder:
    """ort: the dynamic graph, cache growing per step; ort-static: preallocated buffers updated in place
    (CUDA graphs optional; prompts prefilled in chunks of at most prefill_chunk tokens); tensorrt: an engine
    built by kvexport build-engine."""
    if backend == "ort":
        return OrtDecoder(model, provider, device_id)
    if backend == "ort-static":
        from .static_cache import StaticCacheDecoder

        return StaticCacheDecoder(model, provider, device_id, max_batch, cuda_graph, max_length, prefill_chunk,
                                  prefill_batch)
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTDecoder

        return TensorRTDecoder(model, device_id)
    raise KvexportError(f"backend '{backend}' is not supported: use {' or '.join(BACKENDS)}")


class RequestChecker:
    """Prompts to token ids, and requests checked against the export and a decoder's limits before anything runs,
    so that a bad one raises an InputError and leaves nothing half done. Needs no decoder: an engine's front end in
    another process than its decoder checks requests with it (engine_process.py)."""

    def __init__(self, model: ExportedModel, max_batch: int | None, max_length: int | None):
        self.model, self.max_batch, self.max_length = model, max_batch, max_length
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.model.tokenizer()
        return self._tokenizer

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids per prompt: a list of prompts, each a str or a sequence of token ids in the vocabulary."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
            raise InputError(f"prompts must be a list of prompts (each a str or a list of token ids), got a "
                             f"{type(prompts).__name__}: pass [prompt] for one")
        if len(prompts) == 0:
            raise InputError("no prompts: pass at least one")
        vocab = self.model.facts.vocab_size
        encoded = []
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids = self.encode_text(prompt, index)
            elif isinstance(prompt, (Sequence, np.ndarray)) and not isinstance(prompt, bytes):
                ids = list(prompt)
                if not all(map(is_integer, ids)):
                    bad = next(t for t in ids if not is_integer(t))
                    raise InputError(f"prompt {index} has token id {bad!r}, not an integer: token ids are integers")
            else:
                raise InputError(f"prompt {index} is a {type(prompt).__name__}: give a str or a list of token ids")
            if len(ids) == 0:
                raise InputError(f"prompt {index} has no tokens: every prompt needs at least one")
            outside = [int(t) for t in ids if not 0 <= t < vocab]
            if outside:
                raise InputError(f"prompt {index} has token id {outside[0]} outside the vocabulary [0, {vocab})")
            encoded.append([int(t) for t in ids])
        return encoded

    def encode_text(self, text: str, index: int = 0, special_tokens: bool = True) -> list[int]:
        """A text's token ids. A text that no tokenization could fit in the cache is refused from its length alone,
        before the tokenizer spends time on it (a server's front end tokenizes while it serves others)."""
        limit = min(limit for limit in (self.model.facts.max_positions, self.max_length) if limit is not None)
        if len(text) > self.max_chars_per_token * limit:
            raise InputError(f"prompt {index} has {len(text)} characters, more than {limit} tokens of this model can "
                             f"hold: shorten the prompt")
        # verbose=False: the length check against the model's positions is ours (stream), not the tokenizer's
        return self.tokenizer(text, verbose=False, add_special_tokens=special_tokens)["input_ids"]

    @functools.cached_property
    def max_chars_per_token(self) -> int:
        """An upper bound on the characters one token covers: its longest vocabulary entry (a byte-level or
        SentencePiece token's string is at least as long as the text it stands for), twice over for normalizers
        that compose characters."""
        return 2 * max(map(len, self.tokenizer.get_vocab()), default=1)

    def check(self, batch: int, prompt_length: int, config: SamplingConfig) -> None:
        vocab = self.model.facts.vocab_size
        outside = [t for t in config.stop_token_ids if not 0 <= t < vocab]
        if outside:
            raise InputError(f"stop token id {outside[0]} is outside the vocabulary [0, {vocab})")
        if self.max_batch is not None and batch > self.max_batch:
            raise InputError(f"{batch} prompts exceed the decoder's max_batch {self.max_batch}: send fewer "
                             "or create the Generator with a larger max_batch")
        limits = [(self.model.facts.max_positions, "the model's positions"),
                  (self.max_length, "the decoder's cache length")]
        for limit, what in limits:
            if limit is not None and prompt_length + config.max_new_tokens > limit:
                raise InputError(f"prompt of {prompt_length} tokens plus {config.max_new_tokens} new tokens exceeds "
                                 f"{what} ({limit}): shorten the prompt or lower max_new_tokens")


class Generator:
    """Every request is checked in full (prompts, token ids, sampling settings, batch and lengths against the export
    and the decoder) before anything runs (RequestChecker)."""

    def __init__(self, model: ExportedModel | str | Path, provider: str = "cpu", device_id: int = 0,
                 backend: str = "ort", max_batch: int = 8, cuda_graph: bool = False, max_length: int | None = None,
                 verify: bool = False, prefill_chunk: int = 512, prefill_batch: int | None = None):
        """verify: check every file's sha256 against the manifest when loading a directory (about a second per GB;
        sizes and the graphs' inputs and outputs are always checked)."""
        self.model = model if isinstance(model, ExportedModel) else ExportedModel.load(model, verify_hashes=verify)
        self.decoder = make_decoder(self.model, backend, provider, device_id, max_batch, cuda_graph, max_length,
                                    prefill_chunk, prefill_batch)
        self.requests = RequestChecker(self.model, self.decoder.max_batch, self.decoder.max_length)
        self.last_stats: GenerationStats | None = None

    @property
    def tokenizer(self):
        return self.requests.tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.model.facts.pad_token_id or 0

    def _timed_step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache) -> tuple[torch.Tensor, float]:
        """(logits, milliseconds); device logits are waited for, so the time is the step's, not its launch."""
        started = time.perf_counter()
        logits = torch.as_tensor(self.decoder.step(ids, mask, positions, cache))
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        return logits, (time.perf_counter() - started) * 1e3

    def _left_pad(self, encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        width = max(map(len, encoded))
        ids = np.full((len(encoded), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens):] = tokens
            mask[row, width - len(tokens):] = 1
        return ids, mask

    def stream(self, prompts: Sequence[Prompt], config: SamplingConfig | None = None) -> Iterator[StreamEvent]:
        config = config or SamplingConfig(stop_token_ids=self.model.facts.eos_token_ids)
        if not isinstance(config, SamplingConfig):
            raise InputError(f"config must be a SamplingConfig, got a {type(config).__name__}")
        encoded = self.requests.encode(prompts)
        ids, mask = self._left_pad(encoded)
        self.requests.check(len(encoded), ids.shape[1], config)
        batch = len(encoded)
        rng = None
        stops = np.array(sorted(set(config.stop_token_ids)), dtype=np.int64)
        cache = self.decoder.new_cache(batch)
        finished = np.zeros(batch, dtype=bool)
        generated: list[list[int]] = [[] for _ in range(batch)]
        shown = [""] * batch

        logits, prefill_ms = self._timed_step(ids, mask, positions_from_mask(mask), cache)
        decode_ms = 0.0  # time inside decode steps only, not sampling or the consumer of the stream
        steps = 0
        while True:
            if rng is None and not config.greedy:
                rng = config.generator(logits.device)
            tokens = np.where(finished, self.pad_token_id, choose_tokens(logits, config, rng).cpu().numpy())
            for row in np.flatnonzero(~finished):
                generated[row].append(int(tokens[row]))
            deltas = []
            for row in range(batch):
                text = self.tokenizer.decode(generated[row], skip_special_tokens=True) if not finished[row] else ""
                deltas.append(text[len(shown[row]):] if not finished[row] else "")
                if not finished[row]:
                    shown[row] = text
            finished |= np.isin(tokens, stops)
            steps += 1
            yield StreamEvent(steps, tokens, deltas, finished.tolist())
            if finished.all() or steps == config.max_new_tokens:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits, step_ms = self._timed_step(tokens[:, None].astype(np.int64), mask,
                                               positions_from_mask(mask)[:, -1:], cache)
            decode_ms += step_ms
        decode_steps = steps - 1  # the first token came from the prefill
        self.last_stats = GenerationStats(
            batch=batch, prompt_tokens=ids.shape[1], new_tokens=steps, prefill_ms=prefill_ms,
            decode_ms_per_token=decode_ms / decode_steps if decode_steps else 0.0,
            kv_bytes=cache.bytes_in_use, kv_bytes_full=cache.full_cache_bytes,
        )

    def generate(self, prompts: Sequence[Prompt], config: SamplingConfig | None = None) -> GenerationResult:
        encoded = self.requests.encode(prompts)  # validated before anything else touches them
        generated: list[list[int]] = [[] for _ in encoded]
        done = [False] * len(encoded)
        for event in self.stream(encoded, config):
            for row, token in enumerate(event.token_ids):
                if not done[row]:
                    generated[row].append(int(token))
            done = event.finished
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in generated]
        return GenerationResult(generated, texts, self.last_stats)
