"""Continuous batching over owner-only cache slots: many concurrent requests, one static decoder.

The engine owns a StaticCacheDecoder with `max_slots` rows and one scheduler thread. Requests are submitted from
any thread (`submit` returns a handle to iterate, with `for` or `async for`, and to cancel) and wait in a bounded
queue. Each scheduler iteration:
  1. admits waiting requests into free slots (the lowest free row first, so the active rows stay a short prefix);
  2. prefills at most `prefill_chunk` prompt tokens (more only to batch a sixteenth of the rows' first prompts),
     earliest requests first: the first chunks of up to `prefill_batch` new prompts in one run
     (StaticCacheDecoder.prefill_first; while requests wait for rows and others decode, until a sixteenth of the
     rows are admitted), further chunks of long prompts row by row, so that a long prompt never stalls the
     requests that are decoding; a prompt's first token is chosen on the device, into the row's entry of the
     next-token buffer, and streamed once the prefill has run (on CUDA after the step below is queued, so the
     host never waits for a device with nothing queued);
  3. with rows left free and no request waiting (the load dropped, or the last requests drain), moves the requests
     of the highest rows into the free lower ones (their K/V and next token, copied on the device) when that makes
     the step below smaller: a few long requests left in high rows would otherwise keep every step at full size;
  4. queues one decode step for rows 0..n-1 (n: the highest decoding row + 1, bucketed on CUDA), each at its own
     length, fed from the next-token buffer, and the choice of each row's next token (each with its own settings
     and generator) back into that buffer; rows that are not decoding write one slot past their valid tokens,
     which their next prefill chunk overwrites before anything reads it;
  5. while the device runs the steps queued, takes the tokens of the oldest that leaves `steps_in_flight` queued
     to the host, streams them, and frees the rows whose requests stop (length, stop token, cancel, deadline).
So the host never waits for a step it has just queued: with steps_in_flight = 2 (CUDA's default) the device runs
steps n - 1 and n while the host streams step n - 2, so a host iteration slower than a step is made up by a faster
one before the device runs dry. A row whose request stops at step n - 2 has already been fed to the steps after
it, whose tokens for it are dropped; a request moved to another row takes the tokens of the steps queued before
the move from its old row's entries.
Rows never see each other's tokens, so a greedy response does not depend on what else is in the batch, to the
export's tolerance. With batching="static" a batch is admitted only into an empty engine and runs until its last
request ends, as static batching does (for comparison: its rows are never moved).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers.decoders import DecodeStream

from kvexport.strategies import InputError, KvexportError

from .exported import ExportedModel
from .generator import Generator, Prompt, RequestChecker
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

    def _deliver(self, event: Event) -> asyncio.AbstractEventLoop | None:
        """Hand an event to a blocking consumer; for an asyncio consumer, return its loop, which must be given the
        event (deliver_async), so that one wake-up of the loop carries many events."""
        with self._lock:
            if self._loop is None:
                self._events.put(event)
            return self._loop

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._text.add(self._events.get())
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for events in self.batches():
            for event in events:
                yield event

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The events that have arrived at each wake-up, at least one: a consumer that falls behind (a server
        streaming to many clients) handles several tokens at once."""
        with self._lock:  # events already emitted move to the asyncio queue, in order
            self._loop, self._async_events = asyncio.get_running_loop(), asyncio.Queue()
            while not self._events.empty():
                self._async_events.put_nowait(self._events.get_nowait())
        while True:
            events = [await self._async_events.get()]
            while not self._async_events.empty():
                events.append(self._async_events.get_nowait())
            events = [self._text.add(event) for event in events]
            yield events
            if events[-1].finish_reason is not None:
                return


def deliver(items: list[tuple[RequestHandle, Event]]) -> None:
    """Hand events to their handles: one wake-up per asyncio loop (a server's), not one per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for handle, event in items:
        loop = handle._deliver(event)
        if loop is not None:
            by_loop.setdefault(loop, []).append((handle, event))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(deliver_async, batch)


def deliver_async(items: list[tuple[RequestHandle, Event]]) -> None:
    """Run in a consumer's event loop: the events of one scheduler iteration, in order."""
    for handle, event in items:
        handle._async_events.put_nowait(event)


class Detokenizer:
    """A request's text, one token at a time, on the consumer's side (not the scheduler's); a character split over
    tokens waits for its last byte. Fast tokenizers use the tokenizers library's DecodeStream (under a microsecond a
    token); others decode a few tokens of context per token (as vLLM does), not the whole output."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.prefix, self.read = tokenizer, [], 0, 0
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = DecodeStream(skip_special_tokens=True) if backend is not None else None
        self.backend = backend

    def add(self, event: Event) -> Event:
        if event.token_id is None or self.tokenizer is None:
            return event
        if self.stream is not None:
            return Event(event.token_id, self.stream.step(self.backend, event.token_id) or "", event.finish_reason)
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
    row: int | None  # the row its request holds now; None once the request has ended
    prefilled: int = 0  # prompt tokens written into the row so far
    generator: torch.Generator | None = None
    decoding: bool = False  # its first token is chosen: decode steps feed it from the next-token buffer
    fed: int = 0  # decode steps queued for this row (their tokens are written into the row)

    @property
    def length(self) -> int:
        """Tokens in the row's cache once the steps queued so far have run: the next step's slot and position."""
        return self.prefilled + self.fed


@dataclass
class Chosen:
    """Tokens chosen on the device for some rows, on their way to the host."""
    slots: list[tuple[int, Slot]]  # (row, slot) they were chosen for: the slot's row then
    tokens: torch.Tensor  # host copy of the next-token buffer (pinned on CUDA), valid once `done` has passed
    done: torch.cuda.Event | None  # CUDA: recorded after the copy

    def wait(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.tokens.tolist()


class Span:
    """The device time of the work queued between its creation and stop(): on CUDA between two events, read once
    that work has run; on the CPU, where work runs as it is queued, the host time."""

    def __init__(self, cuda: bool):
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        if self._events:
            self._events[0].record()
        self._started, self._seconds = time.perf_counter(), 0.0

    def stop(self) -> Span:
        if self._events:
            self._events[1].record()
        else:
            self._seconds = time.perf_counter() - self._started
        return self

    @property
    def seconds(self) -> float:
        return self._events[0].elapsed_time(self._events[1]) / 1e3 if self._events else self._seconds


@dataclass
class Step(Chosen):
    """A decode step queued on the device, whose tokens the host has not taken yet."""
    started: float = 0.0  # host clock when it was queued
    steady: bool = False  # queued in an iteration that ran no prefill
    run: Span | None = None  # the model's run
    prefills: list[Span] = field(default_factory=list)  # prefill runs queued since the step before


@dataclass
class EngineStats:
    requests_submitted: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    refused_queue_full: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    decode_steps: int = 0
    rows_moved: int = 0  # requests moved to a lower row, so that steps ran smaller
    # Steady decoding (iterations with no prefill): wall time from one step's queueing to the next's, and the
    # device's time in the model's run of those steps (the rest of the wall time is the scheduler's: choosing and
    # streaming tokens, bookkeeping, and waiting for the thread that streams).
    steady_steps: int = 0
    steady_wall_seconds: float = 0.0
    steady_graph_seconds: float = 0.0
    # The device's time in the model's runs: every decode step's, and prompts' (first chunks and further ones, with
    # the copies of their K/V into their rows); the rest of loop_seconds the device idled or chose tokens
    decode_device_seconds: float = 0.0
    prefill_device_seconds: float = 0.0
    loop_seconds: float = 0.0  # wall time of scheduler iterations that did work (prefill included)
    # of which the scheduler prefilled (queued prompts' runs and their first tokens' choice), queued decode steps,
    # waited for the device (chosen tokens to reach the host) and handed events on (to the consumers, or to the
    # front end of an engine in its own process, blocking while that one is behind); the rest is taking tokens
    prefill_seconds: float = 0.0
    queue_seconds: float = 0.0
    device_wait_seconds: float = 0.0
    delivery_seconds: float = 0.0
    last_step_ms: float = 0.0


def check_submission(requests: RequestChecker, prompt: Prompt, config: SamplingConfig | None,
                     timeout_s: float | None) -> tuple[list[int], SamplingConfig]:
    """A request's token ids and settings (the model's end-of-sequence tokens stop it by default), or an InputError
    if it cannot run."""
    config = config or SamplingConfig(stop_token_ids=requests.model.facts.eos_token_ids)
    if not isinstance(config, SamplingConfig):
        raise InputError(f"config must be a SamplingConfig, got a {type(config).__name__}")
    ids = requests.encode([prompt])[0]
    requests.check(1, len(ids), config)
    if timeout_s is not None and not timeout_s > 0:
        raise InputError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return ids, config


class Engine:
    def __init__(self, model: ExportedModel | str | Path, provider: str = "cpu", max_slots: int = 8,
                 max_length: int | None = None, max_queue: int = 256, prefill_chunk: int = 256,
                 cuda_graph: bool = False, batching: str = "continuous", device_id: int = 0,
                 prefill_batch: int | None = None, on_events: Callable[[list[tuple[RequestHandle, Event]]], None]
                 | None = None, steps_in_flight: int | None = None):
        """on_events: given each iteration's events instead of delivering them to the handles (an engine in a
        process of its own sends them to its front end, see engine_process.py). steps_in_flight: decode steps left
        queued on the device while the host takes an earlier step's tokens (default 2 on CUDA, 1 on the CPU, where
        a step runs as it is queued): with 2, an iteration of the host that takes longer than a step does not idle
        the device as long as the next one is shorter; a request's tokens reach it one step later."""
        if batching not in ("continuous", "static"):
            raise KvexportError("batching must be continuous or static")
        if steps_in_flight is not None and steps_in_flight < 1:
            raise KvexportError(f"steps_in_flight must be at least 1, got {steps_in_flight}")
        self.generator = Generator(model, provider=provider, device_id=device_id, backend="ort-static",
                                   max_batch=max_slots, cuda_graph=cuda_graph, max_length=max_length,
                                   prefill_chunk=prefill_chunk, prefill_batch=prefill_batch)
        self.model, self.decoder = self.generator.model, self.generator.decoder
        self.max_slots, self.max_queue, self.batching = max_slots, max_queue, batching
        self.device = self.decoder.device
        self.decoder.warm_up()  # CUDA: the graphs and kernel plans of every bucketed shape, before any request
        # Each row's next token, chosen on the device and fed to the next step from there.
        self._next_tokens = torch.zeros(max_slots, dtype=torch.int64, device=self.device)
        self.steps_in_flight = steps_in_flight or (2 if self.device.type == "cuda" else 1)
        self._pending: deque[Step] = deque()  # steps queued, oldest first, whose tokens the host has not taken
        self._prefill_runs: list[Span] = []  # since the last step queued, which will carry them
        self._outbox: list[tuple[RequestHandle, Event]] = []  # events of this iteration, delivered at its end
        self._on_events = on_events or deliver
        # The handles' text needs the tokenizer, loaded here and not by the first submit, which would hold the
        # scheduler's lock meanwhile (on the H100 the server's first request waited about 12 s).
        # Events sent elsewhere (engine_process.py) are turned into text there.
        self._tokenizer = self.generator.tokenizer if on_events is None and self.model.has_tokenizer else None
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
        ids, config = check_submission(self.generator.requests, prompt, config, timeout_s)
        return self.submit_checked(ids, config, timeout_s)

    def submit_checked(self, ids: list[int], config: SamplingConfig, timeout_s: float | None = None
                       ) -> RequestHandle:
        """Queue a request that check_submission has passed for this engine's model and length (an engine process
        takes its front ends' requests so: checking them again would hold the interpreter lock that the
        scheduler thread needs, see engine_process.py); QueueFullError when the queue is full."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._wake:
            if self._closing:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                self.stats.refused_queue_full += 1
                raise QueueFullError(f"the queue holds {self.max_queue} waiting requests: retry later")
            handle = RequestHandle(next(self._ids), ids, config, deadline, self._tokenizer)
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
    @property
    def requests(self) -> RequestChecker:
        return self.generator.requests

    @property
    def alive(self) -> bool:
        """Whether the scheduler runs and takes requests (a server's health)."""
        return self._thread.is_alive() and not self._closing

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
            "prompt_tokens": stats.prompt_tokens, "decode_steps": stats.decode_steps, "rows_moved": stats.rows_moved,
            "last_step_ms": stats.last_step_ms,
            "steady_step_ms": 1e3 * stats.steady_wall_seconds / stats.steady_steps if stats.steady_steps else 0.0,
            "steady_graph_step_ms": (1e3 * stats.steady_graph_seconds / stats.steady_steps
                                     if stats.steady_steps else 0.0),
            # the share of a steady decode step that is not the model's run
            "scheduler_overhead": (max(0.0, 1 - stats.steady_graph_seconds / stats.steady_wall_seconds)
                                   if stats.steady_wall_seconds else 0.0),
            "tokens_per_s": stats.generated_tokens / stats.loop_seconds if stats.loop_seconds else 0.0,
            "decode_device_seconds": stats.decode_device_seconds,
            "prefill_device_seconds": stats.prefill_device_seconds,
            "loop_seconds": stats.loop_seconds, "prefill_seconds": stats.prefill_seconds,
            "queue_seconds": stats.queue_seconds, "device_wait_seconds": stats.device_wait_seconds,
            "delivery_seconds": stats.delivery_seconds,
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
                prefilled, first = self._prefill()
                self.stats.prefill_seconds += time.perf_counter() - started
                if first is not None and self.device.type != "cuda":
                    self._accept_chosen(first)  # on the CPU, before the next step (which takes long there)
                    self._flush()
                    first = None
                queueing = time.perf_counter()
                self._compact()
                queued = self._queue_step(steady=not prefilled)
                self.stats.queue_seconds += time.perf_counter() - queueing
                if first is not None:  # on CUDA, once the prefill has run, while the step just queued runs
                    self._accept_chosen(first)
                if queued is not None:
                    self._pending.append(queued)
                # The oldest steps until steps_in_flight are left queued; all of them once no step was queued or
                # every row is free (the loop may idle next)
                while self._pending and (len(self._pending) > self.steps_in_flight or queued is None
                                         or not any(self._slots)):
                    step = self._pending.popleft()
                    self._take(step, self._pending[0] if self._pending else None)
            except Exception as error:  # noqa: BLE001 - a failed step ends its requests, never the engine thread
                self._pending.clear()
                self._prefill_runs = []  # their step was never queued
                self._fail_all(error)
            self._flush()
            self.stats.loop_seconds += time.perf_counter() - started

    def _send(self, handle: RequestHandle, event: Event) -> None:
        self._outbox.append((handle, event))

    def _flush(self) -> None:
        if self._outbox:
            started = time.perf_counter()
            self._on_events(self._outbox)
            self._outbox = []
            self.stats.delivery_seconds += time.perf_counter() - started

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
                self._slots[row] = Slot(handle, row, generator=generator)

    def _prefill(self) -> tuple[bool, Chosen | None]:
        """Up to prefill_chunk prompt tokens per iteration (or batch_at first chunks), earliest-admitted prompts
        first: the first chunks of new prompts in one batched run, then further chunks of long prompts row by row.
        A prompt's first token is chosen on the device as soon as the prompt is all in its row. Whether any prompt
        token ran, and the first tokens chosen (not waited for)."""
        decoder, budget = self.decoder, self.decoder.prefill_chunk
        pending = [row for _, row in sorted((s.request.id, row) for row, s in enumerate(self._slots)
                                            if s and s.prefilled < len(s.request.prompt_ids))]
        pending = [row for row in pending if not self._stopped(row, self._slots[row])]
        fresh, candidates = [], [row for row in pending if self._slots[row].prefilled == 0]
        # While requests wait for rows and others decode, new prompts are batched, rather than pausing decoding for
        # each: up to a sixteenth of the rows (at most prefill_batch) may idle meanwhile. On the H100 a batch of 8
        # prompts of 96 tokens takes 1.2 ms and one of 4 takes 0.86; at 64 rows, waiting for 4 kept 95% of the rows
        # busy where waiting for 8 (prompts then padded to powers of two) kept 89%. Static
        # batching admits no row until its batch ends, so its last prompts never wait.
        batch_at = max(1, min(decoder.prefill_batch, self.max_slots // 16))
        if (self.batching == "continuous" and len(candidates) < batch_at and self._waiting
                and any(s and s.decoding for s in self._slots)):
            candidates = []
        for row in candidates:
            size = min(len(self._slots[row].request.prompt_ids), decoder.prefill_chunk)
            # The token budget never splits a batch below batch_at: the prompt left over would idle in its row
            # until batch_at - 1 more rows were free (4 prompts of the H100 load often sum past 256 tokens).
            if len(fresh) == decoder.prefill_batch or (len(fresh) >= batch_at and size > budget):
                break
            fresh.append(row)
            budget -= size
        cuda, run = self.device.type == "cuda", None
        if fresh:
            run = Span(cuda)
            prompts = [torch.tensor(self._slots[row].request.prompt_ids[:decoder.prefill_chunk]) for row in fresh]
            decoder.prefill_first(fresh, prompts)
            for row, prompt in zip(fresh, prompts):
                self._slots[row].prefilled = len(prompt)
        for row in pending:
            slot = self._slots[row]
            if budget <= 0 or row in fresh or slot.prefilled == 0:
                continue
            chunk = slot.request.prompt_ids[slot.prefilled:slot.prefilled + budget]
            run = run or Span(cuda)
            decoder.prefill_row(row, torch.tensor(chunk), cached=slot.prefilled)
            slot.prefilled += len(chunk)
            budget -= len(chunk)
        if run is not None:
            self._prefill_runs.append(run.stop())
        complete = [row for row in pending if self._slots[row].prefilled == len(self._slots[row].request.prompt_ids)]
        first = None
        if complete:
            self._choose(decoder.logits[:, -1], complete)
            for row in complete:
                self.stats.prompt_tokens += len(self._slots[row].request.prompt_ids)
                self._slots[row].decoding = True
            first = self._to_host([(row, self._slots[row]) for row in complete], Chosen)
        return budget < decoder.prefill_chunk, first

    def _compact(self) -> None:
        """Move the requests of rows at or above the bucket of the rows in use into free rows below it, so that the
        next steps run at that bucket. Their K/V and next token are copied on the device after the work already
        queued (the steps in flight write the old rows)."""
        if self.batching != "continuous" or self._waiting:  # a request waits: admission fills the free rows
            return
        used = [row for row, slot in enumerate(self._slots) if slot]
        if not used:
            return
        below = self.decoder.bucket(len(used))
        free = (row for row in range(below) if self._slots[row] is None)
        for source in [row for row in used if row >= below]:
            target, slot = next(free), self._slots[source]
            self.decoder.move_row(source, target, slot.length)
            self._next_tokens[target].copy_(self._next_tokens[source])
            self._slots[target], self._slots[source], slot.row = slot, None, target
            self.stats.rows_moved += 1

    def _queue_step(self, steady: bool) -> Step | None:
        """Queue one decode step for the rows that go on decoding, and the choice of their next tokens, without
        waiting for it. A row is fed only while the tokens already queued leave it short of its limits."""
        decoding = [row for row, s in enumerate(self._slots) if s and s.decoding and not self._stopped(row, s)
                    and 1 + s.fed < s.request.config.max_new_tokens and s.length + 1 < self.decoder.max_length]
        if not decoding:
            return None
        rows = self._slots[:min(self.max_slots, self.decoder.bucket(max(decoding) + 1))]
        lengths = torch.tensor([s.length if s else 0 for s in rows], dtype=torch.int32)
        started = time.perf_counter()
        run = Span(self.device.type == "cuda")
        logits = self.decoder.decode_rows(self._next_tokens[:len(rows)], lengths)[:, -1]
        run.stop()
        self._choose(logits, decoding, others_idle=True)
        step = self._to_host([(row, self._slots[row]) for row in decoding], Step, started=started, steady=steady,
                             run=run, prefills=self._prefill_runs)
        self._prefill_runs = []
        for row in decoding:
            self._slots[row].fed += 1
        self.stats.decode_steps += 1
        return step

    def _choose(self, logits: torch.Tensor, rows: list[int], others_idle: bool = False) -> None:
        """The next token of each of `rows` (logits [n, vocab], indexed by row), on the device, into the next-token
        buffer: greedy rows from one argmax, each sampling row with its own settings and generator. others_idle:
        no other row of the n holds a token still to be fed (a decode step's rows), so all n entries are written
        at once, without an index."""
        chosen = logits.argmax(-1)
        for row in rows:
            slot = self._slots[row]
            if not slot.request.config.greedy:
                chosen[row] = choose_tokens(logits[row:row + 1], slot.request.config, slot.generator)[0]
        if others_idle:
            self._next_tokens[:len(chosen)].copy_(chosen)
            return
        index = torch.tensor(rows).to(self.device, non_blocking=True)
        self._next_tokens.index_copy_(0, index, chosen.index_select(0, index))

    def _to_host(self, slots: list[tuple[int, Slot]], kind: type[Chosen], **fields) -> Chosen:
        """Queue the copy of the next-token buffer (up to the highest of `slots`' rows) to the host."""
        rows = max(row for row, _ in slots) + 1
        tokens = self._next_tokens[:rows].to("cpu", non_blocking=True, copy=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return kind(slots, tokens, done, **fields)

    def _accept_chosen(self, chosen: Chosen) -> None:
        """Stream chosen tokens once they reach the host; rows freed since they were chosen drop theirs."""
        started = time.perf_counter()
        tokens = chosen.wait()
        self.stats.device_wait_seconds += time.perf_counter() - started
        for row, slot in chosen.slots:
            if slot.row is not None:  # its request goes on, in this row or another since
                self._accept(slot, tokens[row])

    def _take(self, step: Step, following: Step | None) -> None:
        """Stream a queued step's tokens (the steps queued after it keep the device busy meanwhile)."""
        self._accept_chosen(step)  # the work queued before it has run, prefills included
        ran = step.run.seconds
        self.stats.last_step_ms = 1e3 * ran
        self.stats.decode_device_seconds += ran
        self.stats.prefill_device_seconds += sum(run.seconds for run in step.prefills)
        if step.steady and following is not None and following.steady:
            self.stats.steady_steps += 1
            self.stats.steady_wall_seconds += following.started - step.started
            self.stats.steady_graph_seconds += ran

    def _accept(self, slot: Slot, token: int) -> None:
        """Record and stream a new token; it is the request's last if the request should stop."""
        request = slot.request
        request.tokens.append(token)
        self.stats.generated_tokens += 1
        if token in request.config.stop_token_ids:
            self._release(slot.row, "stop", token)
        # Counted from the tokens taken, not slot.length, which already counts a step queued after this token's.
        elif (len(request.tokens) >= request.config.max_new_tokens
              or slot.prefilled + len(request.tokens) >= self.decoder.max_length):
            self._release(slot.row, "length", token)
        else:
            self._send(request, Event(token, ""))

    def _stopped(self, row: int, slot: Slot) -> bool:
        reason = "cancelled" if slot.request.cancelled else (
            "deadline" if slot.request.deadline is not None and time.monotonic() > slot.request.deadline else None)
        if reason:
            self._release(row, reason)
        return reason is not None

    def _release(self, row: int, reason: str, token: int | None = None) -> None:
        """Free the row and end its request, with `token` as the last event's when there is one."""
        slot = self._slots[row]
        self._slots[row], slot.row = None, None
        self._finish(slot.request, reason, token)

    def _finish(self, handle: RequestHandle, reason: str, token: int | None = None) -> None:
        handle.finish_reason = reason
        self.stats.requests_finished[reason] = self.stats.requests_finished.get(reason, 0) + 1
        self._send(handle, Event(token, "", reason))

    def _fail_all(self, error: Exception) -> None:
        self.last_error = error
        for row, slot in enumerate(self._slots):
            if slot is not None:
                self._release(row, "error")
