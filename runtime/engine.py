"""Continuous batching over owner-only cache slots: many concurrent requests, one static decoder.

The engine owns a StaticCacheDecoder with `max_slots` rows and one scheduler thread. Requests are submitted from
any thread (`submit` returns a handle to iterate, with `for` or `async for`, and to cancel) and wait in a bounded
queue. Each scheduler iteration:
  1. admits waiting requests into free slots (the lowest free row first, so the active rows stay a short prefix);
  2. prefills at most `prefill_chunk` prompt tokens, earliest requests first, into their rows (GroupQueryAttention
     writes them at each row's own slots), so that a long prompt never stalls the requests that are decoding;
  3. runs one decode step for rows 0..r (r: the highest decoding row), each at its own length: rows that are not
     decoding write one slot past their valid tokens, which their next prefill chunk overwrites before anything
     reads it;
  4. samples each decoding row with its own settings (and seeded generator), streams the token and its text, and
     frees the row when its request stops (length, stop token, cancel, deadline).
Prefill runs one row at a time, so a greedy response does not depend on what else is in the batch, to the
export's tolerance. With batching="static" a batch is admitted only into an empty engine and runs until its last
request ends, as static batching does (for comparison).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvexport.strategies import InputError, KvexportError

from .exported import ExportedModel
from .generator import Generator, Prompt
from .sampling import SamplingConfig, choose_tokens


class QueueFullError(KvexportError):
    """The engine's queue is full: the caller should retry later (a server answers 429)."""


class EngineClosedError(KvexportError):
    """The engine is shutting down and takes no new requests (a server answers 503)."""


@dataclass
class Event:
    token_id: int | None  # None on the final event of a request that ended without a new token
    text: str  # the text this token completes ("" while a multi-byte character is incomplete)
    finish_reason: str | None = None  # set on a request's last event: length | stop | cancelled | deadline | error


class RequestHandle:
    """One request's stream of Events; iterate it (blocking) or `async for` it, or cancel it."""

    def __init__(self, request_id: int, prompt_ids: list[int], config: SamplingConfig, deadline: float | None,
                 tokenizer=None):
        self.id, self.prompt_ids, self.config, self.deadline = request_id, prompt_ids, config, deadline
        self.tokens: list[int] = []
        self._text = Detokenizer(tokenizer)
        self.finish_reason: str | None = None
        self.cancelled = False
        self._events: queue.Queue[Event] = queue.Queue()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue[Event] | None = None

    def cancel(self) -> None:
        """Stop the request; its slot is freed at the next scheduler step and its stream ends with 'cancelled'."""
        self.cancelled = True

    def _emit(self, event: Event) -> None:
        with self._lock:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
            else:
                self._events.put(event)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._text.add(self._events.get())
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        with self._lock:  # events already emitted move to the asyncio queue, in order
            self._loop, self._async_events = asyncio.get_running_loop(), asyncio.Queue()
            while not self._events.empty():
                self._async_events.put_nowait(self._events.get_nowait())
        while True:
            event = self._text.add(await self._async_events.get())
            yield event
            if event.finish_reason is not None:
                return


class Detokenizer:
    """A request's text, one token at a time, on the consumer's side (not the scheduler's): each token decodes a
    few tokens of context (as vLLM does), not the whole output, and a character split over tokens waits for its
    last byte."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, event: Event) -> Event:
        if event.token_id is None or self.tokenizer is None:
            return event
        self.tokens.append(event.token_id)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return Event(event.token_id, "", event.finish_reason)
        self.prefix, self.read = self.read, len(self.tokens)
        return Event(event.token_id, after[len(before):], event.finish_reason)


@dataclass
class Slot:
    request: RequestHandle
    prefilled: int = 0  # prompt tokens written into the row so far
    generator: torch.Generator | None = None
    next_token: int | None = None  # sampled, not yet fed

    @property
    def length(self) -> int:
        """Tokens in the row's cache."""
        return self.prefilled + max(0, len(self.request.tokens) - 1)


@dataclass
class EngineStats:
    requests_submitted: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    refused_queue_full: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    decode_steps: int = 0
    graph_seconds: float = 0.0  # the decode steps' graph runs, waited for
    decode_seconds: float = 0.0  # the decode steps' whole scheduler work: inputs, graph, sampling, streaming
    loop_seconds: float = 0.0  # wall time of scheduler iterations that did work (prefill included)
    last_step_ms: float = 0.0


class Engine:
    def __init__(self, model: ExportedModel | str | Path, provider: str = "cpu", max_slots: int = 8,
                 max_length: int | None = None, max_queue: int = 256, prefill_chunk: int = 256,
                 cuda_graph: bool = False, batching: str = "continuous", device_id: int = 0):
        if batching not in ("continuous", "static"):
            raise KvexportError("batching must be continuous or static")
        self.generator = Generator(model, provider=provider, device_id=device_id, backend="ort-static",
                                   max_batch=max_slots, cuda_graph=cuda_graph, max_length=max_length)
        self.model, self.decoder = self.generator.model, self.generator.decoder
        self.decoder.prefill_chunk = prefill_chunk
        self.max_slots, self.max_queue, self.batching = max_slots, max_queue, batching
        self.device = self.decoder.device
        self.stats = EngineStats()
        self._slots: list[Slot | None] = [None] * max_slots
        self._waiting: deque[RequestHandle] = deque()
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._closing = False
        self.last_error: Exception | None = None  # of a step that failed (its requests ended with "error")
        self._thread = threading.Thread(target=self._run, name="kvexport-engine", daemon=True)
        self._thread.start()

    # -- submission --------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, config: SamplingConfig | None = None,
               timeout_s: float | None = None) -> RequestHandle:
        """Queue a request (text or token ids). Refused at once, with an InputError, if it cannot run (bad
        prompt or settings, longer than the cache); QueueFullError when the queue is full."""
        config = config or SamplingConfig(stop_token_ids=self.model.facts.eos_token_ids)
        if not isinstance(config, SamplingConfig):
            raise InputError(f"config must be a SamplingConfig, got a {type(config).__name__}")
        ids = self.generator.encode([prompt])[0]
        self.generator.check_request(1, len(ids), config)
        if timeout_s is not None and not timeout_s > 0:
            raise InputError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._wake:
            if self._closing:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                self.stats.refused_queue_full += 1
                raise QueueFullError(f"the queue holds {self.max_queue} waiting requests: retry later")
            tokenizer = self.generator.tokenizer if self.model.has_tokenizer else None
            handle = RequestHandle(next(self._ids), ids, config, deadline, tokenizer)
            self._waiting.append(handle)
            self.stats.requests_submitted += 1
            self._wake.notify()
        return handle

    def close(self, drain: bool = True) -> None:
        """Take no new requests; with drain, finish the ones queued and running, else cancel them."""
        with self._wake:
            self._closing = True
            if not drain:
                for handle in [*self._waiting, *(s.request for s in self._slots if s)]:
                    handle.cancel()
            self._wake.notify()
        self._thread.join()

    # -- what a server reports ---------------------------------------------------------------------
    def metrics(self) -> dict:
        active = [s for s in self._slots if s is not None]
        tokens = sum(s.length for s in active)
        layout = self.model.layout
        stats = self.stats
        return {
            "queue_depth": len(self._waiting), "active_slots": len(active), "max_slots": self.max_slots,
            "kv_bytes_in_use": tokens * layout.bytes_per_token(),
            "kv_bytes_full_equivalent": tokens * layout.full_bytes_per_token,
            "kv_bytes_allocated": self.decoder.storage.numel() * self.decoder.storage.element_size(),
            "requests_submitted": stats.requests_submitted, "requests_finished": dict(stats.requests_finished),
            "refused_queue_full": stats.refused_queue_full, "generated_tokens": stats.generated_tokens,
            "prompt_tokens": stats.prompt_tokens, "decode_steps": stats.decode_steps,
            "last_step_ms": stats.last_step_ms,
            "mean_step_ms": 1e3 * stats.decode_seconds / stats.decode_steps if stats.decode_steps else 0.0,
            "mean_graph_ms": 1e3 * stats.graph_seconds / stats.decode_steps if stats.decode_steps else 0.0,
            # the scheduler's share of a decode step: everything but the graph run
            "scheduler_overhead": 1 - stats.graph_seconds / stats.decode_seconds if stats.decode_seconds else 0.0,
            "tokens_per_s": stats.generated_tokens / stats.loop_seconds if stats.loop_seconds else 0.0,
        }

    # -- the scheduler -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and not any(self._slots):
                    self._wake.wait()
                if self._closing and not self._waiting and not any(self._slots):
                    return
                self._admit()
            started = time.perf_counter()
            try:
                self._prefill()
                self._decode()
            except Exception as error:  # noqa: BLE001 - a failed step ends its requests, never the engine thread
                self._fail_all(error)
            self.stats.loop_seconds += time.perf_counter() - started

    def _admit(self) -> None:
        if self.batching == "static" and any(self._slots):
            return
        for row in range(self.max_slots):
            if not self._waiting:
                return
            if self._slots[row] is None:
                handle = self._waiting.popleft()
                if handle.cancelled:
                    self._finish(handle, "cancelled")
                    continue
                generator = None if handle.config.greedy else handle.config.generator(self.device)
                self._slots[row] = Slot(handle, generator=generator)

    def _prefill(self) -> None:
        """Up to prefill_chunk prompt tokens, earliest-admitted prompts first, in chunks; a prompt's first token is
        sampled as soon as it is all in its row."""
        budget = self.decoder.prefill_chunk
        pending = sorted((s.request.id, row) for row, s in enumerate(self._slots)
                         if s and s.prefilled < len(s.request.prompt_ids))
        for _, row in pending:
            slot = self._slots[row]
            if budget <= 0 or self._stopped(row, slot):
                continue
            prompt = slot.request.prompt_ids
            chunk = prompt[slot.prefilled:slot.prefilled + budget]
            logits = self.decoder.prefill_row(row, torch.tensor(chunk), cached=slot.prefilled)
            slot.prefilled += len(chunk)
            budget -= len(chunk)
            if slot.prefilled == len(prompt):
                self.stats.prompt_tokens += len(prompt)
                token = int(choose_tokens(logits[:, -1], slot.request.config, slot.generator)[0])
                self._accept(row, slot, token)

    def _decode(self) -> None:
        decoding = [row for row, s in enumerate(self._slots)
                    if s and s.next_token is not None and not self._stopped(row, s)]
        if not decoding:
            return
        started = time.perf_counter()
        rows = self._slots[:max(decoding) + 1]
        # A row that is not decoding writes one slot past its tokens, which its next prefill chunk rewrites.
        tokens = torch.tensor([(s.next_token or 0) if s else 0 for s in rows], dtype=torch.int64)
        lengths = torch.tensor([s.length if s else 0 for s in rows], dtype=torch.int32)
        graph_started = time.perf_counter()
        logits = self.decoder.decode_rows(tokens.to(self.device), lengths.to(self.device))[:, -1]
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        self.stats.graph_seconds += time.perf_counter() - graph_started
        chosen = self._sample(logits, decoding)
        for row, token in zip(decoding, chosen):
            self._accept(row, self._slots[row], token)
        self.stats.decode_steps += 1
        self.stats.decode_seconds += time.perf_counter() - started
        self.stats.last_step_ms = 1e3 * (time.perf_counter() - started)

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """Greedy rows from one argmax (one transfer to the host); each sampling row with its own settings and
        generator."""
        greedy = logits.argmax(-1).tolist()
        chosen = []
        for row in rows:
            slot = self._slots[row]
            if slot.request.config.greedy:
                chosen.append(greedy[row])
            else:
                chosen.append(int(choose_tokens(logits[row:row + 1], slot.request.config, slot.generator)[0]))
        return chosen

    def _accept(self, row: int, slot: Slot, token: int) -> None:
        """Record and stream a new token; it is the request's last if the request should stop."""
        request = slot.request
        request.tokens.append(token)
        self.stats.generated_tokens += 1
        if token in request.config.stop_token_ids:
            self._release(row, "stop", token)
        elif len(request.tokens) >= request.config.max_new_tokens or slot.length + 1 >= self.decoder.max_length:
            self._release(row, "length", token)
        else:
            request._emit(Event(token, ""))
            if not self._stopped(row, slot):
                slot.next_token = token

    def _stopped(self, row: int, slot: Slot) -> bool:
        reason = "cancelled" if slot.request.cancelled else (
            "deadline" if slot.request.deadline is not None and time.monotonic() > slot.request.deadline else None)
        if reason:
            self._release(row, reason)
        return reason is not None

    def _release(self, row: int, reason: str, token: int | None = None) -> None:
        """Free the row and end its request, with `token` as the last event's when there is one."""
        request = self._slots[row].request
        self._slots[row] = None
        self._finish(request, reason, token)

    def _finish(self, handle: RequestHandle, reason: str, token: int | None = None) -> None:
        handle.finish_reason = reason
        self.stats.requests_finished[reason] = self.stats.requests_finished.get(reason, 0) + 1
        handle._emit(Event(token, "", reason))

    def _fail_all(self, error: Exception) -> None:
        self.last_error = error
        for row, slot in enumerate(self._slots):
            if slot is not None:
                self._release(row, "error")
