"""Graceful drain of an ingress replica: once `begin_drain()` is called (by `fusionserve serve`
on SIGTERM or Ctrl-C, through serve_app/ops/replicas.py), every new request, /healthz included
(so a load balancer stops sending), is answered 503 `shutting_down` with Retry-After, while the
requests already in flight run to their end; the CLI waits for `in_flight()` to reach 0 or for
its grace period, then stops Ray. Counted per replica process; plain ASGI, so a streamed
answer counts until its last byte is sent."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.http.errors import SERVER_ERROR, ApiError

RETRY_AFTER_S = 5  # about a replica's restart elsewhere; a client with another address need not wait


@dataclass
class DrainState:
    draining: bool = False
    in_flight: int = 0


_state = DrainState()


def begin_drain() -> int:
    """Refuse new requests from now on; returns the requests still in flight."""
    _state.draining = True
    return _state.in_flight


def in_flight() -> int:
    return _state.in_flight


def is_draining() -> bool:
    return _state.draining


def shutting_down() -> ApiError:
    return ApiError(
        "the server is shutting down: this request was not started; send it again (another replica or "
        "the restarted server will answer it)",
        status_code=503,
        code="shutting_down",
        error_type=SERVER_ERROR,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class DrainMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _state.draining:
            await shutting_down().response()(scope, receive, send)
            return
        _state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            _state.in_flight -= 1


# Called in an ingress replica's process by `actor.__ray_call__` (the first argument is the replica).
def begin_drain_in_replica(_replica: object) -> int:
    return begin_drain()


def in_flight_in_replica(_replica: object) -> int:
    return in_flight()
