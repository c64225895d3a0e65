"""Faults without Ray: a call whose replica died is repeated and returns what the first would
have; a stage error is never retried; a budget spent becomes a 503 with Retry-After; a streamed
denoising whose replica died starts again without sending a preview twice, and ends with the
no-fault image; a request past `limits.request_timeout_s` gets 504 (a stream: an error event)
and its work is cancelled."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError, ActorUnavailableError

from serve_app.config import AppSettings, RetrySettings
from serve_app.flow.pipeline import DenoiseStarted, PartialImages, local_pipeline_for
from serve_app.flow.retry import RetryingHandle, StageUnavailableError, retry_deadline, with_retries
from serve_app.http import routes
from tests.conftest import run
from tests.unit.test_http_schemas import StandInPipeline
from tests.unit.test_openai_fields import sse_events
from tests.unit.test_streaming import request

FAST = RetrySettings(attempts=3, first_backoff_s=0.01, max_backoff_s=0.02, max_wait_s=5.0)


class Flaky:
    """Fails with `errors` in turn, then answers `value`; counts the calls."""

    def __init__(self, errors: list[Exception], value: str = "ok"):
        self.errors, self.value, self.calls = list(errors), value, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


def test_a_call_whose_replica_died_is_retried_until_it_answers():
    call = Flaky([ActorDiedError(), ActorUnavailableError("gone", None)])
    assert run(with_retries(call, FAST, "Denoiser")) == "ok"
    assert call.calls == 3


def test_an_error_the_stage_raised_is_not_retried():
    call = Flaky([ValueError("bad job")])
    with pytest.raises(ValueError, match="bad job"):
        run(with_retries(call, FAST, "Denoiser"))
    assert call.calls == 1


def test_retries_end_when_the_attempts_or_the_deadline_are_spent():
    call = Flaky([ActorDiedError()] * 10)
    with pytest.raises(StageUnavailableError) as caught:
        run(with_retries(call, FAST, "VaeCodec"))
    assert call.calls == 1 + FAST.attempts and caught.value.stage == "VaeCodec" and caught.value.retry_after_s >= 1

    async def past_deadline():
        retry_deadline.set(time.monotonic() + 0.005)  # less than one back-off left
        return await with_retries(Flaky([ActorDiedError()] * 10), RetrySettings(first_backoff_s=0.5), "TextEncoder")

    started = time.monotonic()
    with pytest.raises(StageUnavailableError):
        run(past_deadline())
    assert time.monotonic() - started < 0.5  # it did not sleep a back-off it had no time for


def test_a_retried_handle_wraps_every_method():
    class Stage:
        def __init__(self):
            self.encode = type("M", (), {"remote": staticmethod(Flaky([ActorDiedError()], "hidden"))})()

    handle = RetryingHandle(Stage(), FAST, "TextEncoder")
    assert run(handle.encode.remote()) == "hidden"


def test_a_stage_that_stays_down_answers_503_with_retry_after(monkeypatch):
    class DownPipeline(StandInPipeline):
        async def generate(self, request):
            raise StageUnavailableError("Denoiser", 4)

    monkeypatch.setattr(routes, "_serving", routes.ServingState())
    routes.install(DownPipeline(), AppSettings(default_size="64x64"), "stand-in")  # type: ignore[arg-type]
    response = TestClient(routes.app).post("/v1/images/generations", json={"prompt": "a man"})
    assert response.status_code == 503 and response.headers["retry-after"] == "4"
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("stage_unavailable", "server_error")
    assert "restarting" in error["message"]


class DyingOnce:
    """A denoiser handle whose first stream dies after its second update (as a killed replica's
    does); later streams run normally."""

    def __init__(self, local):
        self.local, self.streams = local, 0

    def options(self, **_):
        return self

    @property
    def denoise_stream(self):
        outer = self

        class Call:
            @staticmethod
            def remote(job):
                outer.streams += 1
                return Dying(outer.local.denoise_stream.remote(job), die_after=2 if outer.streams == 1 else None)

        return Call()

    def __getattr__(self, name):
        return getattr(self.local, name)


class Dying:
    def __init__(self, updates, die_after):
        self.updates, self.die_after, self.seen = updates, die_after, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.die_after is not None and self.seen == self.die_after:
            self.updates.cancel()
            raise ActorDiedError()
        self.seen += 1
        return await self.updates.__aiter__().__anext__()

    def cancel(self):
        self.updates.cancel()


def test_a_stream_whose_replica_died_restarts_and_sends_each_preview_once(tiny_model_path):
    pipe = local_pipeline_for(tiny_model_path)
    pipe.retry = FAST
    pipe.denoiser = DyingOnce(pipe.denoiser)

    async def events():
        return [event async for event in pipe.generate_stream(request(), 3)]

    got = run(events())
    previews = [event for event in got if isinstance(event, PartialImages)]
    assert pipe.denoiser.streams == 2
    assert [p.steps_done for p in previews] == [2, 4, 6] and [p.index for p in previews] == [0, 1, 2]
    # the no-fault image of the same request, from the same engines (generate() does not stream: it never dies)
    assert got[-1].images_png == run(pipe.generate(request())).images_png


class SlowPipeline(StandInPipeline):
    """Starts, then takes far longer than the test's request timeout; notes its cancellation."""

    cancelled = 0

    async def generate(self, request):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            SlowPipeline.cancelled += 1
            raise
        return await super().generate(request)

    async def generate_stream(self, request, partial_images=0):
        result = await StandInPipeline.generate(self, request)
        yield DenoiseStarted(result.steps)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            SlowPipeline.cancelled += 1
            raise
        yield result


def test_a_request_past_its_timeout_gets_504_and_its_work_is_cancelled(monkeypatch):
    from serve_app.config import Limits

    monkeypatch.setattr(routes, "_serving", routes.ServingState())
    settings = AppSettings(default_size="64x64", limits=Limits(request_timeout_s=0.3))
    routes.install(SlowPipeline(), settings, "stand-in")  # type: ignore[arg-type]
    client = TestClient(routes.app)
    SlowPipeline.cancelled = 0
    response = client.post("/v1/images/generations", json={"prompt": "a man"})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout" and "request_timeout_s (0.3 s)" in response.text
    streamed = client.post("/v1/images/generations", json={"prompt": "a man", "stream": True, "partial_images": 1})
    assert streamed.status_code == 200  # the stream had begun: the timeout is its last event
    name, data = sse_events(streamed)[-1]
    assert name == "error" and data["error"]["code"] == "timeout"
    assert SlowPipeline.cancelled == 2
