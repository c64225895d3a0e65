"""A deployment's live replica actors, found by the names Serve gives them
(SERVE_REPLICA::APP#DEPLOYMENT#ID), and a function run in each replica's process. Used to drain
the ingress on shutdown, to count restarts in `fusionserve status`, and by the chaos tools."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def replica_prefix(app: str, deployment: str) -> str:
    return f"SERVE_REPLICA::{app}#{deployment}#"


def replica_actors(app: str, deployment: str) -> list[Any]:
    """Handles of the deployment's replica actors (a dying one may still be listed)."""
    import ray

    prefix = replica_prefix(app, deployment)
    return [
        ray.get_actor(actor["name"], namespace=actor["namespace"])
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(prefix)
    ]


def call_in_replicas(app: str, deployment: str, function: Callable[[Any], T], timeout_s: float = 30.0) -> list[T]:
    """`function(replica)` in every live replica's process; replicas that are gone are skipped."""
    import ray

    results = []
    for actor in replica_actors(app, deployment):
        try:
            results.append(ray.get(actor.__ray_call__.remote(function), timeout=timeout_s))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            continue
    return results


def replica_pids(app: str, deployment: str) -> list[int]:
    """The process ids of the deployment's live replicas (what the chaos tools SIGKILL)."""
    return call_in_replicas(app, deployment, _pid)


def _pid(_replica: object) -> int:
    import os

    return os.getpid()


INTENTIONAL_DEATHS = frozenset({"RAY_KILL"})  # the controller stopping a replica (downscale, redeploy)


def replica_deaths(app: str) -> dict[str, int]:
    """Per deployment: replicas of `app` that died unexpectedly (a crash, a kill, out of memory)
    and that Serve replaced. Read from the GCS actor table, which keeps a bounded number of dead
    actors, through ray._private.state: the public state API needs the dashboard, which tests and
    some clusters run without."""
    from ray._private import state
    from ray.core.generated.common_pb2 import ActorDiedErrorContext  # type: ignore[attr-defined]

    prefix = f"SERVE_REPLICA::{app}#"
    deaths: dict[str, int] = {}
    for actor in state.actors().values():
        name = actor.get("Name") or ""
        if actor.get("State") != "DEAD" or not name.startswith(prefix):
            continue
        cause = actor.get("DeathCause")
        context = getattr(cause, "actor_died_error_context", None)
        reason = ActorDiedErrorContext.Reason.Name(context.reason) if context is not None else "UNKNOWN"
        if reason not in INTENTIONAL_DEATHS:
            deployment = name[len(prefix) :].split("#")[0]
            deaths[deployment] = deaths.get(deployment, 0) + 1
    return deaths
