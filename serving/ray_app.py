"""`kvexport serve DIR --replicas N`: the same API on Ray Serve, one Engine per replica behind Ray's HTTP proxy.

Each replica is a Ray actor that loads the export and runs its own engine (with --gpus-per-replica 1, on its own
GPU); the proxy spreads requests over the replicas, and each response names its replica (x-kvexport-replica).
Locally `serve_on_ray` starts a Ray instance on this machine. On a cluster, start Ray on every node first
(`ray start --head` on one, `ray start --address HEAD:6379` on the others), put the export at the same path on
every node (or on a shared filesystem), then run the command on the head node with RAY_ADDRESS=auto; the proxy
listens on the head node's --host and --port.
"""

# No `from __future__ import annotations`: Ray pickles the replica class, and FastAPI must find the route
# parameters' types (Request) as objects on the replica, not as names to look up.
import os
import time
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request

from .openai_api import ApiSettings


def deployment(directory: Path, api: ApiSettings, replicas: int, gpus_per_replica: float, **engine_options):
    """A bound Ray Serve application: `replicas` copies of the API, each over its own Engine. api.model_name
    defaults to the export's source."""
    from ray import serve

    from .app import health_response, metrics_response, models_payload, start_engine
    from .guard import Guard
    from .openai_api import ChatCompletions, Completions

    app = FastAPI(title="kvexport")
    app.add_middleware(Guard, limits=api.limits)

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_gpus": gpus_per_replica},
                      max_ongoing_requests=engine_options.get("max_queue", 256))
    @serve.ingress(app)
    class KvexportReplica:
        def __init__(self):
            self.engine = start_engine(directory, **engine_options)
            self.settings = replace(api, model_name=api.model_name or self.engine.model.facts.source)
            self.name, self.created = self.settings.model_name, int(time.time())
            self.routes = {"completions": Completions(self.engine, self.settings),
                           "chat": ChatCompletions(self.engine, self.settings)}

        async def answer(self, route: str, request: Request):
            response = await self.routes[route](request)
            response.headers["x-kvexport-replica"] = str(os.getpid())
            return response

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await self.answer("completions", request)

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await self.answer("chat", request)

        @app.get("/v1/models")
        async def models(self):
            return models_payload(self.name, self.created)

        @app.get("/health")
        async def health(self):
            return health_response(self.engine, self.name, "replica", os.getpid())

        @app.get("/metrics")
        async def metrics(self):
            return metrics_response(self.engine)

    return KvexportReplica.bind()


def serve_on_ray(directory: Path, host: str, port: int, api: ApiSettings, replicas: int,
                 gpus_per_replica: float = 0.0, block: bool = True, **engine_options) -> int:
    import ray
    from ray import serve

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(Path(directory).resolve(), api, replicas, gpus_per_replica, **engine_options),
              route_prefix="/", name="kvexport")
    print(f"serving {directory} on http://{host}:{port}/v1 with {replicas} Ray Serve replicas", flush=True)
    if not block:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
