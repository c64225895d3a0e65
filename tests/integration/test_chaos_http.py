"""Chaos with two replicas per stage: an application of the tiny model (`chaos`, beside the
session's app) with 2 replicas of every stage serves a mixed load — generations, multipart
edits, streamed generations — while one replica of each stage in turn is SIGKILLed. The requests
on the dead replica are retried on the live one: every request is answered 200 (a stream with its
completed event), Serve brings the stage back to 2 replicas, and `fusionserve status` counts the
restarts. (One replica per stage: tests/integration/test_faults_http.py; both, with numbers:
benchmarks/chaos.py.)"""

from __future__ import annotations

import pytest

from benchmarks import chaos

pytestmark = pytest.mark.slow
REQUESTS = 9  # three of each kind per stage


@pytest.fixture(scope="module")
def chaos_url(base_url, serve_settings):
    from ray import serve

    chaos.deploy(serve_settings[0], replicas=2)
    url = f"{base_url}{chaos.ROUTE}"
    chaos.wait_healthy(url)
    try:
        yield url
    finally:
        serve.delete(chaos.APP)


def test_with_two_replicas_a_killed_one_costs_no_request_and_status_counts_the_restarts(chaos_url, serve_settings):
    from serve_app.ops import status

    timeout_s = serve_settings[0].limits.request_timeout_s
    for stage in chaos.STAGES:
        result = chaos.scenario(chaos_url, stage, 2, REQUESTS, timeout_s)
        assert result["ok"] == result["sent"] == REQUESTS, result
        assert result["by_kind"] == {"generation": 3, "edit": 3, "stream": 3}, result
        assert len(chaos.replica_pids(stage)) == 2  # back to two
    report = status.collect(chaos.APP)
    assert {stage: report["stages"][stage]["restarts"] for stage in chaos.STAGES} == dict.fromkeys(chaos.STAGES, 1)
    assert "restarts" in status.render(report)
