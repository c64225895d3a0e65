"""Chaos: one replica of each stage SIGKILLed under a bounded mixed load, with 2 replicas of the
killed stage and with 1.

Reproduce (about four minutes on the 2-core development machine):

    .venv/bin/python -m benchmarks.chaos [--quick] [--json PATH] [--update-readme README.md]

An application of the model (`chaos`; `--model`, default portrait at its native 128x128) runs
with N replicas of every stage. For each stage
in turn (Denoiser, TextEncoder, VaeCodec, PromptOptimizer) a stream of mixed requests —
generations, edits (target + mask, multipart) and streamed generations, one every 0.3 s from 6
clients — runs while one replica of that stage is SIGKILLed after a quarter of them were sent.
Counted per stage and N: requests sent, answered 200 (a stream: its completed event), refused
with 503/504 and Retry-After, anything else (a 500, a dropped connection, a 503 without
Retry-After); the slowest answer; the seconds from the kill until Serve runs N replicas again
without the killed one. Targets: with 2 replicas, every request 200; with 1, only 200 or
503/504 with Retry-After, each within the request timeout plus 30 s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import io
import json
import os
import platform
import signal
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import httpx
from PIL import Image

from benchmarks.readme_table import command_line, publish, results_path

SECTION = "chaos"
APP = "chaos"
ROUTE = "/chaos"
STAGES = ("Denoiser", "TextEncoder", "VaeCodec", "PromptOptimizer")
KINDS = ("generation", "edit", "stream")
CLIENTS = 6
SPACING_S = 0.3
ANSWER_BOUND_S = 30.0  # beyond limits.request_timeout_s: how late an answer may come


@dataclass
class Outcome:
    kind: str
    status: int  # HTTP status; a stream: 200 once its completed event arrived, else its error's
    retry_after: bool
    seconds: float
    error: str = ""

    @property
    def refused_properly(self) -> bool:
        return self.status in (503, 504) and self.retry_after


def deploy(settings, replicas: int) -> None:
    """The chaos app: `replicas` of every stage (tiny CPU shares: several apps share 2 cores)."""
    from ray import serve

    from serve_app.app import build_application

    options = {name: {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0.01}} for name in STAGES}
    options["Ingress"] = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.01}}
    serve.run(build_application(settings, options), name=APP, route_prefix=ROUTE)


def wait_healthy(url: str, timeout_s: float = 180.0) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url} did not become healthy in {timeout_s:g} s")
        time.sleep(0.5)


def _png(size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def edit_files(side: int) -> dict[str, tuple[str, bytes, str]]:
    """A target and an all-transparent mask (the whole target may change) of the model's size."""
    target = _png((side, side), (40, 120, 200))
    mask = _png((side, side), (0, 0, 0, 0), "RGBA")
    return {"image": ("target.png", target, "image/png"), "mask": ("mask.png", mask, "image/png")}


def send(client: httpx.Client, kind: str, index: int, side: int = 64) -> Outcome:
    """One request of `kind` at side x side; never raises (a dropped connection is an outcome too)."""
    fields = {"prompt": f"portrait {kind} {index}", "seed": 500 + index, "num_inference_steps": 12}
    size = f"{side}x{side}"
    start = time.perf_counter()
    try:
        if kind == "edit":
            form = {key: str(value) for key, value in fields.items()}
            files = edit_files(side)
            response = client.post("/v1/images/edits", data=form, files=files)
            return _outcome(kind, response.status_code, "retry-after" in response.headers, start, response.text)
        if kind == "generation":
            response = client.post("/v1/images/generations", json={**fields, "size": size})
            return _outcome(kind, response.status_code, "retry-after" in response.headers, start, response.text)
        body = {**fields, "size": size, "stream": True, "partial_images": 2}
        with client.stream("POST", "/v1/images/generations", json=body) as response:
            if response.status_code != 200:
                response.read()
                return _outcome(kind, response.status_code, "retry-after" in response.headers, start, response.text)
            return _stream_outcome(response, start)
    except httpx.HTTPError as error:
        return Outcome(kind, 0, False, time.perf_counter() - start, f"{type(error).__name__}: {error}")


def _outcome(kind: str, status: int, retry_after: bool, start: float, text: str) -> Outcome:
    return Outcome(kind, status, retry_after, time.perf_counter() - start, "" if status == 200 else text[:300])


def _stream_outcome(response: httpx.Response, start: float) -> Outcome:
    """200 once the completed event came; an error event counts as its error's status (a 503
    stage_unavailable carries its retry contract in the event, the status line being sent)."""
    name = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: ") and name == "error":
            error = json.loads(line.removeprefix("data: "))["error"]
            status = {"stage_unavailable": 503, "timeout": 504}.get(error.get("code"), 500)
            return Outcome("stream", status, status != 500, time.perf_counter() - start, error["message"][:300])
        elif name.endswith(".completed"):
            return Outcome("stream", 200, False, time.perf_counter() - start)
    return Outcome("stream", 0, False, time.perf_counter() - start, "the stream ended without a completed event")


def replica_pids(stage: str) -> list[int]:
    from serve_app.ops.replicas import replica_pids as pids_of

    return pids_of(APP, stage)


def wait_recovered(stage: str, replicas: int, killed: int, timeout_s: float = 120.0) -> float:
    """Seconds until `replicas` replicas of `stage` answer again, the killed one not among them."""
    start = time.perf_counter()
    while True:
        pids = replica_pids(stage)
        if len(pids) >= replicas and killed not in pids:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError(f"{stage}: {replicas} replicas not back within {timeout_s:g} s (now {pids})")
        time.sleep(0.25)


def scenario(url: str, stage: str, replicas: int, requests: int, request_timeout_s: float, side: int = 64) -> dict:
    """`requests` mixed requests, one replica of `stage` SIGKILLed after a quarter were sent."""
    timeout = httpx.Timeout(request_timeout_s + ANSWER_BOUND_S)
    kill_at = max(1, requests // 4)
    with (
        httpx.Client(base_url=url, timeout=timeout) as client,
        concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool,
        concurrent.futures.ThreadPoolExecutor(1) as watcher,
    ):
        futures, recovery = [], None
        for index in range(requests):
            futures.append(pool.submit(send, client, KINDS[index % len(KINDS)], index, side))
            if index + 1 == kill_at:
                killed = replica_pids(stage)[0]
                os.kill(killed, signal.SIGKILL)
                recovery = watcher.submit(wait_recovered, stage, replicas, killed)  # timed from the kill
            time.sleep(SPACING_S)
        outcomes = [future.result() for future in futures]
        assert recovery is not None
        recover_s = recovery.result()
    others = [o for o in outcomes if o.status != 200 and not o.refused_properly]
    return {
        "stage": stage,
        "replicas": replicas,
        "sent": len(outcomes),
        "ok": sum(o.status == 200 for o in outcomes),
        "refused_with_retry_after": sum(o.refused_properly for o in outcomes),
        "other": len(others),
        "other_examples": [asdict(o) for o in others[:3]],
        "slowest_answer_s": round(max(o.seconds for o in outcomes), 2),
        "answer_bound_s": request_timeout_s + ANSWER_BOUND_S,
        "recover_s": round(recover_s, 1),
        "by_kind": {kind: sum(o.kind == kind and o.status == 200 for o in outcomes) for kind in KINDS},
    }


def run(options: argparse.Namespace) -> dict:
    from benchmarks.serving_overhead import check_port_free, start_ray, stop_ray
    from deployments.models import loading
    from serve_app.ops.cli import load_serve_config, split_app_config
    from serve_app.ops.replicas import replica_deaths

    serve_config = load_serve_config("serve_config.yaml")
    settings, _, _ = split_app_config(serve_config, options.model)
    side = loading.native_size(loading.resolve_model(options.model))
    url = f"http://127.0.0.1:{options.port}{ROUTE}"
    check_port_free(options.port)
    start_ray(2, options.port, serve_config)
    scenarios = []
    try:
        for replicas in (2, 1):
            deploy(settings, replicas)
            wait_healthy(url)
            for stage in STAGES:
                result = scenario(url, stage, replicas, options.requests, settings.limits.request_timeout_s, side)
                print(json.dumps(result), flush=True)
                scenarios.append(result)
        restarts = replica_deaths(APP)
    finally:
        stop_ray()
    size = f"{side}x{side}"
    return {"model": options.model, "size": size, "scenarios": scenarios, "restarts_seen_by_status": restarts}


def table(results: dict) -> str:
    lines = [
        "| killed stage | replicas | sent | 200 | 503/504 + Retry-After | other | slowest answer "
        "| back to N replicas |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in results["scenarios"]:
        lines.append(
            f"| {s['stage']} | {s['replicas']} | {s['sent']} | {s['ok']} | {s['refused_with_retry_after']} | "
            f"{s['other']} | {s['slowest_answer_s']} s | {s['recover_s']} s |"
        )
    setup = results["setup"]
    restarts = ", ".join(f"{stage} {count}" for stage, count in sorted(results["restarts_seen_by_status"].items()))
    lines += [
        "",
        f"<sub>`{setup['command']}`, {setup['machine']}, {setup['date']}; {results['model']} model at "
        f"{results['size']}, 12 steps; mixed generations, edits and streamed generations from {CLIENTS} clients, one "
        f"every {SPACING_S} s; `fusionserve status` counted restarts: {restarts}.</sub>",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24, help="requests per scenario")
    parser.add_argument("--model", default="portrait", help="the model served (default: portrait, as shipped)")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--quick", action="store_true", help="8 requests per scenario")
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]chaos.json)")
    parser.add_argument("--update-readme", metavar="README", help="rewrite the README's chaos table")
    options = parser.parse_args(argv)
    if options.quick:
        options.requests = 8
    started = time.perf_counter()
    results = run(options)
    results["setup"] = {
        "command": command_line("benchmarks.chaos"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    publish(results, results_path(SECTION, options.quick, options.json), table(results), options.update_readme, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
