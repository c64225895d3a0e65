"""Streaming: what partial images cost, and how faithful each previewer is.

Reproduce (the full run takes about three minutes on the 2-core development machine):

    .venv/bin/python -m benchmarks.streaming [--quick] [--json PATH] [--update-readme README.md]

On the portrait model at its native 128x128, 20 steps, guidance 7.5:

1. **Previewers** (in process): final latents of held-out prompts are decoded by the VAE and by
   the trained previewer (deployments/vae/previewer.py), alternating which goes first: ms per
   partial image (PNG encoding included) and fidelity, the PSNR of the previewer's picture of the
   final latent against the VAE's decode of it.
2. **Throughput** (the served DAG over HTTP, concurrency 8): rounds of plain requests and of
   `stream: true, partial_images: 3` requests, in the order A B B A ... (this machine drifts),
   images per second of each; the cost of streaming is 1 - streamed / plain.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.readme_table import command_line, publish, results_path
from benchmarks.serving_overhead import (
    check_port_free,
    deploy_dag,
    http_client,
    start_ray,
    stop_ray,
    wait_for_route,
)

SECTION = "streaming"
MODEL = "portrait"
STEPS = 20
CONCURRENCY = 8
PARTIAL_IMAGES = 3


# --------------------------------------------------------------------------- previewers


def final_latents(model_path: Path, count: int):
    """The final latents of `count` held-out prompts (DDIM, 20 steps, guidance 7.5)."""
    import torch

    from deployments.denoiser.engine import DenoiseJob, DenoiserEngine
    from deployments.models.portrait.evaluation import held_out_prompts
    from deployments.text_encoder.engine import TextEncoderEngine

    encoder, denoiser = TextEncoderEngine(model_path), DenoiserEngine(model_path)
    latents = []
    for prompt in held_out_prompts(count):
        hidden = encoder.encode([prompt.prompt, ""]).hidden
        job = DenoiseJob(hidden[0:1], hidden[1:2], 128, 128, [prompt.seed], STEPS, 7.5)
        latents.append(denoiser.submit(job).result())
    return torch.cat(latents)


def measure_previewers(model_path: Path, count: int) -> dict:
    from PIL import Image

    from deployments.vae.codec import VaeCodecEngine
    from deployments.vae.previewer import psnr_db

    latents = final_latents(model_path, count)
    engines = {"vae": VaeCodecEngine(model_path, previewer="vae"), "previewer": VaeCodecEngine(model_path)}
    if engines["previewer"].previewer is None:
        raise SystemExit(f"{model_path} has no trained previewer (previewer/): train-model portrait trains one")
    ms: dict[str, list[float]] = {name: [] for name in engines}
    pixels: dict[str, list] = {name: [] for name in engines}
    names = list(engines)
    for index in range(len(latents)):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            png = engines[name].preview_png(latents[index : index + 1])[0]
            ms[name].append((time.perf_counter() - start) * 1000.0)
            pixels[name].append(Image.open(io.BytesIO(png)).convert("RGB"))
    import numpy as np
    import torch

    def tensor(image):
        return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1.0)

    fidelity = [psnr_db(tensor(a), tensor(b)) for a, b in zip(pixels["previewer"], pixels["vae"])]
    return {
        "images": len(latents),
        "ms_per_partial_image": {name: round(statistics.median(values), 2) for name, values in ms.items()},
        "fidelity_psnr_db": {"vae": None, "previewer": round(statistics.fmean(fidelity), 2)},
        "fidelity_psnr_db_min": round(min(fidelity), 2),
    }


# --------------------------------------------------------------------------- throughput


def body(index: int, streamed: bool) -> dict:
    fields = {
        "prompt": f"portrait of a smiling woman, round glasses, plain blue background #{index}",
        "seed": 5000 + index,
        "num_inference_steps": STEPS,
        "guidance_scale": 7.5,
    }
    return {**fields, "stream": True, "partial_images": PARTIAL_IMAGES} if streamed else fields


async def send(client, streamed: bool, index: int) -> int:
    """One request; the partial images it got."""
    if not streamed:
        response = await client.post("/v1/images/generations", json=body(index, False))
        response.raise_for_status()
        return 0
    partials, completed = 0, False
    async with client.stream("POST", "/v1/images/generations", json=body(index, True)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            partials += line == "event: image_generation.partial_image"
            completed |= line == "event: image_generation.completed"
    if not completed:
        raise RuntimeError("a stream ended without its completed event")
    return partials


async def closed_loop_round(client, streamed: bool, requests: int, first_index: int) -> tuple[float, list[int]]:
    pending = iter(range(first_index, first_index + requests))
    partials: list[int] = []

    async def worker() -> None:
        for index in pending:
            partials.append(await send(client, streamed, index))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - start, partials


async def measure_throughput(port: int, rounds: int, per_round: int) -> dict:
    busy = {"plain": 0.0, "streamed": 0.0}
    done = {"plain": 0, "streamed": 0}
    partials: list[int] = []
    async with http_client(port, CONCURRENCY) as client:
        await wait_for_route(client, "/healthz")
        await closed_loop_round(client, False, CONCURRENCY, 0)  # warm-up, not counted
        await closed_loop_round(client, True, CONCURRENCY, 0)
        index = 100
        for number in range(rounds):
            for mode in ("plain", "streamed") if number % 2 == 0 else ("streamed", "plain"):
                seconds, got = await closed_loop_round(client, mode == "streamed", per_round, index)
                index += per_round
                busy[mode] += seconds
                done[mode] += per_round
                if mode == "streamed":
                    partials += got
                print(f"  round {number + 1}/{rounds} {mode}: {per_round / seconds:.2f} images/s", flush=True)
    rate = {mode: done[mode] / busy[mode] for mode in busy}
    return {
        "concurrency": CONCURRENCY,
        "partial_images": PARTIAL_IMAGES,
        "requests_per_mode": done["plain"],
        "images_per_s": {mode: round(value, 3) for mode, value in rate.items()},
        "throughput_cost": round(1 - rate["streamed"] / rate["plain"], 4),
        "partial_images_received_mean": round(statistics.fmean(partials), 2),
    }


def run(options: argparse.Namespace) -> dict:
    from deployments.models import loading
    from serve_app.ops.cli import load_serve_config, split_app_config

    model_path = loading.resolve_model(MODEL)
    print("previewers...", flush=True)
    previewers = measure_previewers(model_path, options.images)
    print(json.dumps(previewers), flush=True)
    serve_config = load_serve_config("serve_config.yaml")
    settings, deployment_options, _ = split_app_config(serve_config, MODEL)
    check_port_free(options.port)
    start_ray(2, options.port, serve_config)
    try:
        deploy_dag(settings, deployment_options)
        print(f"throughput at concurrency {CONCURRENCY}...", flush=True)
        throughput = asyncio.run(measure_throughput(options.port, options.rounds, options.per_round))
    finally:
        stop_ray()
    return {"previewers": previewers, "throughput": throughput}


def table(results: dict) -> str:
    previewers, throughput = results["previewers"], results["throughput"]
    ms, fidelity = previewers["ms_per_partial_image"], previewers["fidelity_psnr_db"]
    rate = throughput["images_per_s"]
    lines = [
        "| previewer | ms per partial image (128x128, PNG included) | PSNR of the final latent's preview vs the VAE |",
        "|---|---|---|",
        f"| VAE decoder | {ms['vae']} | exact (it is the VAE) |",
        f"| trained previewer (`previewer/`, served, in the Denoiser) | {ms['previewer']} | {fidelity['previewer']} dB "
        f"(min {previewers['fidelity_psnr_db_min']}) |",
        "",
        f"| concurrency {throughput['concurrency']}, {STEPS} steps | images/s | cost |",
        "|---|---|---|",
        f"| plain | {rate['plain']} | |",
        f"| `stream: true, partial_images: {throughput['partial_images']}` | {rate['streamed']} | "
        f"{100 * throughput['throughput_cost']:.1f}% |",
        "",
        f"<sub>`{results['setup']['command']}`, {results['setup']['machine']}, {results['setup']['date']}; "
        f"{previewers['images']} held-out prompts, {throughput['requests_per_mode']} requests per mode in "
        "interleaved rounds.</sub>",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="held-out prompts for the previewer figures")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each mode (A B B A ...)")
    parser.add_argument("--per-round", type=int, default=16, help="requests per round")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--quick", action="store_true", help="4 prompts, 2 rounds of 8 requests")
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]streaming.json)")
    parser.add_argument("--update-readme", metavar="README", help="rewrite the README's streaming table")
    options = parser.parse_args(argv)
    if options.quick:
        options.images, options.rounds, options.per_round = 4, 2, 8
    started = time.perf_counter()
    results = run(options)
    results["setup"] = {
        "model": MODEL,
        "steps": STEPS,
        "command": command_line("benchmarks.streaming"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    publish(results, results_path(SECTION, options.quick, options.json), table(results), options.update_readme, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
