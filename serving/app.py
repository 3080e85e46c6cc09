"""`kvexport serve`: one Engine behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

Routes: POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus). uvicorn's graceful shutdown
on SIGTERM stops taking connections and lets in-flight requests finish; the engine then drains and the process
exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse

from kvexport.runtime.engine_process import EngineProcess

from .openai_api import Completions, error, prometheus


def models_payload(model_name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "kvexport"}]}


def metrics_response(engine: EngineProcess) -> PlainTextResponse:
    return PlainTextResponse(prometheus(engine.metrics()), media_type="text/plain; version=0.0.4")


def add_routes(app: FastAPI, engine: EngineProcess, model_name: str, stream_interval: int) -> None:
    created = int(time.time())
    app.add_api_route("/v1/completions", Completions(engine, model_name, stream_interval), methods=["POST"])

    @app.get("/v1/models")
    async def models():
        return models_payload(model_name, created)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    def metrics():  # a round trip to the engine process: in FastAPI's thread pool, not on the event loop
        return metrics_response(engine)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, problem: RequestValidationError):
        return error(400, str(problem.errors()[0].get("msg", problem)))

    @app.exception_handler(404)
    async def not_found(request, _):
        return error(404, f"no route {request.url.path}: the API has /v1/completions, /v1/models, /health, "
                          "/metrics", code="not_found")

    @app.exception_handler(405)
    async def wrong_method(request, _):
        return error(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")


SWITCH_INTERVAL_S = 0.0005


def start_engine(directory: Path, **engine_options) -> EngineProcess:
    """The engine of a server (kvexport serve, a Ray Serve replica), in a process of its own, so that streaming
    never delays a step. The server's thread that receives the engine's tokens and its event loop share the GIL,
    and a thread asking for it waits up to the switch interval (5 ms by default): 0.5 ms keeps the tokens moving."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    return EngineProcess(directory, **engine_options)


def create_app(engine: EngineProcess, model_name: str, stream_interval: int = 1) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        engine.close(drain=True)  # after uvicorn stopped taking requests and in-flight ones ended

    app = FastAPI(title="kvexport", lifespan=lifespan)
    add_routes(app, engine, model_name, stream_interval)
    return app


def serve(directory: Path, host: str, port: int, model_name: str | None, stream_interval: int = 1,
          **engine_options) -> int:
    import uvicorn

    engine = start_engine(directory, **engine_options)
    name = model_name or engine.model.facts.source
    print(f"serving {name} from {directory} on http://{host}:{port}/v1 ({engine.max_slots} slots, "
          f"{engine.model.layout.bytes_per_token()} KV bytes/token)", flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler that was there before: with this
    # one, a drained shutdown ends as a clean exit (status 0) instead of a death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(create_app(engine, name, stream_interval), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=60)
    return 0

