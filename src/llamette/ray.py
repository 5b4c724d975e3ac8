"""Serve a model on a Ray cluster with Ray Serve: replicas placed across the cluster's machines,
each a llamette engine with its own continuous batching, behind Ray Serve's router, answering
the OpenAI API of `llamette serve` (the same application: server.create_app).

Needs Ray Serve (`pip install "llamette[ray]"`). Started by `llamette serve MODEL --replicas N
[--ray-address ADDR]`, or as Ray users start applications:
`serve run llamette.ray:app model=PATH replicas=2 threads=1`. Each replica loads the model from
its path on its own node (a shared filesystem, or a copy at the same path).
"""

from __future__ import annotations

import json

from ray import serve

from llamette.errors import LlametteError
from llamette.kernels import set_threads
from llamette.server import MAX_BATCH, ServedModel, create_app

REPLICA_HEADER = b"x-llamette-replica"  # on every answer: which replica gave it


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress()
class Replica:
    """One engine serving a model: the server's application, its answers marked with the
    replica's id; Ray's health check asks the engine."""

    def __init__(self, model: str, threads: int = 1, **load_options):
        set_threads(threads)  # the engine's thread takes this count (Engine.threads)
        api_key = load_options.pop("api_key", None)
        self.served = ServedModel.load(model, **load_options)
        self.served.api_key = api_key
        self.served.engine.model.adapt_threads = False  # Ray gave it `threads` CPUs
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self):
        return MarkReplica(create_app(self.served), self.replica_id.encode())

    def check_health(self) -> None:
        fault = self.served.engine.fault()
        if fault is not None:
            raise RuntimeError(fault)


class MarkReplica:
    """ASGI middleware: the replica's id in a header of every answer."""

    def __init__(self, app, replica_id: bytes):
        self.app, self.replica_id = app, replica_id

    async def __call__(self, scope, receive, send) -> None:
        async def marked(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (REPLICA_HEADER, self.replica_id)]  # fmt: skip
            await send(message)

        await self.app(scope, receive, marked if scope["type"] == "http" else send)


# `serve run llamette.ray:app key=value ...`: the arguments and how each is read
ARGUMENTS = {
    "model": str, "tokenizer": str, "replicas": int, "threads": int, "max_batch": int,
    "max_queue": int, "ctx": int, "name": str, "kv_budget": int, "kv_type": str, "api_key": str,
    "autoscaling": json.loads,
}  # fmt: skip


def app(args: dict[str, str]) -> serve.Application:
    """The Ray Serve application for `serve run llamette.ray:app model=PATH ...` (and for
    `llamette serve --replicas`): `replicas` replicas (default 1) of `threads` CPUs and kernel
    threads each (default 1), or Ray Serve's `autoscaling` config (JSON) instead of a count;
    the other arguments are `llamette serve`'s (max_batch, ctx, kv_budget, kv_type, ...)."""
    unknown = sorted(set(args) - set(ARGUMENTS))
    if unknown:
        raise LlametteError(f"llamette.ray:app: unknown arguments {', '.join(unknown)}; it takes "
                            + ", ".join(ARGUMENTS))  # fmt: skip
    if "model" not in args:
        raise LlametteError("llamette.ray:app: model=PATH is needed")
    options = {}
    for key, value in args.items():
        try:
            options[key] = ARGUMENTS[key](value) if isinstance(value, str) else value
        except ValueError:
            raise LlametteError(f"llamette.ray:app: {key}={value!r} is not valid") from None
    replicas, threads = options.pop("replicas", 1), options.pop("threads", 1)
    autoscaling = options.pop("autoscaling", None)
    if "tokenizer" in options:
        options["tokenizer_path"] = options.pop("tokenizer")
    if replicas < 1 or threads < 1:
        raise LlametteError("llamette.ray:app: replicas and threads must be 1 or more")
    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    # as many requests to a replica at once as its engine batches (Ray Serve's default is 5);
    # the others wait in Ray's router, for whichever replica frees a slot first
    deployment = Replica.options(ray_actor_options={"num_cpus": threads},
                                 max_ongoing_requests=options.get("max_batch", MAX_BATCH), **scale)  # fmt: skip
    return deployment.bind(options.pop("model"), threads, **options)
