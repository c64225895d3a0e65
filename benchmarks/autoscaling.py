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

`--workload phases` separates the two kinds instead: first a heavy phase (2 clients, only
large requests: few requests, much work), an idle gap long enough to scale back, then a light
phase (6 clients, only small requests: many requests, little work). Per phase: seconds from
its start to the first scale-up, peak replicas, replica-seconds, p95 latency.

    .venv/bin/python -m benchmarks.autoscaling                   # ~6 min
    .venv/bin/python -m benchmarks.autoscaling --quick           # < 5 min
    .venv/bin/python -m benchmarks.autoscaling --update-readme README.md
    .venv/bin/python -m benchmarks.autoscaling --workload phases --update-readme README.md   # ~6 min
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.readme_table import command_line, plot_path, publish, results_path
from benchmarks.stats import percentile

SECTION = "autoscaling"
PORT = 8131
SMALL = {"size": "64x64", "num_inference_steps": 15}
LARGE = {"size": "256x256", "num_inference_steps": 30}
# a large job: 30 steps x 32x32 latent pixels; the work policy keeps two of them per replica
TARGET_WORK = 2 * 30 * 32 * 32
COMMON = {
    "min_replicas": 1,
    "max_replicas": 3,
    "initial_replicas": 1,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
    "upscale_delay_s": 3,
    "downscale_delay_s": 10,
}
# phases: half a large job per replica, so two large jobs in flight (their remaining work
# averages one job's) ask for two replicas; six small jobs stay far under one
PHASES_TARGET_WORK = 30 * 32 * 32 // 2


def policies(target_work: int) -> dict[str, dict]:
    return {
        "default (target_ongoing_requests 2)": {**COMMON, "target_ongoing_requests": 2},
        "queued work": {
            **COMMON,
            "policy": {
                "policy_function": "deployments.denoiser.autoscaling:QueuedWorkPolicy",
                "policy_kwargs": {"target_work_per_replica": target_work},
            },
        },
    }


class RampPlan:
    """Clients ramp up, hold, ramp down; each request large with probability `large_share`."""

    def __init__(self, ramp: tuple[float, float, float, float], clients: int, large_share: float):
        self.up, self.hold, self.down, self.tail = ramp
        self.clients, self.large_share = clients, large_share
        self.load_end = self.up + self.hold + self.down
        self.phases = []

    def active(self, t: float) -> int:
        if t < self.up:
            return max(1, round(self.clients * t / self.up))
        if t < self.up + self.hold:
            return self.clients
        if t < self.load_end:
            return round(self.clients * (self.load_end - t) / self.down)
        return 0

    def kind(self, t: float, rng: random.Random) -> dict:
        return LARGE if rng.random() < self.large_share else SMALL


class PhasesPlan:
    """(name, start, end, clients, kind) phases; nothing runs between them."""

    def __init__(self, heavy_s: float, gap_s: float, light_s: float, tail_s: float):
        self.phases = [
            ("heavy", 0.0, heavy_s, 2, LARGE),
            ("light", heavy_s + gap_s, heavy_s + gap_s + light_s, 6, SMALL),
        ]
        self.clients = max(phase[3] for phase in self.phases)
        self.load_end, self.tail = self.phases[-1][2], tail_s

    def _phase(self, t: float):
        return next((phase for phase in self.phases if phase[1] <= t < phase[2]), None)

    def active(self, t: float) -> int:
        phase = self._phase(t)
        return 0 if phase is None else phase[3]

    def kind(self, t: float, rng: random.Random) -> dict:
        phase = self._phase(t)
        return phase[4] if phase is not None else SMALL


def deployment_options(base: dict, autoscaling: dict) -> dict:
    options = copy.deepcopy(base)
    for entry in options.values():
        entry.pop("autoscaling_config", None)
        entry.pop("request_router_config", None)
        entry.update(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, graceful_shutdown_timeout_s=1)
    options["Denoiser"].pop("num_replicas")
    # a replica scaled down finishes the jobs it holds (a 1 s grace failed them with 500s)
    options["Denoiser"].update(
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=4,
        autoscaling_config=autoscaling,
        graceful_shutdown_timeout_s=120,
    )
    return options


def running_denoisers(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or "Denoiser" not in status.deployments:
        return 0
    return sum(
        n
        for state, n in status.deployments["Denoiser"].replica_states.items()
        if getattr(state, "value", str(state)) == "RUNNING"
    )


def run_policy(name: str, autoscaling: dict, settings, base_options, plan, seed: int) -> dict:
    import httpx
    from ray import serve

    from serve_app.app import build_application

    app = "autoscaling-bench"
    serve.run(
        build_application(settings, deployment_options(base_options, autoscaling)),
        name=app,
        route_prefix="/",
        blocking=False,
    )
    url = f"http://127.0.0.1:{PORT}/v1/images/generations"
    while True:  # ready: one request through
        try:
            if httpx.post(url, json={"prompt": "warm-up", "seed": 0, **SMALL}, timeout=60).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    start = time.perf_counter()
    load_end = plan.load_end
    results, timeline, lock = [], [], threading.Lock()
    active_clients = plan.active

    def client(index: int):
        rng = random.Random(seed * 100 + index)
        with httpx.Client(timeout=300) as http:
            while (t := time.perf_counter() - start) < load_end:
                if index >= active_clients(t):
                    time.sleep(0.2)
                    continue
                kind = plan.kind(t, rng)
                sent = time.perf_counter()
                response = http.post(url, json={"prompt": "portrait of a person", "seed": rng.randrange(1000), **kind})
                with lock:
                    results.append(
                        {
                            "t": sent - start,
                            "ms": (time.perf_counter() - sent) * 1000.0,
                            "status": response.status_code,
                            "large": kind is LARGE,
                        }
                    )

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(plan.clients)]
    for thread in threads:
        thread.start()
    while (t := time.perf_counter() - start) < load_end + plan.tail:
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
        "phases": [phase_summary(phase, timeline, results) for phase in plan.phases],
        "peak_replicas": max(p["replicas"] for p in timeline),
        "time_to_scale_up_s": None if scaled_up is None else round(scaled_up, 1),
        "time_to_scale_down_s": back_down,
        "replica_seconds": round(sum(p["replicas"] for p in timeline) * 0.5, 1),
        "requests": len(results),
        "errors": sum(r["status"] != 200 for r in results),
        "error_statuses": sorted({r["status"] for r in results if r["status"] != 200}),
        "p95_ms": round(percentile(latencies, 95), 1) if latencies else None,
        "timeline": timeline,
        "latencies": results,
    }


def phase_summary(phase, timeline: list[dict], results: list[dict]) -> dict:
    """One phase of a PhasesPlan: how the replica count answered it (the phase's own window,
    plus the seconds after it until the next phase, so a late scale-up still counts)."""
    name, begin, end = phase[:3]
    window = [p for p in timeline if begin <= p["t"] < end]
    at_start = window[0]["replicas"] if window else 1
    first_up = next((p["t"] - begin for p in window if p["replicas"] > at_start), None)
    ok = [r["ms"] for r in results if begin <= r["t"] < end and r["status"] == 200]
    return {
        "phase": name,
        "seconds": end - begin,
        "replicas_at_start": at_start,
        "peak_replicas": max((p["replicas"] for p in window), default=0),
        "time_to_scale_up_s": None if first_up is None else round(first_up, 1),
        "replica_seconds": round(sum(p["replicas"] for p in window) * 0.5, 1),
        "requests": len(ok),
        "p50_ms": round(percentile(ok, 50), 1) if ok else None,
        "p95_ms": round(percentile(ok, 95), 1) if ok else None,
    }


def run(plan, target_work: int, target_ms: float) -> dict:
    import ray
    from ray import serve

    from serve_app.ops.cli import DEFAULT_CONFIG, load_serve_config, split_app_config

    settings, base_options, _ = split_app_config(load_serve_config(DEFAULT_CONFIG), model="tiny")
    settings = settings.model_copy(update={"num_threads": 1, "stage_threads": {}})
    settings.denoiser.max_batch_size = 4
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT}, proxy_location="HeadOnly")
        rows = []
        for name, autoscaling in policies(target_work).items():
            print(f"policy {name} ...", file=sys.stderr, flush=True)
            row = run_policy(name, autoscaling, settings, base_options, plan, seed=7)
            ok = [r["ms"] for r in row["latencies"] if r["status"] == 200]
            row["slo_attainment"] = round(sum(ms <= target_ms for ms in ok) / max(1, len(row["latencies"])), 4)
            rows.append(row)
    finally:
        ray.shutdown()
    shape = (
        {
            "phases": [
                {"phase": n, "start_s": b, "end_s": e, "clients": c, "request": k} for n, b, e, c, k in plan.phases
            ],
            "tail_s": plan.tail,
        }
        if plan.phases
        else {
            "ramp_s": {"up": plan.up, "hold": plan.hold, "down": plan.down, "tail": plan.tail},
            "large_share": plan.large_share,
        }
    )
    return {
        "config": {
            **shape,
            "clients": plan.clients,
            "target_ms": target_ms,
            "target_work_per_replica": target_work,
            "autoscaling": COMMON,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command_line("benchmarks.autoscaling"),
        },
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
        twin.scatter(
            *zip(*small), s=6, color="tab:green", alpha=0.5, label="small request latency (s)"
        ) if small else None
        twin.scatter(
            *zip(*large), s=10, color="tab:red", alpha=0.6, label="large request latency (s)"
        ) if large else None
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


def show(value, fmt: str = "{:.1f}") -> str:
    """A table cell: '-' for a value that was never reached."""
    return "-" if value is None else fmt.format(value)


def phases_markdown(results: dict) -> str:
    lines = [
        "| phase | policy | replicas at start | first scale-up (s after phase start) | peak replicas "
        "| replica-seconds | requests done | p50 ms | p95 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = [phase["phase"] for phase in results["policies"][0]["phases"]]
    for name in names:
        for row in results["policies"]:
            phase = next(p for p in row["phases"] if p["phase"] == name)
            lines.append(
                f"| {name} | {row['policy']} | {phase['replicas_at_start']} "
                f"| {show(phase['time_to_scale_up_s'])} | {phase['peak_replicas']} "
                f"| {phase['replica_seconds']:.0f} | {phase['requests']} | {show(phase['p50_ms'], '{:,.0f}')} "
                f"| {show(phase['p95_ms'], '{:,.0f}')} |"
            )
    c = results["config"]
    described = "; ".join(
        f"{p['phase']} {p['end_s'] - p['start_s']:g} s: {p['clients']} clients sending only "
        f"{p['request']['size']} x {p['request']['num_inference_steps']} steps"
        for p in c["phases"]
    )
    lines += [
        "",
        f"Tiny model served on localhost; {described}; idle between the phases and {c['tail_s']:g} s "
        f"after; queued-work target {c['target_work_per_replica']} (half a large job); upscale delay "
        f"{c['autoscaling']['upscale_delay_s']} s, downscale delay {c['autoscaling']['downscale_delay_s']} s; "
        f"{c['machine']}; {c['date'][:10]}; `{c['command'].strip()}`.",
    ]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    lines = [
        "| policy | peak replicas | first scale-up (s) | back to 1 after load (s) | replica-seconds | requests "
        "| p95 ms | within target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["policies"]:
        lines.append(
            f"| {r['policy']} | {r['peak_replicas']} | {show(r['time_to_scale_up_s'])} "
            f"| {show(r['time_to_scale_down_s'])} | {r['replica_seconds']:.0f} | {r['requests']} "
            f"({r['errors']} errors) | {show(r['p95_ms'], '{:,.0f}')} | {r['slo_attainment']:.0%} |"
        )
    c = results["config"]
    ramp = c["ramp_s"]
    lines += [
        "",
        f"Tiny model served on localhost; {c['clients']} client threads ramped up {ramp['up']:g} s, held "
        f"{ramp['hold']:g} s, down {ramp['down']:g} s, then {ramp['tail']:g} s idle; {c['large_share']:.0%} of "
        f"requests 256x256 x 30 steps, the rest 64x64 x 15; target {c['target_ms']:,.0f} ms; upscale delay "
        f"{c['autoscaling']['upscale_delay_s']} s, downscale delay {c['autoscaling']['downscale_delay_s']} s; "
        f"{c['machine']}; {c['date'][:10]}; `{c['command'].strip()}`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a shorter ramp (< 5 min)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--large-share", type=float, default=0.2)
    parser.add_argument("--target-ms", type=float, default=10_000)
    parser.add_argument(
        "--workload",
        choices=["ramp", "phases"],
        default="ramp",
        help="ramp: mixed requests up/hold/down; phases: heavy then light (default: %(default)s)",
    )
    parser.add_argument(
        "--target-work",
        type=int,
        help="the queued-work policy's target per replica (default: "
        f"{TARGET_WORK} for ramp, {PHASES_TARGET_WORK} for phases)",
    )
    parser.add_argument(
        "--json", help="results file, the timeline plot beside it (default: benchmarks/results/[quick/]<section>.json)"
    )
    parser.add_argument("--update-readme", metavar="README")
    options = parser.parse_args(argv)
    if options.workload == "phases":
        plan = PhasesPlan(*((30.0, 15.0, 20.0, 20.0) if options.quick else (45.0, 20.0, 30.0, 25.0)))
        section, target_work, render = f"{SECTION}_phases", options.target_work or PHASES_TARGET_WORK, phases_markdown
    else:
        plan = RampPlan(
            (10.0, 20.0, 10.0, 30.0) if options.quick else (15.0, 45.0, 15.0, 40.0),
            options.clients,
            options.large_share,
        )
        section, target_work, render = SECTION, options.target_work or TARGET_WORK, markdown
    results = run(plan, target_work, options.target_ms)
    json_path = results_path(section, options.quick, options.json)
    plot(results, plot_path(json_path))
    for row in results["policies"]:
        row.pop("latencies")
    publish(results, json_path, render(results), options.update_readme, section)
    print(f"plot: {plot_path(json_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
