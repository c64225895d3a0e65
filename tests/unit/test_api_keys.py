"""API keys without Ray: the key file and `fusionserve keys add|list|revoke`, the 401 and 429
answers, a revoked key refused by a running app, /healthz open, per-key limits."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve_app.config import ApiKeyLimits, AppSettings
from serve_app.http import routes
from serve_app.http.api_keys import KeyFileError, add_key, hash_key, read_keys, revoke_key
from serve_app.http.auth import ApiKeyGuard, KeyLimiter, bearer_token
from serve_app.http.errors import ApiError
from serve_app.ops import cli
from tests.unit.test_http_schemas import StandInPipeline

BODY = {"prompt": "a man", "size": "64x64", "seed": 1}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keys_add(capsys, path: Path, *extra: str) -> str:
    """`fusionserve keys add`; the key: the last word of the last line printed."""
    assert cli.main(["keys", "add", "--file", str(path), *extra]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1].split()[-1]


def serve(monkeypatch, path: Path, **limits) -> TestClient:
    settings = AppSettings(api_keys_file=str(path), api_key_limits=ApiKeyLimits(**limits))
    monkeypatch.setattr(routes, "_serving", routes.ServingState())
    routes.install(StandInPipeline(), settings, "stand-in")  # type: ignore[arg-type]
    return TestClient(routes.app)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_unauthorized(response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.headers["www-authenticate"] == "Bearer"


# --------------------------------------------------------------------------- the key file and the CLI


def test_add_list_revoke_round_trip(tmp_path, capsys):
    path = tmp_path / "keys.json"
    alice = keys_add(capsys, path, "--name", "alice", "--requests-per-minute", "10")
    second = keys_add(capsys, path)
    assert alice != second and alice.startswith("fs-") and len(alice) > 40
    text = path.read_text()
    assert alice not in text and second not in text  # only hashes are stored
    stored = read_keys(path)
    assert [(key.name, key.sha256, key.requests_per_minute) for key in stored.keys] == [
        ("alice", hash_key(alice), 10),
        ("key-2", hash_key(second), None),
    ]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    assert cli.main(["keys", "list", "--file", str(path)]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "key-2" in listing
    assert alice not in listing and hash_key(alice) not in listing
    assert cli.main(["keys", "list", "--file", str(path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in listed] == ["alice", "key-2"] and "sha256" not in listed[0]

    assert cli.main(["keys", "revoke", "--file", str(path), "alice"]) == 0
    assert [key.name for key in read_keys(path).keys] == ["key-2"]


def test_key_file_mistakes_are_clear(tmp_path, capsys):
    path = tmp_path / "keys.json"
    add_key(path, "alice")
    with pytest.raises(KeyFileError, match="a key named 'alice' exists"):
        add_key(path, "alice")
    with pytest.raises(KeyFileError, match="no key named 'bob'.*keys: alice"):
        revoke_key(path, "bob")
    with pytest.raises(KeyFileError, match="name"):
        add_key(path, "no spaces")
    with pytest.raises(KeyFileError, match="does not exist"):
        read_keys(tmp_path / "missing.json")
    assert cli.main(["keys", "revoke", "--file", str(path), "bob"]) == 2
    assert "no key named 'bob'" in capsys.readouterr().err
    assert cli.main(["keys", "add", "--file", str(path), "--max-concurrent", "0"]) == 2
    assert "max_concurrent" in capsys.readouterr().err
    assert [key.name for key in read_keys(path).keys] == ["alice"]  # nothing half-added


def test_serve_reads_the_key_file_before_ray_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    add_key(tmp_path / "keys.json", "alice")
    settings = cli._with_api_keys(AppSettings(), "keys.json")
    assert settings.api_keys_file == str(tmp_path / "keys.json")  # absolute: replicas have their own cwd
    assert cli._with_api_keys(AppSettings(api_keys_file="keys.json"), None).api_keys_file == str(tmp_path / "keys.json")
    assert cli._with_api_keys(AppSettings(), None).api_keys_file is None  # off by default
    with pytest.raises(cli.CliError, match="does not exist"):
        cli._with_api_keys(AppSettings(), "other.json")


# --------------------------------------------------------------------------- the served app


def test_requests_need_a_valid_key(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    _, key = add_key(path, "alice")
    client = serve(monkeypatch, path)
    missing = client.post("/v1/images/generations", json=BODY)
    assert_unauthorized(missing)
    assert "Authorization: Bearer KEY" in missing.json()["error"]["message"]
    assert_unauthorized(client.post("/v1/images/generations", json=BODY, headers=bearer(key + "x")))
    assert_unauthorized(client.post("/v1/images/generations", json=BODY, headers={"Authorization": f"Basic {key}"}))
    assert_unauthorized(client.get("/v1/models"))
    assert key not in client.post("/v1/images/generations", json=BODY, headers=bearer(key[:-1])).text
    assert client.post("/v1/images/generations", json=BODY, headers=bearer(key)).status_code == 200
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200


def test_healthz_and_docs_stay_open(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    add_key(path, "alice")
    client = serve(monkeypatch, path)
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    # the playground page and the static assets: the page asks for the key, then sends it
    page = client.get("/")
    assert page.status_code == 200 and '"api_keys":true' in page.text
    assert client.get("/playground/playground.js").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert_unauthorized(client.post("/v1/prompts/optimize", json={"prompt": "a man"}))


def test_no_key_file_means_no_authentication(monkeypatch):
    monkeypatch.setattr(routes, "_serving", routes.ServingState())
    routes.install(StandInPipeline(), AppSettings(), "stand-in")  # type: ignore[arg-type]
    assert TestClient(routes.app).post("/v1/images/generations", json=BODY).status_code == 200


def test_a_revoked_key_is_refused_without_a_restart(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    _, alice = add_key(path, "alice")
    client = serve(monkeypatch, path)
    assert client.post("/v1/images/generations", json=BODY, headers=bearer(alice)).status_code == 200
    _, bob = add_key(path, "bob")  # added while serving: accepted at once
    assert client.post("/v1/images/generations", json=BODY, headers=bearer(bob)).status_code == 200
    revoke_key(path, "alice")
    assert_unauthorized(client.post("/v1/images/generations", json=BODY, headers=bearer(alice)))
    assert client.post("/v1/images/generations", json=BODY, headers=bearer(bob)).status_code == 200


def test_a_deleted_key_file_accepts_no_key_and_a_broken_one_keeps_the_last(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    _, key = add_key(path, "alice")
    client = serve(monkeypatch, path)
    text = path.read_text()
    path.write_text("{not json")
    assert client.post("/v1/images/generations", json=BODY, headers=bearer(key)).status_code == 200
    path.unlink()
    assert_unauthorized(client.post("/v1/images/generations", json=BODY, headers=bearer(key)))
    path.write_text(text)
    assert client.post("/v1/images/generations", json=BODY, headers=bearer(key)).status_code == 200


def test_a_missing_key_file_stops_the_ingress_from_starting(tmp_path, monkeypatch):
    with pytest.raises(KeyFileError, match="does not exist"):
        serve(monkeypatch, tmp_path / "missing.json")


def test_over_requests_per_minute_is_a_429_with_retry_after(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    _, alice = add_key(path, "alice")
    _, bob = add_key(path, "bob", requests_per_minute=5)  # its own limit over the server's
    client = serve(monkeypatch, path, requests_per_minute=2)
    answers = [client.post("/v1/images/generations", json=BODY, headers=bearer(alice)) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    refused = answers[-1]
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert "requests_per_minute" in error["message"] and alice not in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    bob_answers = [client.post("/v1/images/generations", json=BODY, headers=bearer(bob)).status_code for _ in range(6)]
    assert bob_answers == [200] * 5 + [429]  # each key counts alone
    assert client.get("/healthz").status_code == 200


def test_concurrency_slots_are_released_after_each_answer(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    _, key = add_key(path, "alice")
    client = serve(monkeypatch, path, max_concurrent=1, requests_per_minute=None)
    statuses = [
        client.post("/v1/images/generations", json=body, headers=bearer(key)).status_code
        for body in (
            BODY,
            {**BODY, "n": 0},
            BODY,
            {**BODY, "stream": True},
            {**BODY, "background": "transparent"},
            BODY,
        )
    ]
    assert statuses == [200, 400, 200, 200, 400, 200]  # refused and streamed requests give their slot back too
    assert routes._serving.auth is not None and routes._serving.auth.limiter.in_flight("alice") == 0


# --------------------------------------------------------------------------- the limiter and the guard


def test_requests_per_minute_is_a_sliding_window():
    clock = FakeClock()
    limiter = KeyLimiter(clock)
    limits = ApiKeyLimits(requests_per_minute=2, max_concurrent=None)
    limiter.admit("alice", limits)
    clock.now += 20
    limiter.admit("alice", limits)
    clock.now += 10
    with pytest.raises(ApiError) as refused:
        limiter.admit("alice", limits)
    assert (refused.value.status_code, refused.value.headers["Retry-After"]) == (429, "30")  # the first leaves at 60 s
    clock.now += 30
    limiter.admit("alice", limits)


def test_max_concurrent_counts_requests_in_flight():
    limiter = KeyLimiter(FakeClock())
    limits = ApiKeyLimits(requests_per_minute=None, max_concurrent=2)
    limiter.admit("alice", limits)
    limiter.admit("alice", limits)
    with pytest.raises(ApiError) as refused:
        limiter.admit("alice", limits)
    assert (refused.value.status_code, refused.value.code) == (429, "rate_limit_exceeded")
    assert "max_concurrent" in refused.value.message and refused.value.headers["Retry-After"] == "1"
    limiter.admit("bob", limits)  # another key has its own slots
    limiter.release("alice")
    limiter.admit("alice", limits)


def test_metrics_name_the_key_never_the_key_itself(tmp_path):
    path = tmp_path / "keys.json"
    _, key = add_key(path, "alice")
    recorded: list[tuple[str, str]] = []
    guard = ApiKeyGuard(path, ApiKeyLimits(requests_per_minute=1), FakeClock(), record=lambda *r: recorded.append(r))
    assert guard.admit(f"Bearer {key}") == "alice"
    guard.release("alice")
    for authorization in (f"Bearer {key}", f"Bearer {key}0", None):
        with pytest.raises(ApiError):
            guard.admit(authorization)
    assert recorded == [("alice", "accepted"), ("alice", "rate_limited"), ("-", "unauthorized"), ("-", "unauthorized")]


@pytest.mark.parametrize(
    "header,token",
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None), (None, None), ("", None)],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token
