"""Denoiser autoscaling: Serve's default policy vs scaling on queued work, in one run.

The served app (real Ray Serve on localhost, HTTP) with the Denoiser allowed 1-3 replicas
(half a CPU and one torch thread each, batches of 4), the light stages pinned to one
replica. The same bounded load ramp goes through each policy: client threads ramp up,
hold, ramp down, then nothing while the deployment scales back. Requests are mixed: most
small and cheap (64x64, 15 steps), some large (256x256, 30 steps: ~30x the UNet work), so
request count and work disagree. Sampled every 0.5 s: running Denoiser replicas and active
clients. Reported per policy: peak replicas, seconds from the start of the load to the first
scale-up, seconds from the end of the load back to one replica, replica-seconds (cost),
p95 latency and the share of requests within `--target-ms`.

    .venv/bin/python benchmarks/autoscaling.py                   # ~6 min
    .venv/bin/python benchmarks/autoscaling.py --quick           # < 5 min
    .venv/bin/python benchmarks/autoscaling.py --update-readme README.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # runnable as a script from any directory

from benchmarks.readme_table import publish  # noqa: E402

SECTION = "autoscaling"
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "autoscaling.json"
DEFAULT_PLOT = REPO_ROOT / "benchmarks" / "results" / "autoscaling.png"
PORT = 8131
SMALL = {"size": "64x64", "num_inference_steps": 15}
LARGE = {"size": "256x256", "num_inference_steps": 30}
# a large job: 30 steps x 32x32 latent pixels; the work policy keeps two of them per replica
TARGET_WORK = 2 * 30 * 32 * 32
COMMON = {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1, "metrics_interval_s": 0.5,
          "look_back_period_s": 2, "upscale_delay_s": 3, "downscale_delay_s": 10}
POLICIES = {
    "default (target_ongoing_requests 2)": {**COMMON, "target_ongoing_requests": 2},
    "queued work": {**COMMON, "policy": {"policy_function": "serve_app.autoscaling:QueuedWorkPolicy",
                                         "policy_kwargs": {"target_work_per_replica": TARGET_WORK}}},
}


def deployment_options(base: dict, autoscaling: dict) -> dict:
    options = copy.deepcopy(base)
    for name, entry in options.items():
        entry.pop("autoscaling_config", None)
        entry.pop("request_router_config", None)
        entry.update(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, graceful_shutdown_timeout_s=1)
    options["Denoiser"].pop("num_replicas")
    # a replica scaled down finishes the jobs it holds (a 1 s grace failed them with 500s)
    options["Denoiser"].update(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=4,
                               autoscaling_config=autoscaling, graceful_shutdown_timeout_s=120)
    return options


def running_denoisers(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "Denoiser" not in status.deployments:
        return 0
    return sum(n for state, n in status.deployments["Denoiser"].replica_states.items()
               if getattr(state, "value", str(state)) == "RUNNING")


def run_policy(name: str, autoscaling: dict, settings, base_options, ramp: tuple[float, float, float, float],
               clients: int, large_share: float, seed: int) -> dict:
    import httpx
    from ray import serve

    from serve_app.app import build_application

    app = "autoscaling-bench"
    serve.run(build_application(settings, deployment_options(base_options, autoscaling)), name=app,
              route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{PORT}/v1/images/generations"
    while True:  # ready: one request through
        try:
            if httpx.post(url, json={"prompt": "warm-up", "seed": 0, **SMALL}, timeout=60).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    up, hold, down, tail = ramp
    start = time.perf_counter()
    load_end = up + hold + down
    results, timeline, lock = [], [], threading.Lock()

    def active_clients(t: float) -> int:
        if t < up:
            return max(1, round(clients * t / up))
        if t < up + hold:
            return clients
        if t < load_end:
            return round(clients * (load_end - t) / down)
        return 0

    def client(index: int):
        rng = random.Random(seed * 100 + index)
        with httpx.Client(timeout=300) as http:
            while (t := time.perf_counter() - start) < load_end:
                if index >= active_clients(t):
                    time.sleep(0.2)
                    continue
                kind = LARGE if rng.random() < large_share else SMALL
                sent = time.perf_counter()
                response = http.post(url, json={"prompt": "portrait of a person", "seed": rng.randrange(1000), **kind})
                with lock:
                    results.append({"t": sent - start, "ms": (time.perf_counter() - sent) * 1000.0,
                                    "status": response.status_code, "large": kind is LARGE})

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    while (t := time.perf_counter() - start) < load_end + tail:
        timeline.append({"t": round(t, 2), "replicas": running_denoisers(app), "clients": active_clients(t)})
        time.sleep(0.5)
    for thread in threads:
        thread.join(timeout=300)
    serve.delete(app)

    scaled_up = next((p["t"] for p in timeline if p["replicas"] > 1), None)
    last_over = max((p["t"] for p in timeline if p["replicas"] > 1), default=None)
    back_down = None
    if last_over is not None:
        after = [p["t"] for p in timeline if p["t"] > last_over and p["replicas"] <= 1]
        back_down = round(max(0.0, after[0] - load_end), 1) if after else None  # 0: down before the load ended
    latencies = [r["ms"] for r in results if r["status"] == 200]
    return {
        "policy": name,
        "peak_replicas": max(p["replicas"] for p in timeline),
        "time_to_scale_up_s": None if scaled_up is None else round(scaled_up, 1),
        "time_to_scale_down_s": back_down,
        "replica_seconds": round(sum(p["replicas"] for p in timeline) * 0.5, 1),
        "requests": len(results), "errors": sum(r["status"] != 200 for r in results),
        "error_statuses": sorted({r["status"] for r in results if r["status"] != 200}),
        "p95_ms": round(statistics.quantiles(latencies, n=20)[-1], 1) if len(latencies) >= 2 else None,
        "timeline": timeline, "latencies": results,
    }


def run(ramp, clients: int, large_share: float, target_ms: float) -> dict:
    import ray
    from ray import serve

    from serve_app.cli import load_serve_config, split_app_config

    settings, base_options, _ = split_app_config(load_serve_config(REPO_ROOT / "serve_config.yaml"), model="tiny")
    settings = settings.model_copy(update={"num_threads": 1, "stage_threads": {}})
    settings.denoiser.max_batch_size = 4
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT}, proxy_location="HeadOnly")
        rows = []
        for index, (name, autoscaling) in enumerate(POLICIES.items()):
            print(f"policy {name} ...", file=sys.stderr, flush=True)
            row = run_policy(name, autoscaling, settings, base_options, ramp, clients, large_share, seed=7)
            ok = [r["ms"] for r in row["latencies"] if r["status"] == 200]
            row["slo_attainment"] = round(sum(ms <= target_ms for ms in ok) / max(1, len(row["latencies"])), 4)
            rows.append(row)
    finally:
        ray.shutdown()
    up, hold, down, tail = ramp
    return {
        "config": {"ramp_s": {"up": up, "hold": hold, "down": down, "tail": tail}, "clients": clients,
                   "large_share": large_share, "target_ms": target_ms, "target_work_per_replica": TARGET_WORK,
                   "autoscaling": COMMON, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "command": "python benchmarks/autoscaling.py " + " ".join(sys.argv[1:])},
        "policies": rows,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["policies"]
    figure, axes = plt.subplots(len(rows), 1, figsize=(10, 2.8 * len(rows)), sharex=True)
    for axis, row in zip(axes, rows):
        times = [p["t"] for p in row["timeline"]]
        axis.step(times, [p["replicas"] for p in row["timeline"]], where="post", label="Denoiser replicas")
        axis.plot(times, [p["clients"] for p in row["timeline"]], color="grey", linestyle="--", label="active clients")
        large = [(r["t"], r["ms"] / 1000) for r in row["latencies"] if r["large"]]
        small = [(r["t"], r["ms"] / 1000) for r in row["latencies"] if not r["large"]]
        twin = axis.twinx()
        twin.scatter(*zip(*small), s=6, color="tab:green", alpha=0.5, label="small request latency (s)") if small else None
        twin.scatter(*zip(*large), s=10, color="tab:red", alpha=0.6, label="large request latency (s)") if large else None
        twin.set_ylabel("latency (s)")
        axis.set_title(row["policy"], fontsize=10)
        axis.set_ylabel("count")
        axis.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds since the load started")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def markdown(results: dict) -> str:
    lines = ["| policy | peak replicas | first scale-up (s) | back to 1 after load (s) | replica-seconds | requests "
             "| p95 ms | within target |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["policies"]:
        def show(value, fmt="{:.1f}"):
            return "-" if value is None else fmt.format(value)
        lines.append(f"| {r['policy']} | {r['peak_replicas']} | {show(r['time_to_scale_up_s'])} "
                     f"| {show(r['time_to_scale_down_s'])} | {r['replica_seconds']:.0f} | {r['requests']} "
                     f"({r['errors']} errors) | {show(r['p95_ms'], '{:,.0f}')} | {r['slo_attainment']:.0%} |")
    c = results["config"]
    ramp = c["ramp_s"]
    lines += ["", f"Tiny model served on localhost; {c['clients']} client threads ramped up {ramp['up']:g} s, held "
              f"{ramp['hold']:g} s, down {ramp['down']:g} s, then {ramp['tail']:g} s idle; {c['large_share']:.0%} of "
              f"requests 256x256 x 30 steps, the rest 64x64 x 15; target {c['target_ms']:,.0f} ms; upscale delay "
              f"{c['autoscaling']['upscale_delay_s']} s, downscale delay {c['autoscaling']['downscale_delay_s']} s; "
              f"{c['machine']}; {c['date'][:10]}; `{c['command'].strip()}`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a shorter ramp (< 5 min)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--large-share", type=float, default=0.2)
    parser.add_argument("--target-ms", type=float, default=10_000)
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--plot", default=str(DEFAULT_PLOT))
    parser.add_argument("--update-readme", metavar="README")
    options = parser.parse_args(argv)
    ramp = (10.0, 20.0, 10.0, 30.0) if options.quick else (15.0, 45.0, 15.0, 40.0)
    results = run(ramp, options.clients, options.large_share, options.target_ms)
    plot(results, Path(options.plot))
    for row in results["policies"]:
        row.pop("latencies")
    publish(results, options.json, markdown(results), options.update_readme, SECTION)
    print(f"plot: {options.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
