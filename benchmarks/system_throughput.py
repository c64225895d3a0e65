"""System throughput: the served app against the single-deployment baseline shaped like Ray
Serve's Stable Diffusion example, at the portrait model's native size, judged on adherence too.

Reproduce (about 15 minutes on the 2-core development machine; `--quick`: about 5):

    .venv/bin/python -m benchmarks.system_throughput [--quick] [--json PATH] [--update-readme README.md]

Both applications are deployed in one Ray instance (`serving_overhead.py` builds them: the
baseline is one FastAPI ingress and ONE deployment holding a diffusers StableDiffusionPipeline
with the model's own scheduler, one request at a time, given the DAG's CPU shares). Closed
loops at concurrency 1, 4 and 8 over held-out portrait prompts (full structured captions, as
written: `optimize_prompt` off), fixed seeds; the modes alternate block by block (served,
baseline, baseline, served, ...) so this machine's drift hits both. Two comparisons:

- `same_settings`: both at DDIM and the same steps (20); ours may cache UNet features across
  steps as its controller chooses for DDIM at 20 steps from the measured table: what step-level
  batching and feature caching alone buy;
- `defaults`: the baseline at 50 steps, as that example runs it; ours at the step controller's
  choice (sampler, steps and cache interval from configs/samplers/portrait.json).

Adherence of each run's images is read by the judge (deployments/models/portrait/judge.py).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import os
import platform
import time
from datetime import UTC, datetime

from benchmarks.readme_table import command_line, plot_path, publish, results_path
from benchmarks.stats import percentile

SECTION = "system_throughput"
MODEL = "portrait"
LEVELS = (1, 4, 8)
GUIDANCE = 7.5
SAME_STEPS = 20
BASELINE_DEFAULT_STEPS = 50  # Ray Serve's example calls the pipeline with diffusers' default


def bodies(prompts: list, comparison: str, count: int, offset: int) -> list[dict]:
    """Request bodies for our API (the baseline sender reads the same fields)."""
    chosen = []
    for index in range(offset, offset + count):
        prompt = prompts[index % len(prompts)]
        body = {
            "prompt": prompt.prompt,
            "n": 1,
            "size": "128x128",
            "seed": 5000 + index,
            "guidance_scale": GUIDANCE,
            "optimize_prompt": False,
            "index": index,
        }
        if comparison == "same_settings":
            body.update(num_inference_steps=SAME_STEPS, scheduler="ddim")
        chosen.append(body)
    return chosen


def served_body(body: dict) -> dict:
    return {key: value for key, value in body.items() if key != "index"}


def baseline_body(body: dict) -> dict:
    """The baseline runs its scheduler (DDIM) at the comparison's steps."""
    return {**body, "num_inference_steps": body.get("num_inference_steps", BASELINE_DEFAULT_STEPS)}


async def closed_loop(send, chosen: list[dict], concurrency: int) -> tuple[list[float], float, dict[int, bytes], list]:
    """(latencies in s, wall s, PNG by request index, the usage of our answers)."""
    pending = iter(chosen)
    latencies: list[float] = []
    images: dict[int, bytes] = {}
    usages: list = []

    async def client() -> None:
        for body in pending:
            start = time.perf_counter()
            png, usage = await send(body)
            latencies.append(time.perf_counter() - start)
            images[body["index"]] = png
            if usage is not None:
                usages.append(usage)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start, images, usages


def senders(client):
    import base64

    from benchmarks.serving_overhead import BASELINE_PREFIX, _raise_for_status

    async def served(body: dict):
        response = await client.post("/v1/images/generations", json=served_body(body))
        _raise_for_status(response)
        answer = response.json()
        return base64.b64decode(answer["data"][0]["b64_json"]), answer["usage"]

    async def baseline(body: dict):
        body = baseline_body(body)
        params = {
            "prompt": body["prompt"],
            "img_size": 128,
            "seed": body["seed"],
            "steps": body["num_inference_steps"],
            "guidance_scale": body["guidance_scale"],
        }
        response = await client.get(f"{BASELINE_PREFIX}/imagine", params=params)
        _raise_for_status(response)
        return response.content, None

    return {"served": served, "single_deployment": baseline}


def setting_name(usage: dict) -> str:
    """sampler/steps/cache interval of one of our answers."""
    return f"{usage['scheduler'] or 'ddim'}/{usage['num_inference_steps']}/{usage['cache_interval']}"


def adherence(judge, model_dir, prompts_by_index: dict[int, str], images: dict[int, bytes]) -> float:
    from PIL import Image

    from deployments.models.portrait.evaluation import adherence_report, read_prompts

    indices = sorted(images)
    asked = read_prompts(model_dir, [prompts_by_index[i] for i in indices])
    pictures = [Image.open(io.BytesIO(images[i])).convert("RGB") for i in indices]
    return adherence_report(asked, judge.read(pictures)).overall


async def measure(options: argparse.Namespace, model_dir) -> list[dict]:
    from benchmarks.serving_overhead import BASELINE_PREFIX, http_client, wait_for_route
    from deployments.models.portrait.evaluation import held_out_prompts
    from deployments.models.portrait.judge import Judge

    judge = Judge.packaged()
    prompts = held_out_prompts(options.prompts)
    runs = []
    async with http_client(options.port, max(LEVELS) * 2) as client:
        await wait_for_route(client, "/healthz")
        await wait_for_route(client, f"{BASELINE_PREFIX}/openapi.json")
        send = senders(client)
        for mode in send:  # warm-up, not measured
            await send[mode](bodies(prompts, "same_settings", 1, 0)[0])
        offset, flip = 0, False
        for comparison in ("same_settings", "defaults"):
            for concurrency in LEVELS:
                chosen = bodies(prompts, comparison, max(options.requests, concurrency * 2), offset)
                offset += len(chosen)
                prompt_of = {body["index"]: body["prompt"] for body in chosen}
                order = ("single_deployment", "served") if flip else ("served", "single_deployment")
                flip = not flip
                for mode in order:
                    latencies, wall, images, usages = await closed_loop(send[mode], chosen, concurrency)
                    ms = [1000 * s for s in latencies]
                    run = {
                        "mode": mode,
                        "comparison": comparison,
                        "concurrency": concurrency,
                        "size": "128x128",
                        "requests": len(ms),
                        "rps": round(len(ms) / wall, 3),
                        "p50_ms": round(percentile(ms, 50), 1),
                        "p95_ms": round(percentile(ms, 95), 1),
                        "adherence": round(adherence(judge, model_dir, prompt_of, images), 4),
                    }
                    if usages:
                        run["settings"] = sorted({setting_name(usage) for usage in usages})
                    else:
                        steps = SAME_STEPS if comparison == "same_settings" else BASELINE_DEFAULT_STEPS
                        run["settings"] = [f"ddim/{steps}/1"]
                    print(
                        f"  {comparison:<13} {mode:<17} c={concurrency}: {run['rps']:.3f} rps, "
                        f"p50 {run['p50_ms']:.0f} ms, adherence {run['adherence']:.3f} {run['settings']}",
                        flush=True,
                    )
                    runs.append(run)
    return runs


def run(options: argparse.Namespace) -> dict:
    from benchmarks.serving_overhead import (
        check_port_free,
        dag_cpu_shares,
        deploy_baseline,
        deploy_dag,
        start_ray,
        stop_ray,
    )
    from deployments.models import loading
    from serve_app.ops.cli import load_serve_config, split_app_config

    serve_config = load_serve_config("serve_config.yaml")
    settings, deployment_options, _ = split_app_config(serve_config, MODEL)
    model_dir = loading.resolve_model(MODEL)
    shares = dag_cpu_shares(deployment_options)
    check_port_free(options.port)
    start_ray(math.ceil(2 * shares), options.port, serve_config)  # both apps deployed; one runs at a time
    try:
        deploy_dag(settings, deployment_options)
        deploy_baseline(model_dir, settings, deployment_options, shares)
        runs = asyncio.run(measure(options, model_dir))
    finally:
        stop_ray()
    return {"runs": runs, "cpu_shares_each": shares, "requests_per_level": options.requests}


def ratios(results: dict) -> dict[str, dict[int, float]]:
    """served rps over baseline rps, per comparison and concurrency."""
    by = {(r["mode"], r["comparison"], r["concurrency"]): r for r in results["runs"]}
    return {
        comparison: {
            level: round(
                by[("served", comparison, level)]["rps"] / by[("single_deployment", comparison, level)]["rps"], 2
            )
            for level in LEVELS
            if ("served", comparison, level) in by and ("single_deployment", comparison, level) in by
        }
        for comparison in ("same_settings", "defaults")
    }


def pooled_adherence(results: dict) -> dict[str, dict[str, float]]:
    """Adherence per comparison and mode over all its levels (equal-sized cells): one cell's
    16 images move it by several points, the comparison's 48 much less."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for run in results["runs"]:
        pooled.setdefault(run["comparison"], {}).setdefault(run["mode"], []).append(run["adherence"])
    return {c: {m: round(sum(v) / len(v), 4) for m, v in modes.items()} for c, modes in pooled.items()}


def table(results: dict) -> str:
    ratio = ratios(results)
    lines = [
        "| comparison | concurrency | served rps | baseline rps | served / baseline | p50 ms served / baseline "
        "| adherence served / baseline | settings served (sampler/steps/cache) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    by = {(r["mode"], r["comparison"], r["concurrency"]): r for r in results["runs"]}
    for comparison in ("same_settings", "defaults"):
        for level in LEVELS:
            ours, theirs = by.get(("served", comparison, level)), by.get(("single_deployment", comparison, level))
            if ours is None or theirs is None:
                continue
            lines.append(
                f"| {comparison} | {level} | {ours['rps']} | {theirs['rps']} | **{ratio[comparison][level]}x** | "
                f"{ours['p50_ms']:.0f} / {theirs['p50_ms']:.0f} | {100 * ours['adherence']:.1f}% / "
                f"{100 * theirs['adherence']:.1f}% | {', '.join(ours['settings'])} |"
            )
    pooled = pooled_adherence(results)
    lines += [
        "",
        "Adherence over all levels of a comparison, served / baseline: "
        + "; ".join(
            f"{c} {100 * pooled[c]['served']:.1f}% / {100 * pooled[c]['single_deployment']:.1f}%"
            for c in ("same_settings", "defaults")
            if {"served", "single_deployment"} <= set(pooled.get(c, {}))
        )
        + ".",
    ]
    setup = results["setup"]
    lines += [
        "",
        f"<sub>`{setup['command']}`, {setup['machine']}, {setup['date']}; portrait model at 128x128, guidance "
        f"{GUIDANCE}, {results['requests_per_level']} requests per level (at least 2 per client), modes alternating "
        f"block by block; the baseline at DDIM {SAME_STEPS} steps (same_settings) and {BASELINE_DEFAULT_STEPS} steps "
        "(defaults).</sub>",
    ]
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for axis, comparison in zip(axes, ("same_settings", "defaults")):
        for mode in ("served", "single_deployment"):
            rows = [r for r in results["runs"] if r["mode"] == mode and r["comparison"] == comparison]
            axis.plot([r["concurrency"] for r in rows], [r["rps"] for r in rows], "o-", label=mode)
        axis.set_title(comparison)
        axis.set_xlabel("concurrency")
        axis.set_xticks(list(LEVELS))
    axes[0].set_ylabel("requests / s (128x128, 2 cores)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16, help="requests per mode and level")
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts the requests cycle through")
    parser.add_argument("--port", type=int, default=8768)
    parser.add_argument("--quick", action="store_true", help="8 requests per level")
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]system_throughput.json)")
    parser.add_argument("--update-readme", metavar="README", help="rewrite the README's system-throughput table")
    options = parser.parse_args(argv)
    if options.quick:
        options.requests = 8
    started = time.perf_counter()
    results = run(options)
    results["ratios"] = ratios(results)
    results["pooled_adherence"] = pooled_adherence(results)
    results["setup"] = {
        "model": MODEL,
        "command": command_line("benchmarks.system_throughput"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    json_path = results_path(SECTION, options.quick, options.json)
    plot(results, plot_path(json_path))
    publish(results, json_path, table(results), options.update_readme, SECTION)
    print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
