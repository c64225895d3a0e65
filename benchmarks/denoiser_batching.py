"""Denoiser scheduling policies, the same requests through each, in one run.

- single: one request at a time (Ray Serve's Stable Diffusion example);
- request_batch: requests that arrived while the UNet was busy form a batch that runs
  until its slowest member ends (what `@serve.batch` gives);
- step_batch: step-level continuous batching (requests join and leave between steps).

All three are the same `DenoiserEngine` with a different `DenoiserSettings`, in this
process (no Ray, no HTTP: the policy is what is measured). `--concurrency` closed-loop
clients each send their next request when the last one returns; requests have fixed
seeds and step counts drawn from 15-30 (the step controller's range), the same list for
every mode. Reported: requests/s, p50/p95 latency, and the ratio to `single`.

    .venv/bin/python -m benchmarks.denoiser_batching                 # ~6 min
    .venv/bin/python -m benchmarks.denoiser_batching --quick         # < 2 min
    .venv/bin/python -m benchmarks.denoiser_batching --update-readme README.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.readme_table import command_line, publish, results_path
from benchmarks.stats import percentile

SECTION = "denoiser_batching"
MODES = {
    "single": {"max_batch_size": 1},
    "request_batch": {"max_batch_size": 8, "admit_between_steps": False},
    "step_batch": {"max_batch_size": 8, "admit_between_steps": True},
}


def make_jobs(count: int, size: int, hidden: int, seed: int):
    import torch

    from deployments.denoiser.engine import DenoiseJob

    rng = random.Random(seed)
    jobs = []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed * 1000 + index)
        cond, uncond = torch.randn(2, 1, 77, hidden, generator=generator)
        jobs.append(DenoiseJob(cond, uncond, size, size, [index], rng.randint(15, 30), 7.5))
    return jobs


def drive(engine, jobs, concurrency: int) -> dict:
    """Closed loop: `concurrency` clients take the next job from the shared list."""
    latencies: list[float] = []
    lock = threading.Lock()
    queue = list(jobs)

    def client():
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
            start = time.perf_counter()
            engine.submit(job).result()
            with lock:
                latencies.append((time.perf_counter() - start) * 1000.0)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "rps": round(len(latencies) / seconds, 4),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p95_ms": round(percentile(latencies, 95), 1),
    }


def run(sizes: list[int], levels: list[int], per_level: int, rounds: int, threads: int, model: str = "tiny") -> dict:
    from deployments.denoiser.engine import DenoiserEngine
    from deployments.models import loading

    model_path = loading.resolve_model(model)
    runs = []
    for size in sizes:
        engines = {mode: DenoiserEngine(model_path, threads, settings) for mode, settings in MODES.items()}
        hidden = engines["single"].unet_config["cross_attention_dim"]
        for engine in engines.values():  # first-call costs
            engine.submit(make_jobs(1, size, hidden, seed=99)[0]).result()
        for concurrency in levels:
            jobs = make_jobs(max(per_level, rounds * concurrency), size, hidden, seed=concurrency)
            for mode, engine in engines.items():
                row = {
                    "model": model,
                    "size": size,
                    "mode": mode,
                    "concurrency": concurrency,
                    **drive(engine, jobs, concurrency),
                }
                print(json.dumps(row), flush=True)
                runs.append(row)
    return {
        "runs": runs,
        "config": {
            "command": command_line("benchmarks.denoiser_batching"),
            "threads": threads,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
            "steps": "15-30, guidance 7.5",
            "model": model,
            "unet_parameters": unet_parameters(model_path),
        },
    }


def unet_parameters(model_path) -> int:
    from deployments.models import loading

    return sum(p.numel() for p in loading.load_unet(model_path).parameters())


def markdown(results: dict) -> str:
    lines = [
        "| size | concurrency | mode | requests | rps | p50 ms | p95 ms | rps vs single |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    single = {(r["size"], r["concurrency"]): r["rps"] for r in results["runs"] if r["mode"] == "single"}
    for r in results["runs"]:
        ratio = r["rps"] / single[(r["size"], r["concurrency"])]
        lines.append(
            f"| {r['size']}x{r['size']} | {r['concurrency']} | {r['mode']} | {r['requests']} | {r['rps']:.3f} "
            f"| {r['p50_ms']:,.0f} | {r['p95_ms']:,.0f} | {ratio:.2f}x |"
        )
    c = results["config"]
    lines += [
        "",
        f"{c.get('model', 'tiny')} model ({c.get('unet_parameters', 0) / 1e6:.1f}M UNet parameters), "
        f"{c['steps']}, {c['threads']} torch threads, {c['machine']}; {c['date'][:10]}; "
        f"`{c['command'].strip()}`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256x256 at concurrency 1 and 8 only")
    parser.add_argument("--sizes", default="256,64")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--requests-per-level", type=int, default=6, help="at least this many requests per level")
    parser.add_argument("--rounds", type=int, default=2, help="at least this many requests per client")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--model",
        default="tiny",
        help="preset or model folder (default: %(default)s; the mid-size preset is `small`, 24M UNet parameters)",
    )
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]<section>.json)")
    parser.add_argument("--update-readme", metavar="README")
    options = parser.parse_args(argv)
    # one README table per model: denoiser_batching (tiny), denoiser_batching_<preset> otherwise
    section = SECTION if options.model == "tiny" else f"{SECTION}_{Path(options.model).name}"
    sizes = [int(s) for s in options.sizes.split(",")]
    levels = [int(c) for c in options.concurrency.split(",")]
    per_level, rounds = options.requests_per_level, options.rounds
    if options.quick:
        sizes, levels, per_level, rounds = [256], [1, 8], 3, 1
    results = run(sizes, levels, per_level, rounds, options.threads, options.model)
    json_path = results_path(section, options.quick, options.json)
    publish(results, json_path, markdown(results), options.update_readme, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
