"""Step policies under open-loop load: SLO attainment, goodput, latency and PSNR, in one run.

The in-process pipeline with the served settings (the four engines, step-level batching in
the Denoiser, the step controller reading the Denoiser's live load; no Ray, no HTTP: the
policy is what is measured) on the served model (`portrait` unless --model). First the capacity of `fixed 30`
(closed loop, as many clients as the Denoiser's batch) and the latency of one `fixed 30`
request alone; the latency target is `--target-factor` x that latency. Then, for every
load factor, the same Poisson arrival times and requests (prompts of varied complexity,
fixed seeds) through every policy:

- fixed 30 / fixed 15: explicit steps;
- complexity: the prompt's complexity score mapped onto 15-30;
- slo: the most steps in [15, complexity choice] predicted to meet the target.

Reported per run: SLO attainment (share of requests done within the target, counted from
their scheduled arrival), goodput (requests within the target per second of the run), p50 /
p95 latency, mean steps, mean PSNR of each image against a 50-step render of the same
prompt and seed (identical images count as 100 dB), and mean adherence: the share of each
prompt's drawable attributes that the judge sees in its image (as `fusionserve judge --prompt`).

    .venv/bin/python -m benchmarks.adaptive_steps                   # ~10 min
    .venv/bin/python -m benchmarks.adaptive_steps --quick           # < 3 min
    .venv/bin/python -m benchmarks.adaptive_steps --update-readme README.md
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.readme_table import command_line, plot_path, publish, results_path
from benchmarks.stats import percentile
from benchmarks.turns import SETTLE_S

SECTION = "adaptive_steps"
POLICIES = ("fixed 30", "fixed 15", "complexity", "slo")
IDENTICAL_DB = 100.0
# From a bare word to a busy portrait: the complexity policy spreads them over 15-30 steps.
PROMPTS = [
    "portrait",
    "a woman, side view",
    "A smiling Asian man wearing glasses, about 35 years old",
    "old man with a grey beard and short white hair, studio lighting",
    "A young woman with long curly red hair and freckles, smiling, wearing earrings and a green scarf, "
    "soft window light, bokeh background, highly detailed skin texture",
    "A bald middle-aged man with a thick black mustache, wearing a suit and tie and round glasses, "
    "serious expression, three-quarter view, dramatic rim lighting, dark background, sharp focus, 4k",
]


def request_for(index: int, policy: str, size: int, target_ms: float, seeds: int):
    from serve_app.flow.request import ImageRequest

    prompt = PROMPTS[index % len(PROMPTS)]
    seed = index % seeds
    steps = {"fixed 30": 30, "fixed 15": 15}.get(policy)
    return ImageRequest(
        prompt=prompt,
        negative_prompt="",
        width=size,
        height=size,
        n=1,
        seed=seed,
        guidance_scale=7.5,
        num_inference_steps=steps,
        step_policy=None if steps else policy,
        deadline_ms=target_ms if policy == "slo" else None,
    )


async def closed_loop(pipeline, size: int, clients: int, requests: int, target_ms: float, seeds: int) -> float:
    """Throughput (requests/s) of fixed 30 with `clients` back-to-back clients."""
    queue = list(range(requests))

    async def client():
        while queue:
            index = queue.pop()
            await pipeline.generate(request_for(index, "fixed 30", size, target_ms, seeds))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return requests / (time.perf_counter() - start)


async def open_loop(pipeline, policy: str, arrivals: list[float], size: int, target_ms: float, seeds: int):
    """Send request i at arrivals[i] seconds; latency from its scheduled arrival."""
    start = time.perf_counter()

    async def one(index: int, at: float):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        result = await pipeline.generate(request_for(index, policy, size, target_ms, seeds))
        done = time.perf_counter()
        return (
            index,
            (done - start - at) * 1000.0,
            result.steps.steps,
            result.steps.reason,
            result.images_png[0],
            done,
            result.steps.predicted_ms,
            result.usage.elapsed_ms,
        )

    outcomes = await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals)))
    return outcomes, max(o[5] for o in outcomes) - start


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        times.append(now)
    return times


class AdherenceReader:
    """The judge's mean adherence of images to the prompts they were made from (the portrait
    model only: the judge reads portraits), as every adherence benchmark computes it."""

    def __init__(self, model_dir: Path):
        from deployments.models.portrait.evaluation import read_prompts
        from deployments.models.portrait.judge import Judge

        self.asked = dict(zip(PROMPTS, read_prompts(model_dir, PROMPTS), strict=True))
        self.judge = Judge.packaged()

    def __call__(self, prompts: list[str], pngs: list[bytes]) -> float:
        import io

        from PIL import Image

        from deployments.models.portrait.evaluation import adherence_report

        images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
        report = adherence_report([self.asked[prompt] for prompt in prompts], self.judge.read(images))
        return round(report.overall, 4)


def served_pipeline(model: str, settings, **options):
    from deployments.models import loading
    from serve_app.flow.pipeline import local_pipeline_for

    return local_pipeline_for(loading.resolve_model(model), settings, **options)


def run(
    size: int,
    load_factors: list[float],
    policies: list[str],
    requests: int,
    seeds: int,
    target_factor: float,
    capacity_requests: int,
    model: str = "portrait",
) -> dict:
    from deployments.models import loading
    from serve_app.flow.quality import psnr_db
    from serve_app.ops.cli import DEFAULT_CONFIG, load_serve_config, split_app_config

    settings, _, _ = split_app_config(load_serve_config(DEFAULT_CONFIG), model)
    pipeline = served_pipeline(model, settings)
    read_adherence = AdherenceReader(loading.resolve_model(model)) if model == "portrait" else None
    batch = settings.denoiser.max_batch_size

    async def measure():
        for policy in policies:  # warm-up: threads, kernels, the encoder cache for every prompt
            for index in range(len(PROMPTS)):
                await pipeline.generate(request_for(index, policy, size, 1e9, seeds))
        alone = []
        for index in range(3):
            t0 = time.perf_counter()
            await pipeline.generate(request_for(index + 2, "fixed 30", size, 1e9, seeds))
            alone.append((time.perf_counter() - t0) * 1000.0)
        capacity = await closed_loop(pipeline, size, batch, capacity_requests, 1e9, seeds)
        target_ms = target_factor * statistics.median(alone)
        runs = []
        for factor in load_factors:
            arrivals = poisson_arrivals(factor * capacity, requests, seed=round(factor * 1000))
            for policy in policies:
                outcomes, duration = await open_loop(pipeline, policy, arrivals, size, target_ms, seeds)
                runs.append({"policy": policy, "load_factor": factor, "outcomes": outcomes, "duration_s": duration})
                print(f"  load {factor:.1f}x {policy:10s} done in {duration:.1f} s", file=sys.stderr, flush=True)
        references = {}
        for index in range(min(requests, len(PROMPTS) * seeds)):  # the 50-step image of each prompt and seed
            request = request_for(index, "fixed 30", size, 1e9, seeds)
            key = (request.prompt, request.seed)
            if key not in references:
                references[key] = (
                    await pipeline.generate(dataclasses.replace(request, num_inference_steps=50))
                ).images_png[0]
        return statistics.median(alone), capacity, target_ms, runs, references

    alone_ms, capacity, target_ms, raw_runs, references = asyncio.run(measure())
    rows = []
    for raw in raw_runs:
        latencies, steps, psnrs, within = [], [], [], 0
        errors = [o[7] / o[6] for o in raw["outcomes"] if o[6]]  # actual / predicted, where the slo policy predicted
        for index, latency, chosen, _, png, *_ in raw["outcomes"]:
            request = request_for(index, "fixed 30", size, target_ms, seeds)
            score = psnr_db(png, references[(request.prompt, request.seed)])
            psnrs.append(IDENTICAL_DB if math.isinf(score) else score)
            latencies.append(latency)
            steps.append(chosen)
            within += latency <= target_ms
        reasons = statistics.multimode([o[3] for o in raw["outcomes"]])
        prompts = [request_for(o[0], "fixed 30", size, target_ms, seeds).prompt for o in raw["outcomes"]]
        adherence = read_adherence(prompts, [o[4] for o in raw["outcomes"]]) if read_adherence else None
        rows.append(
            {
                "policy": raw["policy"],
                "load_factor": raw["load_factor"],
                "slo_attainment": round(within / len(latencies), 4),
                "goodput_rps": round(within / raw["duration_s"], 4),
                "p50_ms": round(percentile(latencies, 50), 1),
                "p95_ms": round(percentile(latencies, 95), 1),
                "mean_steps": round(statistics.fmean(steps), 2),
                "mean_psnr_db": round(statistics.fmean(psnrs), 2),
                "mean_adherence": adherence,
                "steps": steps,
                "main_reason": reasons[0],
                "actual_over_predicted": round(statistics.median(errors), 3) if errors else None,
            }
        )
    same = {}
    for factor in load_factors:
        by_policy = {r["policy"]: r["steps"] for r in rows if r["load_factor"] == factor}
        if "slo" in by_policy and "complexity" in by_policy:
            pairs = list(zip(by_policy["slo"], by_policy["complexity"]))
            same[str(factor)] = round(sum(a == b for a, b in pairs) / len(pairs), 4)
    return {
        "config": {
            "model": model,
            "size": size,
            "requests_per_run": requests,
            "seeds": seeds,
            "max_batch_size": batch,
            "fixed30_alone_ms": round(alone_ms, 1),
            "capacity_rps": round(capacity, 3),
            "target_ms": round(target_ms, 1),
            "target_factor": target_factor,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command_line("benchmarks.adaptive_steps"),
        },
        "runs": rows,
        "slo_same_steps_as_complexity": same,
    }


def early_stop_study(size: int, thresholds: list[float], seeds: int, steps: int = 30, model: str = "portrait") -> dict:
    """Each prompt x seed at `steps` steps, one at a time, with convergence early stop at each
    threshold: steps actually run, time, PSNR against the same request run to the end and
    against 50 steps, and the judge's adherence (portrait model). The thresholds take turns
    request by request (each on its own pipeline, in reversed order every other request, a
    settling pause before each), so the machine's drift falls on all of them alike."""
    from deployments.models import loading
    from serve_app.flow.quality import psnr_db
    from serve_app.ops.cli import DEFAULT_CONFIG, load_serve_config, split_app_config

    settings, _, _ = split_app_config(load_serve_config(DEFAULT_CONFIG), model)
    read_adherence = AdherenceReader(loading.resolve_model(model)) if model == "portrait" else None
    counted = []
    requests = [request_for(i, "fixed 30", size, 1e9, seeds) for i in range(len(PROMPTS) * seeds)]
    requests = [dataclasses.replace(r, num_inference_steps=steps) for r in requests]
    levels: list[float | None] = [None, *thresholds]
    pipelines = {}
    for threshold in levels:
        level_settings = settings.model_copy(deep=True)
        level_settings.steps.early_stop_threshold = threshold
        pipelines[threshold] = served_pipeline(model, level_settings, on_step=lambda *_: counted.append(1))

    def generate(threshold: float | None, request) -> tuple[bytes, int, float]:
        counted.clear()
        start = time.perf_counter()
        png = asyncio.run(pipelines[threshold].generate(request)).images_png[0]
        return png, len(counted), (time.perf_counter() - start) * 1000.0

    for threshold in levels:  # warm-up
        generate(threshold, dataclasses.replace(requests[0], num_inference_steps=2))
    fifty = [generate(None, dataclasses.replace(r, num_inference_steps=50)) for r in requests]
    by_level: dict[float | None, list[tuple[bytes, int, float]]] = {t: [] for t in levels}
    for index, request in enumerate(requests):
        for threshold in levels if index % 2 == 0 else reversed(levels):
            time.sleep(SETTLE_S)
            by_level[threshold].append(generate(threshold, request))
    full = by_level[None]
    base_ms = statistics.fmean(r[2] for r in full)

    def summary(threshold, rows):
        vs_full = [psnr_db(r[0], f[0]) for r, f in zip(rows, full)]
        vs_fifty = [psnr_db(r[0], f[0]) for r, f in zip(rows, fifty)]
        mean_ms = statistics.fmean(r[2] for r in rows)
        adherence = read_adherence([r.prompt for r in requests], [r[0] for r in rows]) if read_adherence else None
        return {
            "threshold": threshold,
            "mean_steps_run": round(statistics.fmean(r[1] for r in rows), 2),
            "mean_ms": round(mean_ms, 1),
            "speedup": round(base_ms / mean_ms, 3),
            "psnr_vs_full_db": round(statistics.fmean(min(v, IDENTICAL_DB) for v in vs_full), 2),
            "min_psnr_vs_full_db": round(min(min(v, IDENTICAL_DB) for v in vs_full), 2),
            "psnr_vs_50_db": round(statistics.fmean(min(v, IDENTICAL_DB) for v in vs_fifty), 2),
            "mean_adherence": adherence,
        }

    rows = [summary(t, by_level[t]) for t in levels]
    return {
        "config": {
            "model": model,
            "size": size,
            "steps": steps,
            "requests": len(requests),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command_line("benchmarks.adaptive_steps"),
        },
        "runs": rows,
    }


def early_stop_markdown(results: dict) -> str:
    lines = [
        "| early stop threshold | mean steps run | mean ms | speed-up | PSNR vs run to the end (mean / min) "
        "| PSNR vs 50 steps | adherence |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        name = "off" if r["threshold"] is None else f"{r['threshold']:g}"
        lines.append(
            f"| {name} | {r['mean_steps_run']:.1f} | {r['mean_ms']:,.0f} | {r['speedup']:.2f}x "
            f"| {r['psnr_vs_full_db']:.1f} / {r['min_psnr_vs_full_db']:.1f} dB | {r['psnr_vs_50_db']:.1f} dB "
            f"| {percent(r.get('mean_adherence'))} |"
        )
    c = results["config"]
    lines += [
        "",
        f"`{c.get('model', 'tiny')}` model, {c['size']}x{c['size']}, {c['steps']} steps requested, {c['requests']} "
        f"requests one at a time (100 dB = identical; adherence: the judge's, on the prompts' drawable "
        f"attributes); {c['machine']}; {c['date'][:10]}; `{c['command'].strip()}`.",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for policy in dict.fromkeys(r["policy"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["policy"] == policy]
        loads = [r["load_factor"] for r in runs]
        axes[0].plot(loads, [100 * r["slo_attainment"] for r in runs], marker="o", label=policy)
        axes[1].plot(loads, [r["p95_ms"] / 1000 for r in runs], marker="o", label=policy)
        axes[2].plot(loads, [r["mean_psnr_db"] for r in runs], marker="o", label=policy)
    axes[0].set_ylabel("within target (%)")
    axes[1].set_ylabel("p95 latency (s)")
    axes[1].axhline(results["config"]["target_ms"] / 1000, color="grey", linestyle="--", linewidth=1)
    axes[2].set_ylabel("mean PSNR vs 50 steps (dB)")
    for axis in axes:
        axis.set_xlabel("load (x capacity of fixed 30)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    c = results["config"]
    figure.suptitle(
        f"Step policies, {c['size']}x{c['size']}, target {c['target_ms'] / 1000:.1f} s ({c['machine']})", fontsize=10
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def percent(share: float | None) -> str:
    return "–" if share is None else f"{share:.1%}"


def markdown(results: dict) -> str:
    lines = [
        "| load | policy | within target | goodput rps | p50 ms | p95 ms | mean steps | mean PSNR vs 50 steps "
        "| adherence |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['load_factor']:.1f}x | {r['policy']} | {r['slo_attainment']:.0%} | {r['goodput_rps']:.2f} "
            f"| {r['p50_ms']:,.0f} | {r['p95_ms']:,.0f} | {r['mean_steps']:.1f} | {r['mean_psnr_db']:.1f} dB "
            f"| {percent(r.get('mean_adherence'))} |"
        )
    c = results["config"]
    same = ", ".join(f"{float(k):.1f}x: {v:.0%}" for k, v in results["slo_same_steps_as_complexity"].items())
    lines += [
        "",
        f"`{c.get('model', 'tiny')}` model, {c['size']}x{c['size']}, {c['requests_per_run']} Poisson arrivals per run; "
        f"capacity of fixed 30 = {c['capacity_rps']:.2f} requests/s (closed loop, {c['max_batch_size']} clients); "
        f"target = {c['target_factor']:g} x one fixed-30 request alone ({c['fixed30_alone_ms']:,.0f} ms) = "
        f"{c['target_ms']:,.0f} ms. slo chose the complexity policy's steps for {same} of requests. "
        f"{c['machine']}; {c['date'][:10]}; `{c['command'].strip()}`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0.5x and 2x load, 16 requests per run (< 3 min)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--model", default="portrait", help="a model name or folder (adherence: portrait only)")
    parser.add_argument("--loads", default="0.5,1,1.5,2", help="load factors (x capacity of fixed 30)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--requests", type=int, default=40, help="Poisson arrivals per run")
    parser.add_argument("--seeds", type=int, default=4, help="distinct seeds (x prompts = 50-step references)")
    parser.add_argument(
        "--target-factor", type=float, default=2.0, help="latency target = this x one fixed-30 request alone"
    )
    parser.add_argument(
        "--early-stop", action="store_true", help="instead: what convergence early stop saves and costs, per threshold"
    )
    parser.add_argument("--thresholds", default="0.0002,0.0005,0.001,0.002,0.005,0.02")
    parser.add_argument(
        "--json",
        help="results file, its plot beside it (default: benchmarks/results/[quick/]adaptive_steps.json, "
        "early_stop.json with --early-stop)",
    )
    parser.add_argument("--update-readme", metavar="README")
    options = parser.parse_args(argv)
    loads = [float(v) for v in options.loads.split(",")]
    policies = [p.strip() for p in options.policies.split(",")]
    unknown = set(policies) - set(POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; known: {', '.join(POLICIES)}")
    if options.early_stop:
        thresholds = [float(t) for t in options.thresholds.split(",")]
        results = early_stop_study(options.size, thresholds, 1 if options.quick else 2, model=options.model)
        json_path = results_path("early_stop", options.quick, options.json)
        publish(results, json_path, early_stop_markdown(results), options.update_readme, "early_stop")
        return 0
    requests, seeds, capacity_requests = options.requests, options.seeds, 24
    if options.quick:
        loads, requests, seeds, capacity_requests = [0.5, 2.0], 16, 2, 16
    results = run(
        options.size, loads, policies, requests, seeds, options.target_factor, capacity_requests, options.model
    )
    json_path = results_path(SECTION, options.quick, options.json)
    plot(results, plot_path(json_path))
    for row in results["runs"]:
        row.pop("steps")  # per-request detail: only for the comparison above
    publish(results, json_path, markdown(results), options.update_readme, SECTION)
    print(f"plot: {plot_path(json_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
