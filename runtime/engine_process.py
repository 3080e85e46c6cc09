"""An Engine in a process of its own, behind one or more front ends with the Engine's API (submit, metrics, close).

Threads of one Python process share one interpreter lock, so there the scheduler's steps wait while the server turns
tokens into text and streams them: on the H100 the engine served 10.9k tokens/s to consumers that detokenize and
15.7k to consumers of token ids. As vLLM's engine core does, the engine runs in a child
process ('spawn': CUDA state is never forked) and sends each scheduler iteration's token ids in one message per
front end; a front end checks requests (encoding prompts with the tokenizer; the engine takes them as checked), the
consumers of its handles turn ids into text, and the front ends count the requests in flight for backpressure in one
counter in shared memory (a submit takes one, the engine gives it back when the request ends; a submit that would
pass max_slots + max_queue is refused), so the engine's own queue never refuses. A server can run several front
ends, in processes of their own, each over its own pipe to the one engine (vLLM's --api-server-count):
`launch_engine(..., front_ends=N)`, then an `EngineClient` per pipe, in the process that serves it. The engine
process's other thread only takes the front ends' messages, and an API server reads the engine's on its event loop:
a second thread busy in Python makes the scheduler wait for the interpreter lock after each CUDA call (the H100
profile).

Messages, front end to engine: ("submit", id, token ids, config, timeout_s), ("cancel", id), ("refused", None),
("metrics", id), ("close", drain). Engine to front end: ("ready", None) or ("failed", (error type, message)) once,
on the first connection, then ("events", [(id, token or None, finish reason or None), ...]) per iteration,
("metrics", (id, dict)), and ("closed", None) once that front end's last request has ended after its close.
The engine process ends when every front end has closed or gone; a front end that goes away (its pipe ends)
has its requests cancelled.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import multiprocessing
import pickle
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from kvexport.strategies import InputError, KvexportError

from .engine import Engine, EngineClosedError, Event, QueueFullError, RequestHandle, check_submission, deliver
from .exported import ExportedModel
from .generator import Prompt, RequestChecker
from .sampling import SamplingConfig

REPLY_TIMEOUT_S = 30.0
# A thread that asks for the interpreter lock waits up to the switch interval (5 ms by default) for the one holding
# it: the scheduler thread, after each CUDA call that let go of it, and a front end's receiver, after each read
SWITCH_INTERVAL_S = 0.0005


def freeze_startup_objects() -> None:
    """Exclude what a server process holds once started (modules, the model, the sessions: about 232k objects in
    the engine process) from Python's cyclic garbage collector, as vLLM does: otherwise each full collection
    scans them all, a pause of about 90 ms on a 2-core machine, during which no step is
    queued and no token streamed. Only kvexport's own processes call this."""
    gc.collect()
    gc.freeze()


def launch_engine(model: str | Path, front_ends: int = 1, max_slots: int = 8, max_queue: int = 256,
                  max_length: int | None = None, **engine_options) -> tuple[BaseProcess, list[Connection], Synchronized]:
    """Start the engine process, with one pipe per front end and the counter of requests in flight that they
    share; an Engine that cannot start raises its error here. engine_options: the Engine's (provider, cuda_graph,
    batching, ...)."""
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe() for _ in range(front_ends)]
    in_flight = context.Value("i", 0)
    options = dict(engine_options, max_slots=max_slots, max_queue=max_slots + max_queue, max_length=max_length)
    process = context.Process(target=run_engine, args=([child for _, child in pipes], in_flight, str(model), options),
                              name="kvexport-engine", daemon=True)
    process.start()
    for _, child in pipes:
        child.close()
    try:
        kind, detail = pipes[0][0].recv()
    except EOFError:
        kind, detail = "failed", ("KvexportError", f"the engine process exited ({process.exitcode})")
    if kind == "failed":
        process.join()
        raise (InputError if detail[0] == "InputError" else KvexportError)(detail[1])
    return process, [front for front, _ in pipes], in_flight


class RemoteHandle(RequestHandle):
    """A request's handle on a front end: cancelling it tells the engine process."""

    def __init__(self, engine: EngineClient, *args):
        super().__init__(*args)
        self._engine = engine

    def cancel(self) -> None:
        if not self.cancelled and self.finish_reason is None:
            self.cancelled = True
            self._engine._send(("cancel", self.id))


class EngineClient:
    """A front end over one pipe to an engine process (launch_engine): the Engine's submit, metrics and close.
    in_flight: the requests queued or running over every front end, which submit keeps at most max_slots +
    max_queue."""

    def __init__(self, model: str | Path, connection: Connection, in_flight: Synchronized, max_slots: int,
                 max_queue: int, max_length: int | None = None, receiver_thread: bool = True):
        """receiver_thread: receive the engine's messages in a thread of this client's; without, call receive_on
        with the event loop that should."""
        self.model = ExportedModel.load(model)
        self.max_slots, self.max_queue, self._in_flight = max_slots, max_queue, in_flight
        self.requests = RequestChecker(self.model, None, max_length or self.model.facts.max_positions)
        self._tokenizer = self.requests.tokenizer if self.model.has_tokenizer else None
        self._connection = connection
        self._handles: dict[int, RemoteHandle] = {}  # requests in flight
        self._replies: dict[int, queue.Queue] = {}
        self._ids = itertools.count()
        self._handles_lock = threading.Lock()
        self._send_lock = threading.Lock()  # one message at a time; never held while waiting for the receiver
        self._closing = False
        self._received_all = threading.Event()  # the engine sent its last message, or its process has gone
        self.receives_on_loop = not receiver_thread  # its owner's event loop must call receive_on
        if receiver_thread:
            threading.Thread(target=self._receive, name="kvexport-engine-receiver", daemon=True).start()

    def receive_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Receive the engine's messages in `loop` (an API server's, which streams the tokens), not in a thread: a
        receiver thread waits for the interpreter lock after each read while the loop holds it (half its time
        on the H100), and takes it from the loop when it gets it."""
        loop.add_reader(self._connection.fileno(), self._on_readable, loop)

    def submit(self, prompt: Prompt, config: SamplingConfig | None = None,
               timeout_s: float | None = None) -> RequestHandle:
        """As Engine.submit."""
        ids, config = check_submission(self.requests, prompt, config, timeout_s)
        with self._send_lock:
            if self._closing:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            with self._in_flight.get_lock():
                in_flight = self._in_flight.value
                full = in_flight >= self.max_slots + self.max_queue
                self._in_flight.value += 0 if full else 1
            if not full:
                handle = RemoteHandle(self, next(self._ids), ids, config, None, self._tokenizer)
                with self._handles_lock:
                    self._handles[handle.id] = handle
            try:
                self._connection.send(("refused", None) if full else ("submit", handle.id, ids, config, timeout_s))
            except OSError:
                if not full:
                    with self._handles_lock:
                        self._handles.pop(handle.id, None)
                    with self._in_flight.get_lock():
                        self._in_flight.value -= 1
                raise EngineClosedError("the engine process has stopped") from None
        if full:
            raise QueueFullError(f"{in_flight} requests are in flight for {self.max_slots} rows: retry later")
        return handle

    @property
    def alive(self) -> bool:
        """Whether the engine process takes requests: false once it has stopped (or died) or this client closed."""
        return not self._closing

    def metrics(self) -> dict:
        """The engine's metrics (as Engine.metrics, with refusals counted over every front end), asked of the
        engine process."""
        token, reply = next(self._ids), queue.Queue(1)
        self._replies[token] = reply
        if self._received_all.is_set():
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
        return metrics

    def close(self, drain: bool = True) -> None:
        """Take no new requests; with drain, finish the ones queued and running, else cancel them."""
        with self._send_lock:
            if not self._closing:
                self._closing = True
                try:
                    self._connection.send(("close", drain))
                except OSError:  # the engine process is gone already
                    pass
        self._received_all.wait()  # in a thread other than the loop that receives (receive_on), if one does

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._connection.send(message)
            except OSError:  # the engine process is gone: the receiver ends its requests
                pass

    def _receive(self) -> None:
        try:
            while not self._handle(self._read()):
                pass
        except (EOFError, OSError):  # the engine process died: its requests end with "error"
            pass
        finally:  # whatever ended it: close() waits for this
            self._end_reception()

    def _on_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if not self._handle(self._read()):
                return
        except (EOFError, OSError):
            pass
        loop.remove_reader(self._connection.fileno())
        self._end_reception()

    def _read(self) -> list[tuple]:
        """Every message the engine has sent, at least one: a front end that falls behind the engine wakes its
        consumers once for several steps' tokens, so it catches up instead of blocking the engine's sends."""
        messages = [self._connection.recv()]
        while self._connection.poll():
            messages.append(self._connection.recv())
        return messages

    def _handle(self, messages: list[tuple]) -> bool:
        """Deliver the messages' tokens and metrics; whether the engine has sent its last message."""
        self._dispatch([item for kind, detail in messages if kind == "events" for item in detail])
        for kind, detail in messages:
            if kind == "metrics" and detail[0] in self._replies:
                self._replies[detail[0]].put(detail[1])
        return messages[-1][0] == "closed"

    def _end_reception(self) -> None:
        """No more messages: requests still in flight end with "error", waiting metrics with None."""
        self._closing = True
        with self._handles_lock:
            stranded = list(self._handles)
        self._dispatch([(request_id, None, "error") for request_id in stranded])
        for reply in list(self._replies.values()):
            reply.put(None)
        self._received_all.set()

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


class EngineProcess(EngineClient):
    """An engine process with this process as its one front end."""

    def __init__(self, model: str | Path, max_slots: int = 8, max_queue: int = 256, max_length: int | None = None,
                 **engine_options):
        """engine_options: the Engine's (provider, cuda_graph, batching, ...); an Engine that cannot start raises
        its error here."""
        self._process, (connection,), in_flight = launch_engine(model, 1, max_slots, max_queue, max_length,
                                                                **engine_options)
        super().__init__(model, connection, in_flight, max_slots, max_queue, max_length)

    def close(self, drain: bool = True) -> None:
        super().close(drain)
        self._process.join()


class Routes:
    """The engine process's map between its requests and the front ends' (connection index, front end id)."""

    def __init__(self, front_ends: int):
        self.lock = threading.Lock()
        self.fronts: dict[int, tuple[int, int]] = {}  # engine handle id -> (connection, front end id), in flight
        self.handles: list[dict[int, RequestHandle]] = [{} for _ in range(front_ends)]  # per connection
        self.closing: set[int] = set()  # connections that asked to close and await "closed"


def run_engine(connections: list[Connection], in_flight: Synchronized, directory: str, options: dict) -> None:
    """The engine process: an Engine whose events go to their front ends, and the front ends' commands; it gives
    back a request's count in flight when the request ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the front ends decide when this ends
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    send_lock, routes, refused = threading.Lock(), Routes(len(connections)), 0

    def send(index: int, message: tuple) -> None:
        # pickle.dumps, not Connection.send, whose pickler copies its dispatch table for every message: the
        # scheduler thread sends one per front end per step (Connection.recv reads either)
        payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        with send_lock:
            try:
                connections[index].send_bytes(payload)
            except OSError:  # that front end is gone; the loop below cancels its requests
                pass

    def closed_if_done(index: int) -> None:  # under routes.lock
        if index in routes.closing and not routes.handles[index]:
            routes.closing.discard(index)
            send(index, ("closed", None))

    def ended(count: int) -> None:
        with in_flight.get_lock():
            in_flight.value -= count

    def on_events(items: list[tuple[RequestHandle, Event]]) -> None:
        out: dict[int, list] = {}
        with routes.lock:
            for handle, event in items:
                index, front = routes.fronts[handle.id]
                if event.finish_reason is not None:
                    del routes.fronts[handle.id], routes.handles[index][front]
                out.setdefault(index, []).append((front, event.token_id, event.finish_reason))
            ended(sum(event.finish_reason is not None for _, event in items))
            for index, events in out.items():
                send(index, ("events", events))
                closed_if_done(index)

    def cancel_all(index: int) -> None:
        with routes.lock:
            handles = list(routes.handles[index].values())
        for handle in handles:
            handle.cancel()

    try:
        engine = Engine(directory, on_events=on_events, **options)
    except Exception as error:  # noqa: BLE001 - the front end raises it
        send(0, ("failed", (type(error).__name__, str(error))))
        return
    freeze_startup_objects()
    send(0, ("ready", None))
    listening = dict(enumerate(connections))
    while listening:
        for connection in wait(list(listening.values())):
            index = connections.index(connection)
            try:
                kind, *detail = connection.recv()
            except (EOFError, OSError):  # that front end is gone: nobody reads its answers
                del listening[index]
                cancel_all(index)
                continue
            if kind == "submit":
                front, ids, config, timeout_s = detail
                try:
                    with routes.lock:
                        handle = engine.submit_checked(ids, config, timeout_s)  # the front end checked it
                        routes.fronts[handle.id], routes.handles[index][front] = (index, front), handle
                except KvexportError:  # checked by the front end already; a race with close, for example
                    ended(1)
                    send(index, ("events", [(front, None, "error")]))
            elif kind == "cancel":
                with routes.lock:
                    handle = routes.handles[index].get(detail[0])
                if handle is not None:
                    handle.cancel()
            elif kind == "refused":
                refused += 1
            elif kind == "metrics":
                metrics = engine.metrics()
                metrics["refused_queue_full"] += refused
                send(index, ("metrics", (detail[0], metrics)))
            elif kind == "close":
                del listening[index]
                if not detail[0]:
                    cancel_all(index)
                with routes.lock:
                    routes.closing.add(index)
                    closed_if_done(index)
    engine.close(drain=True)  # every front end has closed or gone: what is left was cancelled
