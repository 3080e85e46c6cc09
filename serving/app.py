"""`kvexport serve`: one Engine behind an OpenAI-compatible HTTP API (FastAPI on uvicorn), in one or more API
server processes.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics (Prometheus);
with an API key, every /v1/ route wants it (serving/guard.py). uvicorn's graceful shutdown on SIGTERM stops taking
connections and lets in-flight requests finish; the engine then drains and the process exits 0. If the engine
process dies, /health answers 503 at once and the server exits with status 1, so that its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from kvexport.runtime.engine import Engine
from kvexport.runtime.engine_process import (
    SWITCH_INTERVAL_S,
    EngineClient,
    EngineProcess,
    freeze_startup_objects,
    launch_engine,
)
from kvexport.runtime.exported import ExportedModel
from kvexport.strategies import KvexportError

from .guard import Guard
from .openai_api import ApiSettings, ChatCompletions, Completions, error, prometheus

# After the engine died: how long the front ends get to shut down (their requests end with 503).
ENGINE_EXIT_GRACE_S = 5.0


def models_payload(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "kvexport"}]}


def metrics_response(engine: EngineClient) -> PlainTextResponse:
    return PlainTextResponse(prometheus(engine.metrics()), media_type="text/plain; version=0.0.4")


def health_response(engine: EngineClient | Engine, model_name: str, server: str, server_id: int) -> JSONResponse:
    if engine.alive:
        return JSONResponse({"status": "ok", "model": model_name, server: server_id})
    return JSONResponse({"status": "engine stopped", "model": model_name, server: server_id}, 503)


def add_routes(app: FastAPI, engine: EngineClient, settings: ApiSettings) -> None:
    created, model_name = int(time.time()), settings.model_name
    app.add_api_route("/v1/completions", Completions(engine, settings), methods=["POST"])
    app.add_api_route("/v1/chat/completions", ChatCompletions(engine, settings), methods=["POST"])

    @app.get("/v1/models")
    async def models():
        return models_payload(model_name, created)

    @app.get("/health")
    async def health():
        return health_response(engine, model_name, "api_server", os.getpid())

    @app.get("/metrics")
    def metrics():  # a round trip to the engine process: in FastAPI's thread pool, not on the event loop
        return metrics_response(engine)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, problem: RequestValidationError):
        return error(400, str(problem.errors()[0].get("msg", problem)))

    @app.exception_handler(404)
    async def not_found(request, _):
        return error(404, f"no route {request.url.path}: the API has /v1/completions, /v1/chat/completions, "
                          "/v1/models, /health, /metrics", code="not_found")

    @app.exception_handler(405)
    async def wrong_method(request, _):
        return error(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")


def start_engine(directory: Path, **engine_options) -> EngineProcess:
    """The engine of a Ray Serve replica, in a process of its own, so that streaming never delays a step."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return EngineProcess(directory, **engine_options)


def create_app(engine: EngineClient | Engine, settings: ApiSettings) -> FastAPI:
    """A front end made without a receiver thread receives the engine process's messages on the app's event loop
    (EngineClient.receive_on)."""
    @contextlib.asynccontextmanager
    async def lifespan(_):
        if isinstance(engine, EngineClient) and engine.receives_on_loop:
            engine.receive_on(asyncio.get_running_loop())
        yield
        # after uvicorn stopped taking requests and in-flight ones ended; off the loop, which may receive the reply
        await asyncio.to_thread(engine.close, True)

    app = FastAPI(title="kvexport", lifespan=lifespan)
    add_routes(app, engine, settings)
    app.add_middleware(Guard, limits=settings.limits)
    return app


def listen(host: str, port: int, count: int) -> list[socket.socket]:
    """The server's listening sockets, opened before anything starts, so a taken port is a one-line error. Several
    API servers get one socket each on the same port (SO_REUSEPORT), over which the kernel spreads connections
    evenly, where processes sharing one socket take them as they happen to wake."""
    spread = count > 1 and hasattr(socket, "SO_REUSEPORT")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        first = socket.create_server((host, port), family=family, backlog=2048, reuse_port=spread)
        port = first.getsockname()[1]  # port 0: the others share the one the first got
        return [first, *(socket.create_server((host, port), family=family, backlog=2048, reuse_port=True)
                         for _ in range(count - 1 if spread else 0))]
    except OSError as problem:
        raise KvexportError(f"cannot listen on {host}:{port} ({problem.strerror}): pick another --port or "
                            "--host") from None


def run_api_server(listener: socket.socket, connection: Connection, in_flight: Synchronized, directory: Path,
                   settings: ApiSettings, limits: tuple[int, int, int | None]) -> None:
    """One front end (an API server process): HTTP on the shared listening socket, over its pipe to the engine.
    The engine's messages are received on the event loop that streams them (EngineClient.receive_on)."""
    import uvicorn

    engine = EngineClient(directory, connection, in_flight, *limits, receiver_thread=False)
    config = uvicorn.Config(create_app(engine, settings), log_level="warning",
                            timeout_graceful_shutdown=60)
    freeze_startup_objects()
    # uvicorn shuts down gracefully on SIGTERM or SIGINT, then re-raises the signal to the handler that was there
    # before: with these, a drained shutdown ends as a clean exit (status 0) instead of a death by signal.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    uvicorn.Server(config).run(sockets=[listener])


def serve(directory: Path, host: str, port: int, api: ApiSettings, api_servers: int = 1, max_slots: int = 16,
          max_queue: int = 256, max_length: int | None = None, **engine_options) -> int:
    """The engine in a process of its own and `api_servers` front-end processes that accept connections on one
    port (see listen), each over its own pipe to the engine. SIGTERM to this process is passed
    on to the front ends, which stop taking connections and finish their requests; a terminal's Ctrl-C reaches
    them directly. Returns 0 when every front end shut down cleanly, 1 when the engine process died (the front
    ends answered 503 meanwhile) or a front end failed. api.model_name defaults to the export's source."""
    model = ExportedModel.load(directory)
    listeners = listen(host, port, api_servers)
    limits = (max_slots, max_queue, max_length)
    engine, connections, in_flight = launch_engine(directory, api_servers, *limits, **engine_options)
    api = dataclasses.replace(api, model_name=api.model_name or model.facts.source)
    context = multiprocessing.get_context("spawn")
    fronts = [context.Process(target=run_api_server, name=f"kvexport-api-{index}",
                              args=(listeners[index % len(listeners)], connection, in_flight, directory, api, limits))
              for index, connection in enumerate(connections)]
    stopping = threading.Event()

    def stop(*_) -> None:
        stopping.set()
        for front in fronts:
            if front.is_alive():
                front.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for front in fronts:
        front.start()
    for connection in connections:  # each is the front end's now
        connection.close()
    port = listeners[0].getsockname()[1]  # the one the kernel chose, for --port 0
    for listener in listeners:
        listener.close()
    print(f"serving {api.model_name} from {directory} on http://{host}:{port}/v1 ({max_slots} slots, "
          f"{model.layout.bytes_per_token()} KV bytes/token, {api_servers} API server process"
          f"{'es' if api_servers > 1 else ''}, engine process {engine.pid}"
          f"{', API key required' if api.limits.api_key else ''})", flush=True)
    while any(front.is_alive() for front in fronts):
        wait([engine.sentinel, *(front.sentinel for front in fronts if front.is_alive())])
        if not engine.is_alive() and not stopping.is_set():
            print(f"kvexport: error: the engine process exited (status {engine.exitcode}); the server stops so that "
                  "its supervisor can restart it", file=sys.stderr, flush=True)
            stop()
            for front in fronts:  # they answer 503 to what is in flight, then shut down
                front.join(ENGINE_EXIT_GRACE_S)
                if front.is_alive():
                    front.kill()
            return 1
    engine.join()
    return 0 if all(front.exitcode == 0 for front in fronts) else 1
