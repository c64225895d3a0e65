"""Stage calls retried when their replica dies.

Why a retry is safe: every stage method the flow calls is a pure function of its arguments.
The prompt optimizer and the text encoder map text to the same tokens and hidden states
(their caches only skip work, bit-exactly), the denoiser draws all its noise from the job's
seeds, and the VAE codec maps latents to the same pixels. Running a call again on another
replica (or the restarted one) therefore returns what the first would have, and the image
after a retry equals the no-fault image of the same seed. What is not idempotent, the
ingress's own bookkeeping (metrics, the step controller's timings, the quality guard's
record), happens in the ingress once the call has returned, so a retry never repeats it.

What is retried: failures that say the replica or its process went away (Ray's actor died /
unavailable, worker crashed, Serve's replica or deployment unavailable), never an error the
stage raised itself (bad input fails again the same way). A retried call waits with a short
back-off (a killed lone replica takes some seconds to come back; with two replicas the
router sends the retry to the live one) and gives up when the request's retry budget (its
deadline, else `RetrySettings.max_wait_s`) is spent: then `StageUnavailableError`, which the
API answers with 503 and `Retry-After`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from serve_app.config import RetrySettings

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


class StageUnavailableError(Exception):
    """A stage's replicas stayed down for longer than the request could wait."""

    def __init__(self, stage: str, retry_after_s: int, cause: BaseException | None = None):
        super().__init__(f"the {stage} stage is restarting after a replica failure; retry in {retry_after_s} s")
        self.stage = stage
        self.retry_after_s = retry_after_s
        self.cause = cause


def _replica_failure_types() -> tuple[type[BaseException], ...]:
    try:
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors
    except ImportError:  # without Ray nothing here can die on its own
        return ()
    return (
        ray_errors.RayActorError,  # ActorDiedError, ActorUnavailableError
        ray_errors.WorkerCrashedError,
        ray_errors.NodeDiedError,
        ray_errors.ObjectLostError,
        serve_errors.ReplicaUnavailableError,
        serve_errors.DeploymentUnavailableError,
    )


REPLICA_FAILURES = _replica_failure_types()


def is_replica_failure(error: BaseException) -> bool:
    return isinstance(error, REPLICA_FAILURES)


# The monotonic time by which the current request's retries must end (set by the pipeline per
# request; a context variable follows the request's task into every stage call it awaits).
retry_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("retry_deadline", default=None)


class RetryBudget:
    """One stage call's back-off and the time left to retry it."""

    def __init__(self, settings: RetrySettings, stage: str):
        self.settings, self.stage = settings, stage
        self.deadline = retry_deadline.get() or (time.monotonic() + settings.max_wait_s)
        self.tries = 0
        self.backoff = settings.first_backoff_s

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    async def wait_or_give_up(self, error: BaseException) -> None:
        """After a replica failure: sleep the back-off, or raise StageUnavailableError when
        no retry is left or the budget would be spent."""
        self.tries += 1
        if self.tries > self.settings.attempts or self.left_s() < self.backoff:
            raise StageUnavailableError(self.stage, max(1, round(self.settings.max_backoff_s * 2)), error) from error
        logger.warning(
            "%s call failed (%s); retry %d after %.2f s", self.stage, type(error).__name__, self.tries, self.backoff
        )
        await asyncio.sleep(self.backoff)
        self.backoff = min(self.backoff * 2, self.settings.max_backoff_s)


async def with_retries(call: Callable[[], Awaitable[T]], settings: RetrySettings, stage: str) -> T:
    """`call()`, again after a replica failure while the budget lasts. A retry may not wait
    past the budget (a lone replica's restart can take longer than the request has)."""
    budget = RetryBudget(settings, stage)
    try:
        return await call()
    except Exception as error:
        if not is_replica_failure(error):
            raise
        failure: BaseException = error
    while True:
        await budget.wait_or_give_up(failure)
        try:
            return await asyncio.wait_for(call(), timeout=max(budget.left_s(), 0.001))
        except TimeoutError as error:
            raise StageUnavailableError(stage, max(1, round(settings.max_backoff_s * 2)), error) from error
        except Exception as error:
            if not is_replica_failure(error):
                raise
            failure = error


class _RetryingMethod:
    def __init__(self, method: Any, settings: RetrySettings, stage: str):
        self._method, self._settings, self._stage = method, settings, stage

    def remote(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return with_retries(lambda: self._method.remote(*args, **kwargs), self._settings, self._stage)


class RetryingHandle:
    """A stage handle whose `.method.remote(...)` calls are retried after replica failures
    (see the module docstring for why each is safe to repeat). `options(...)` and streaming
    calls pass through: the pipeline retries a stream itself (it must skip what was sent)."""

    def __init__(self, handle: Any, settings: RetrySettings, stage: str):
        self._handle, self._settings, self._stage = handle, settings, stage

    def options(self, **kwargs: Any) -> Any:
        return self._handle.options(**kwargs)

    def __getattr__(self, name: str) -> _RetryingMethod:
        return _RetryingMethod(getattr(self._handle, name), self._settings, self._stage)
