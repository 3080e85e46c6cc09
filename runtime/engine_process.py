"""An Engine in a process of its own, behind a front end with the Engine's API (submit, metrics, close).

Threads of one Python process share one interpreter lock, so there the scheduler's steps wait while the server
turns tokens into text and streams them: on the H100 the engine served 10.9k tokens/s to consumers that
detokenize and 15.7k to consumers of token ids (docs/results.md, issue 13). As vLLM's engine core does, the
engine runs in a child process ('spawn': CUDA state is never forked) and sends each scheduler iteration's token ids
in one message; the front end checks requests (encoding prompts with the tokenizer), the consumers of its handles
turn ids into text, and it counts the requests in flight for backpressure (refusing when max_queue of them wait
for one of max_slots rows), so the engine's own queue never refuses.

Messages, front end to engine: ("submit", id, token ids, config, timeout_s), ("cancel", id), ("metrics", id),
("close", drain). Engine to front end: ("ready", None) or ("failed", (error type, message)) once, then
("events", [(id, token or None, finish reason or None), ...]) per iteration, ("metrics", (id, dict)), and
("closed", None) after the last request drained.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from kvexport.strategies import InputError, KvexportError

from .engine import Engine, EngineClosedError, Event, QueueFullError, RequestHandle, check_submission, deliver
from .exported import ExportedModel
from .generator import Prompt, RequestChecker
from .sampling import SamplingConfig

REPLY_TIMEOUT_S = 30.0


class RemoteHandle(RequestHandle):
    """A request's handle on the front end: cancelling it tells the engine process."""

    def __init__(self, engine: EngineProcess, *args):
        super().__init__(*args)
        self._engine = engine

    def cancel(self) -> None:
        if not self.cancelled and self.finish_reason is None:
            self.cancelled = True
            self._engine._send(("cancel", self.id))


class EngineProcess:
    def __init__(self, model: str | Path, max_slots: int = 8, max_queue: int = 256, max_length: int | None = None,
                 **engine_options):
        """engine_options: the Engine's (provider, cuda_graph, batching, ...); an Engine that cannot start raises
        its error here."""
        self.model = ExportedModel.load(model)
        self.max_slots, self.max_queue = max_slots, max_queue
        self.requests = RequestChecker(self.model, None, max_length or self.model.facts.max_positions)
        self._tokenizer = self.requests.tokenizer if self.model.has_tokenizer else None
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        options = dict(engine_options, max_slots=max_slots, max_queue=max_queue + max_slots, max_length=max_length)
        self._process = context.Process(target=run_engine, args=(child, str(self.model.directory), options),
                                        name="kvexport-engine", daemon=True)
        self._process.start()
        child.close()
        try:
            kind, detail = self._connection.recv()
        except EOFError:
            kind, detail = "failed", ("KvexportError", f"the engine process exited ({self._process.exitcode})")
        if kind == "failed":
            self._process.join()
            raise (InputError if detail[0] == "InputError" else KvexportError)(detail[1])
        self._handles: dict[int, RemoteHandle] = {}  # requests in flight
        self._replies: dict[int, queue.Queue] = {}
        self._ids = itertools.count()
        self._handles_lock = threading.Lock()
        self._send_lock = threading.Lock()  # one message at a time; never held while waiting for the receiver
        self._closing = False
        self.refused_queue_full = 0
        self._receiver = threading.Thread(target=self._receive, name="kvexport-engine-receiver", daemon=True)
        self._receiver.start()

    def submit(self, prompt: Prompt, config: SamplingConfig | None = None,
               timeout_s: float | None = None) -> RequestHandle:
        """As Engine.submit."""
        ids, config = check_submission(self.requests, prompt, config, timeout_s)
        with self._send_lock:
            if self._closing:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            with self._handles_lock:
                if len(self._handles) >= self.max_queue + self.max_slots:
                    self.refused_queue_full += 1
                    raise QueueFullError(f"{len(self._handles)} requests are in flight for {self.max_slots} rows: "
                                         "retry later")
                handle = RemoteHandle(self, next(self._ids), ids, config, None, self._tokenizer)
                self._handles[handle.id] = handle
            try:
                self._connection.send(("submit", handle.id, ids, config, timeout_s))
            except OSError:
                with self._handles_lock:
                    self._handles.pop(handle.id, None)
                raise EngineClosedError("the engine process has stopped") from None
        return handle

    def metrics(self) -> dict:
        """The engine's metrics (as Engine.metrics), asked of the engine process."""
        token, reply = next(self._ids), queue.Queue(1)
        self._replies[token] = reply
        if not self._receiver.is_alive():
            self._replies.pop(token)
            raise EngineClosedError("the engine process has stopped")
        self._send(("metrics", token))
        try:
            metrics = reply.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            raise KvexportError(f"the engine process did not answer in {REPLY_TIMEOUT_S:.0f} s") from None
        finally:
            self._replies.pop(token, None)
        if metrics is None:
            raise EngineClosedError("the engine process has stopped")
        return {**metrics, "refused_queue_full": self.refused_queue_full}

    def close(self, drain: bool = True) -> None:
        """Take no new requests; with drain, finish the ones queued and running, else cancel them."""
        with self._send_lock:
            if not self._closing:
                self._closing = True
                try:
                    self._connection.send(("close", drain))
                except OSError:  # the engine process is gone already
                    pass
        self._receiver.join()
        self._process.join()

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            if self._process.is_alive():
                self._connection.send(message)

    def _receive(self) -> None:
        """Everything the engine has sent at each wake-up is handled together: a front end that falls behind the
        engine wakes its consumers once for several steps' tokens, so it catches up instead of blocking the
        engine's sends."""
        try:
            while True:
                messages = [self._connection.recv()]
                while self._connection.poll():
                    messages.append(self._connection.recv())
                self._dispatch([item for kind, detail in messages if kind == "events" for item in detail])
                for kind, detail in messages:
                    if kind == "metrics" and detail[0] in self._replies:
                        self._replies[detail[0]].put(detail[1])
                if messages[-1][0] == "closed":
                    return
        except (EOFError, OSError):  # the engine process died: its requests end with "error"
            pass
        finally:
            self._closing = True
            with self._handles_lock:
                stranded = list(self._handles)
            self._dispatch([(request_id, None, "error") for request_id in stranded])
            for reply in list(self._replies.values()):
                reply.put(None)

    def _dispatch(self, items: list[tuple[int, int | None, str | None]]) -> None:
        """Record an iteration's tokens on their handles, and deliver them."""
        events = []
        with self._handles_lock:
            for request_id, token, reason in items:
                handle = self._handles.pop(request_id) if reason else self._handles[request_id]
                if token is not None:
                    handle.tokens.append(token)
                handle.finish_reason = reason
                events.append((handle, Event(token, "", reason)))
        deliver(events)


def run_engine(connection: Connection, directory: str, options: dict) -> None:
    """The engine process: an Engine whose events go to the front end, and the front end's commands."""
    send_lock, map_lock = threading.Lock(), threading.Lock()
    front_ids: dict[int, int] = {}  # engine handle id -> front end id, while in flight
    handles: dict[int, RequestHandle] = {}  # front end id -> engine handle, while in flight

    def send(message: tuple) -> None:
        with send_lock:
            connection.send(message)

    def on_events(items: list[tuple[RequestHandle, Event]]) -> None:
        out = []
        with map_lock:
            for handle, event in items:
                front = front_ids[handle.id]
                if event.finish_reason is not None:
                    del front_ids[handle.id], handles[front]
                out.append((front, event.token_id, event.finish_reason))
        send(("events", out))

    try:
        engine = Engine(directory, on_events=on_events, **options)
    except Exception as error:  # noqa: BLE001 - the front end raises it
        send(("failed", (type(error).__name__, str(error))))
        return
    send(("ready", None))
    while True:
        try:
            kind, *detail = connection.recv()
        except EOFError:  # the front end is gone: nobody reads the answers
            engine.close(drain=False)
            return
        if kind == "submit":
            front, ids, config, timeout_s = detail
            try:
                with map_lock:
                    handle = engine.submit(ids, config, timeout_s)
                    front_ids[handle.id], handles[front] = front, handle
            except KvexportError:  # checked by the front end already; a race with close, for example
                send(("events", [(front, None, "error")]))
        elif kind == "cancel":
            with map_lock:
                handle = handles.get(detail[0])
            if handle is not None:
                handle.cancel()
        elif kind == "metrics":
            send(("metrics", (detail[0], engine.metrics())))
        elif kind == "close":
            engine.close(drain=detail[0])
            send(("closed", None))
            return
