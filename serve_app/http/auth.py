"""API keys at the ingress: `Authorization: Bearer KEY` on every route but /healthz, the
docs and the playground page, and per-key limits. Off unless `api_keys_file` is set.

Keys are looked up by the SHA-256 of what the client sent, compared with every stored hash in
constant time; a key is never logged, only its name. The key file is re-read when its inode,
size or mtime change (one `stat` per request), so `fusionserve keys revoke` takes effect on the
next request without a restart. Limits count per ingress replica: with N ingress replicas a
key gets up to N times its limits.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.config import ApiKeyLimits
from serve_app.http.api_keys import KeyFileError, StoredKey, hash_key, read_keys
from serve_app.http.errors import ApiError
from serve_app.http.playground import OPEN_PAGES, OPEN_PREFIXES

logger = logging.getLogger("ray.serve")

OPEN_PATHS = frozenset({"/healthz", *OPEN_PAGES})  # the page asks for the key, then sends it
WINDOW_S = 60.0  # requests_per_minute counts admissions in any window this long
INVALID_API_KEY = "invalid_api_key"
RATE_LIMITED = "rate_limit_exceeded"
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}
NO_KEY = "-"  # the metrics' key name of a request without a valid key (no stored name can be "-")


def bearer_token(authorization: str | None) -> str | None:
    """The KEY of `Bearer KEY`; None when the header is missing or another scheme."""
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


class KeyRing:
    """The key file's keys as last read; re-read when the file changes. A file that is missing
    or invalid when the ring is made is an error; later, a deleted file accepts no key and an
    invalid one keeps the keys read before (writes are atomic, so it was edited by hand)."""

    def __init__(self, path: Path):
        self.path = path
        self._signature = self._stat()  # before reading: a change in between is read next time
        self._keys = read_keys(path).keys

    def find(self, key: str) -> StoredKey | None:
        self._refresh()
        digest = hash_key(key)
        found = None
        for stored in self._keys:  # no early exit: the time taken says nothing about which key matched
            if hmac.compare_digest(stored.sha256, digest):
                found = stored
        return found

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _refresh(self) -> None:
        signature = self._stat()
        if signature == self._signature:
            return
        self._signature = signature
        try:
            self._keys = read_keys(self.path).keys
        except KeyFileError as exc:
            if signature is None:
                self._keys = []
            kept = "no key is accepted" if signature is None else "the keys read before stay in use"
            logger.warning("%s; %s", exc, kept)


@dataclass
class _KeyUse:
    admitted: deque[float] = field(default_factory=deque)  # clock times of the admissions in the window
    in_flight: int = 0


class KeyLimiter:
    """Per key name: requests admitted in the last minute and requests in flight."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._uses: dict[str, _KeyUse] = {}

    def admit(self, name: str, limits: ApiKeyLimits) -> None:
        """Count a request of `name` in, or raise a 429 saying when to retry."""
        use = self._uses.setdefault(name, _KeyUse())
        if limits.max_concurrent is not None and use.in_flight >= limits.max_concurrent:
            raise _rate_limited(
                f"API key {name!r} has {use.in_flight} requests in flight, its limit (max_concurrent); "
                "retry when one has finished",
                retry_after_s=1,  # unknowable: an image takes seconds, so ask again soon
            )
        now = self._clock()
        while use.admitted and use.admitted[0] <= now - WINDOW_S:
            use.admitted.popleft()
        if limits.requests_per_minute is not None and len(use.admitted) >= limits.requests_per_minute:
            wait = max(1, math.ceil(use.admitted[0] + WINDOW_S - now))
            raise _rate_limited(
                f"API key {name!r} made {len(use.admitted)} requests in the last minute, its limit "
                f"(requests_per_minute); retry in {wait} s",
                retry_after_s=wait,
            )
        use.admitted.append(now)
        use.in_flight += 1

    def release(self, name: str) -> None:
        self._uses[name].in_flight -= 1

    def in_flight(self, name: str) -> int:
        use = self._uses.get(name)
        return use.in_flight if use else 0


def _rate_limited(message: str, retry_after_s: int) -> ApiError:
    return ApiError(
        message,
        status_code=429,
        code=RATE_LIMITED,
        error_type="requests",  # OpenAI's type for a request-rate limit
        headers={"Retry-After": str(retry_after_s)},
    )


class ApiKeyGuard:
    """Who may call, and how much: the key ring, each key's limits, and the limiter.
    `record(key_name, outcome)`: metrics (outcome accepted | unauthorized | rate_limited)."""

    def __init__(
        self,
        path: Path,
        defaults: ApiKeyLimits,
        clock: Callable[[], float] = time.monotonic,
        record: Callable[[str, str], None] | None = None,
    ):
        self.ring = KeyRing(path)
        self.defaults = defaults
        self.limiter = KeyLimiter(clock)
        self._record = record or (lambda name, outcome: None)

    def admit(self, authorization: str | None) -> str:
        """The caller's key name, counted in; a 401 or 429 ApiError otherwise. Pair with `release`."""
        token = bearer_token(authorization)
        stored = self.ring.find(token) if token else None
        if stored is None:
            self._record(NO_KEY, "unauthorized")
            message = (
                "invalid API key"
                if token
                else "missing API key: send it in the header `Authorization: Bearer KEY` (keys: `fusionserve keys add`)"
            )
            raise ApiError(message, status_code=401, code=INVALID_API_KEY, headers=UNAUTHORIZED_HEADERS)
        try:
            self.limiter.admit(stored.name, self.limits_of(stored))
        except ApiError:
            self._record(stored.name, "rate_limited")
            raise
        self._record(stored.name, "accepted")
        return stored.name

    def release(self, name: str) -> None:
        self.limiter.release(name)

    def limits_of(self, stored: StoredKey) -> ApiKeyLimits:
        """The key's own limits, the server's defaults where it names none."""
        return ApiKeyLimits(
            requests_per_minute=stored.requests_per_minute or self.defaults.requests_per_minute,
            max_concurrent=stored.max_concurrent or self.defaults.max_concurrent,
        )


class ApiKeyMiddleware:
    """Plain ASGI rather than Starlette's BaseHTTPMiddleware: a request's concurrency slot is
    held until its whole response is sent (a streamed one too), and a client disconnect still
    cancels the handler. `guard()` is read per request: the ingress installs it after the app
    is built (routes.install), and returns None when authentication is off."""

    def __init__(self, app: ASGIApp, guard: Callable[[], ApiKeyGuard | None]):
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard = self.guard() if scope["type"] == "http" else None
        if guard is None or is_open(_route_path(scope)):
            await self.app(scope, receive, send)
            return
        try:
            name = guard.admit(Headers(scope=scope).get("authorization"))
        except ApiError as error:
            await error.response()(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            guard.release(name)


def is_open(path: str) -> bool:
    """Routes that need no key: health, the docs, the playground page and static assets."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _route_path(scope: Scope) -> str:
    """The path without the application's route prefix (Ray Serve mounts it under root_path)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path
