"""Overload soak: the served DAG at twice its capacity for minutes, with bad inputs, client
disconnects and edits interleaved; what it answers and what its replicas hold.

Reproduce (the full run is 10 minutes of load, plus set-up):

    .venv/bin/python -m benchmarks.soak [--minutes 10] [--model portrait] [--quick] [--json PATH] \
        [--update-readme README.md]

1. **Capacity**: generations (the model's native size, 10 steps) from 8 closed-loop clients (a
   full denoiser batch) for 20 s: completed requests per second, C.
2. **Soak**: requests arrive open-loop at 2C for `--minutes`: 60% generations, 15% edits
   (multipart, target + mask), 10% streamed generations whose client disconnects after the first
   partial image, 15% bad inputs (the 400 cases of the tests). Every 15 s: each replica's RSS (in
   its own process), the text encoder cache's bytes and the denoiser's jobs (from the replicas).
3. **After**: the denoiser's jobs once the load has stopped (0 = no orphan work).

Targets: every accepted request answered (200, or 400 for a bad input); refusals only 503/429
with Retry-After; RSS growth after warm-up (the first fifth of the run) at most 10%; cache bytes
within the budget throughout; no job left. Every soak prompt is new, so the text encoder's
prefix cache fills (by design, up to its byte budget) and its watchdog rebuilds it when the hit
rate falls; freed blocks stay with the process's allocator, so that replica's RSS growth is
compared with the cache's peak bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from PIL import Image

from benchmarks.readme_table import command_line, publish, results_path

SECTION = "soak"
APP = "fusionserve"
STAGES = ("Ingress", "PromptOptimizer", "TextEncoder", "Denoiser", "VaeCodec")
STEPS = 10
SAMPLE_EVERY_S = 15.0
MIX = (("generation", 0.60), ("edit", 0.15), ("disconnect", 0.10), ("bad", 0.15))
BAD_BODIES = (
    {"prompt": "a man", "n": 0},
    {"prompt": "a man", "size": "100x37"},
    {"prompt": "a man", "num_inference_steps": 100000},
    {"prompt": "a man", "n": "2"},
    {"prompt": "a man", "colour": "blue"},
    {"prompt": "a man", "guidance_scale": 99},
)


@dataclass
class Answer:
    kind: str
    status: int  # 0: no answer (a dropped connection); -1: the client disconnected on purpose
    retry_after: bool


def png(size: int, mode: str = "RGB", colour: tuple[int, ...] = (90, 140, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


class Load:
    """Sends one request of a kind; never raises. Async, one task per request and no cap on
    connections: an open-loop sender must not queue in the client, or the server never sees
    the overload it is meant to refuse."""

    def __init__(self, client: httpx.AsyncClient, side: int):
        self.client, self.side = client, side
        self.target, self.mask = png(side), png(side, "RGBA", (0, 0, 0, 0))

    async def send(self, kind: str, index: int) -> Answer:
        body = {"prompt": f"portrait {index}", "seed": index, "num_inference_steps": STEPS}
        try:
            if kind == "generation":
                size = f"{self.side}x{self.side}"
                response = await self.client.post("/v1/images/generations", json={**body, "size": size})
            elif kind == "edit":
                files = {"image": ("t.png", self.target, "image/png"), "mask": ("m.png", self.mask, "image/png")}
                form = {k: str(v) for k, v in body.items()}
                response = await self.client.post("/v1/images/edits", data=form, files=files)
            elif kind == "bad":
                response = await self.client.post("/v1/images/generations", json=BAD_BODIES[index % len(BAD_BODIES)])
            else:
                return await self.disconnect(body)
        except httpx.HTTPError:
            return Answer(kind, 0, False)
        return Answer(kind, response.status_code, "retry-after" in response.headers)

    async def disconnect(self, body: dict) -> Answer:
        """A streamed request whose client goes away after the first partial image."""
        streamed = {**body, "size": f"{self.side}x{self.side}", "stream": True, "partial_images": 3}
        try:
            async with self.client.stream("POST", "/v1/images/generations", json=streamed) as response:
                if response.status_code != 200:
                    await response.aread()
                    return Answer("disconnect", response.status_code, "retry-after" in response.headers)
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        return Answer("disconnect", -1, False)  # closing the stream here cancels the job
        except httpx.HTTPError:
            pass
        return Answer("disconnect", 0, False)


async def capacity(load: Load, seconds: float, clients: int = 8) -> float:
    """Generations completed per second by `clients` closed-loop clients."""
    done: list[float] = []
    stop = time.perf_counter() + seconds

    async def client_loop(offset: int) -> None:
        index = offset
        while time.perf_counter() < stop:
            if (await load.send("generation", 10_000 + index)).status == 200:
                done.append(time.perf_counter())
            index += clients

    start = time.perf_counter()
    await asyncio.gather(*(client_loop(offset) for offset in range(clients)))
    return len(done) / (time.perf_counter() - start)


def _rss(_replica: object) -> int:
    import psutil

    return psutil.Process().memory_info().rss


def sample(handles: dict) -> dict:
    from serve_app.ops.replicas import call_in_replicas

    rss = {stage: call_in_replicas(APP, stage, _rss) for stage in STAGES}
    cache = handles["TextEncoder"].cache_info.remote().result(timeout_s=30)
    load = handles["Denoiser"].load.remote().result(timeout_s=30)
    return {
        "t": time.perf_counter(),
        "rss": rss,
        "cache_bytes": cache["bytes_in_use"],
        "cache_budget_bytes": cache["max_bytes"],
        "jobs": load.waiting_jobs + load.active_jobs,
    }


async def soak(
    load: Load, rate: float, seconds: float, handles: dict, rng: random.Random
) -> tuple[list[Answer], list[dict]]:
    """Open loop: request i leaves at start + i / rate whatever the answers so far."""
    samples: list[dict] = [await asyncio.to_thread(sample, handles)]  # handles block: not on the loop
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(SAMPLE_EVERY_S):
            samples.append(sample(handles))

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    kinds, weights = zip(*MIX)
    tasks, start, index = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        tasks.append(asyncio.create_task(load.send(rng.choices(kinds, weights)[0], index)))
        index += 1
        await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
    answers = list(await asyncio.gather(*tasks))
    stop.set()
    watcher.join()
    return answers, samples


def jobs_left(handles: dict, timeout_s: float = 60.0) -> int:
    """The denoiser's jobs after the load stopped, once they had `timeout_s` to finish."""
    deadline = time.perf_counter() + timeout_s
    while True:
        load = handles["Denoiser"].load.remote().result(timeout_s=30)
        jobs = load.waiting_jobs + load.active_jobs
        if jobs == 0 or time.perf_counter() > deadline:
            return jobs
        time.sleep(1)


def summarize(answers: list[Answer], samples: list[dict], budget: int) -> dict:
    by = Counter()
    for answer in answers:
        if answer.status == 200 or (answer.kind == "disconnect" and answer.status == -1):
            by["answered"] += 1
        elif answer.kind == "bad" and answer.status == 400:
            by["bad_input_400"] += 1
        elif answer.status in (429, 503) and answer.retry_after:
            by["refused_with_retry_after"] += 1
        else:
            by["other"] += 1
    warm_index = max(1, len(samples) // 5)  # the end of the first fifth
    warm, end = samples[warm_index], samples[-1]
    rss = {}
    for stage in STAGES:
        before, after = sum(warm["rss"][stage]), sum(end["rss"][stage])
        rss[stage] = {
            "warm_mib": round(before / 2**20, 1),
            "end_mib": round(after / 2**20, 1),
            "growth": round(after / before - 1, 4),
        }
    # The encoder's freed cache blocks stay with its allocator: its RSS is compared net of the
    # cache's high-water mark so far (bounded by the budget, a target of its own).
    peak_at_warm = max(s["cache_bytes"] for s in samples[: warm_index + 1])
    peak_at_end = max(s["cache_bytes"] for s in samples)
    encoder = rss["TextEncoder"]
    net_warm = encoder["warm_mib"] - peak_at_warm / 2**20
    net_end = encoder["end_mib"] - peak_at_end / 2**20
    encoder["growth_net_of_cache_peak"] = round(net_end / net_warm - 1, 4)
    return {
        "sent": len(answers),
        "by_kind": dict(Counter(a.kind for a in answers)),
        "outcomes": {key: by.get(key, 0) for key in ("answered", "bad_input_400", "refused_with_retry_after", "other")},
        "statuses": dict(Counter(str(a.status) for a in answers)),
        "rss": rss,
        "max_rss_growth": max(stage["growth"] for stage in rss.values()),
        "max_rss_growth_net_of_cache_peak": max(
            stage.get("growth_net_of_cache_peak", stage["growth"]) for stage in rss.values()
        ),
        "cache_bytes_max": max(s["cache_bytes"] for s in samples),
        "cache_budget_bytes": budget,
        "samples": len(samples),
    }


async def load_phases(options: argparse.Namespace, side: int, handles: dict) -> tuple[float, list[Answer], list[dict]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # no cap: see Load
    base_url = f"http://127.0.0.1:{options.port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        load = Load(client, side)
        rate = await capacity(load, options.capacity_seconds)
        print(f"capacity {rate:.2f} requests/s; soaking at {2 * rate:.2f}/s for {options.minutes} min", flush=True)
        answers, samples = await soak(load, 2 * rate, 60 * options.minutes, handles, random.Random(0))
    return rate, answers, samples


def run(options: argparse.Namespace) -> dict:
    from ray import serve

    from benchmarks.serving_overhead import check_port_free, deploy_dag, start_ray, stop_ray
    from deployments.models import loading
    from serve_app.ops.cli import load_serve_config, split_app_config

    serve_config = load_serve_config("serve_config.yaml")
    settings, deployment_options, _ = split_app_config(serve_config, options.model)
    side = loading.native_size(loading.resolve_model(options.model))
    check_port_free(options.port)
    start_ray(2, options.port, serve_config)
    try:
        deploy_dag(settings, deployment_options)
        handles = {name: serve.get_deployment_handle(name, APP) for name in ("TextEncoder", "Denoiser")}
        rate, answers, samples = asyncio.run(load_phases(options, side, handles))
        left = jobs_left(handles)
    finally:
        stop_ray()
    budget = int(samples[0]["cache_budget_bytes"])
    return {
        "model": options.model,
        "size": f"{side}x{side}",
        "capacity_rps": round(rate, 3),
        "offered_rps": round(2 * rate, 3),
        "minutes": options.minutes,
        **summarize(answers, samples, budget),
        "jobs_left_after_load": left,
    }


def table(results: dict) -> str:
    outcomes, setup = results["outcomes"], results["setup"]
    growth = ", ".join(
        f"{stage} {100 * r['growth']:+.1f}% ({r['end_mib'] - r['warm_mib']:+.0f} MiB)"
        for stage, r in results["rss"].items()
    )
    lines = [
        "| offered | sent | answered | bad input → 400 | refused 503/429 + Retry-After | other "
        "| max RSS growth after warm-up (net of the cache's peak) | cache bytes max / budget | jobs left |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {results['offered_rps']}/s (2 x {results['capacity_rps']}/s) for {results['minutes']} min | "
        f"{results['sent']} | {outcomes['answered']} | {outcomes['bad_input_400']} | "
        f"{outcomes['refused_with_retry_after']} | {outcomes['other']} | {100 * results['max_rss_growth']:+.1f}% "
        f"({100 * results['max_rss_growth_net_of_cache_peak']:+.1f}%) | "
        f"{results['cache_bytes_max'] / 2**20:.1f} / {results['cache_budget_bytes'] / 2**20:.0f} MiB | "
        f"{results['jobs_left_after_load']} |",
        "",
        f"<sub>`{setup['command']}`, {setup['machine']}, {setup['date']}; {results['model']} model at "
        f"{results['size']}, {STEPS} steps; RSS per stage: {growth}.</sub>",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default="portrait")
    parser.add_argument("--capacity-seconds", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--quick", action="store_true", help="1 minute of load, 8 s of capacity")
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]soak.json)")
    parser.add_argument("--update-readme", metavar="README", help="rewrite the README's soak table")
    options = parser.parse_args(argv)
    if options.quick:
        options.minutes, options.capacity_seconds = 1.0, 8.0
    started = time.perf_counter()
    results = run(options)
    results["setup"] = {
        "command": command_line("benchmarks.soak"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps({k: v for k, v in results.items() if k != "rss"}, indent=1), flush=True)
    publish(results, results_path(SECTION, options.quick, options.json), table(results), options.update_readme, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
