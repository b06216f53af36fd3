"""`saehook serve --ray --replicas N`: N replicas of the `saehook serve` app behind one
OpenAI-compatible endpoint, through Ray Serve (README "Scaling out with Ray").

    from saehook.serve.ray_serve import serve_on_ray
    serve_on_ray("model.gguf", {"res": "layer12.sae.pt"}, replicas=4, port=8000, parallel=4)

Each replica is a Ray actor that runs load_server (its own model, SAEs, scheduler thread) and
serves create_app's FastAPI app unchanged, so per-request steering, features, streaming and
errors are those of one server; Ray Serve's proxy spreads requests over the replicas. Every
response carries x-saehook-replica (which replica answered). The model and SAE paths must
exist on every node that hosts a replica.
"""
from __future__ import annotations

import signal
import threading
from typing import Mapping, Optional

APP_NAME = "saehook"
REPLICA_HEADER = "x-saehook-replica"


class ServeReplica:
    """One replica: load_server in the constructor, create_app as its ASGI app (Ray Serve's
    deferred ingress, __serve_build_asgi_app__)."""

    def __init__(self, model: str, saes: Mapping[str, str], load_kwargs: dict):
        from . import load_server

        self.state = load_server(model, dict(saes), **load_kwargs)

    def __serve_build_asgi_app__(self):
        from ray import serve

        from .app import create_app

        app = create_app(self.state)
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def _name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.scheduler.close()
            state.llm.close()


def serve_on_ray(model: str, saes: Mapping[str, str], *, replicas: int = 2, address: Optional[str] = None,
                 host: str = "127.0.0.1", port: int = 8000, num_cpus: float = 1, num_gpus: float = 0,
                 max_ongoing_requests: Optional[int] = None, **load_kwargs):
    """Starts (or connects to) a Ray cluster, Ray Serve's HTTP proxy on host:port, and
    `replicas` replicas of the saehook server; returns when every replica is running (the
    deployment handle). load_kwargs are load_server's (parallel, n_ctx, n_batch, n_threads,
    chat_format, api_key, limits, queue_size, decode, model_name, k...). Each replica takes
    num_cpus / num_gpus of the cluster; a replica accepts up to max_ongoing_requests at once
    (default parallel + queue_size, what one server admits before answering 503)."""
    import ray
    from ray import serve

    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"--replicas must be a whole number of at least 1, got {replicas!r}")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    if max_ongoing_requests is None:
        max_ongoing_requests = int(load_kwargs.get("parallel", 4)) + int(load_kwargs.get("queue_size", 64))
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(serve.ingress()(ServeReplica), name="SaehookServe")
    app = deployment.options(num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
                             ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}).bind(
        model, dict(saes), load_kwargs)
    return serve.run(app, name=APP_NAME, route_prefix="/")


def run_on_ray(model: str, saes: Mapping[str, str], **kw) -> None:
    """serve_on_ray, then waits for SIGTERM / Ctrl-C and shuts the replicas down."""
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(address=kw.pop("address", None), log_to_driver=False)
    stop = threading.Event()
    # after ray.init (which installs a SIGTERM handler that exits at once), before the replicas
    # start: a SIGTERM while they load only marks the stop, and they are shut down below
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve_on_ray(model, saes, **kw)
        while not stop.wait(1.0):
            pass
    finally:
        serve.delete(APP_NAME)  # this app only: Serve itself may be serving others on the cluster
        if started:
            ray.shutdown()
