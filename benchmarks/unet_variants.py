"""UNet variants on this machine: speed vs torch fp32, and what they cost in the picture.

For each variant (backend x precision x layout, pruned copies), in one run on the same prompts
and seeds: ms per UNet step (a guided step at batch 2, the median of 30 timed forwards, the
variants taking turns, three forwards each after a settling pause, so that the machine's
drift falls on all of them alike), the
speed-up over torch fp32, the PSNR of the final image against the torch fp32 image (full
pipeline: the same text encoder and VAE, only the UNet differs) and, on the portrait model,
the judge's adherence on held-out attribute combinations (their full structured captions). A
variant is *allowed* when its adherence is within `--max-adherence-drop` (2 points) of torch
fp32's and its mean PSNR is at least `--min-psnr` dB (the quality guard's 32 dB).

    .venv/bin/python -m benchmarks.unet_variants [--model portrait] [--prompts 48] [--steps 15] \
        [--update-readme README.md]
    .venv/bin/python -m benchmarks.unet_variants --quick     # 8 prompts, 4 steps: every variant runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from functools import partial

from benchmarks.readme_table import command_line, publish, results_path
from benchmarks.turns import time_in_turns

SECTION = "unet_variants"
PROMPTS = [
    "Asian man, age:35, smiling expression, wearing glasses, photorealistic",
    "elderly woman, long red hair, side view, soft lighting",
    "young man, short black hair, beard, studio lighting, plain grey background",
    "woman, age:28, neutral expression, earrings, sharp focus",
]
VARIANTS = [
    {"backend": "torch", "precision": "fp32"},
    {"backend": "torch", "precision": "fp32", "channels_last": True},
    {"backend": "torch", "precision": "bf16"},
    {"backend": "torch", "precision": "bf16", "channels_last": True},
    {"backend": "onnxruntime", "precision": "fp32"},
    {"backend": "onnxruntime", "precision": "int8"},
    {"backend": "torch", "precision": "fp32", "prune": 0.3},
    {"backend": "torch", "precision": "fp32", "prune": 0.5},
]
TIMING_ROUNDS = 10  # each a turn of turns.PER_TURN timed forwards per variant


def prompts_for(model: str, count: int) -> tuple[list[str], list[int], list | None]:
    """Held-out portrait prompts (with what each asks, for the judge) on the portrait model;
    the fixed list elsewhere (no judge: its models draw noise)."""
    if model != "portrait":
        return PROMPTS, [0] * len(PROMPTS), None
    from deployments.models import loading
    from deployments.models.portrait.evaluation import held_out_prompts, read_prompts

    held_out = held_out_prompts(count)
    texts = [p.prompt for p in held_out]
    return texts, [p.seed for p in held_out], read_prompts(loading.resolve_model(model), texts)


def run(
    model: str,
    size: int | None,
    steps: int,
    count: int,
    threads: int,
    min_psnr: float,
    max_adherence_drop: float,
) -> dict:
    import torch

    from deployments.common.vae_scale import VAE_SCALE_FACTOR
    from deployments.denoiser.backends import BackendSpec
    from deployments.denoiser.engine import DenoiseJob, DenoiserEngine
    from deployments.denoiser.pruning import save_pruned_variant
    from deployments.models import loading
    from deployments.text_encoder.engine import TextEncoderEngine
    from deployments.vae.codec import VaeCodecEngine
    from serve_app.flow.quality import psnr_db

    torch.set_num_threads(threads)
    path = loading.resolve_model(model)
    size = size or loading.native_size(path)
    encoder = TextEncoderEngine(path, threads)
    vae = VaeCodecEngine(path, threads)
    texts, seeds, asked = prompts_for(model, count)
    judge = None
    if asked is not None:
        from deployments.models.portrait.evaluation import adherence_report
        from deployments.models.portrait.judge import Judge

        judge = Judge.packaged()
    contexts = [encoder.encode([prompt, ""]).hidden for prompt in texts]
    jobs = [DenoiseJob(c[0:1], c[1:2], size, size, [seed], steps, 7.5) for c, seed in zip(contexts, seeds)]
    config = loading.load_unet_config(path)
    latent = size // VAE_SCALE_FACTOR
    sample = torch.randn(2, config["in_channels"], latent, latent)
    timestep, context = torch.tensor([500, 500]), contexts[0].clone()

    built = []  # (name, reduction, spec, engine) of each variant that runs here
    for variant in VARIANTS:
        variant = dict(variant)
        prune = variant.pop("prune", 0.0)
        spec = BackendSpec(**variant)
        model_path, name, reduction = path, spec.name, 0.0
        if prune:  # a pruned variant folder, in the model cache (rebuilt each run: cheap)
            model_path = loading.cache_dir() / "variants" / f"{path.name}-pruned{round(prune * 100)}"
            reduction = save_pruned_variant(path, model_path, prune)["params_reduction"]
            name = f"{spec.name}, pruned {prune:.0%}"
        try:
            engine = DenoiserEngine(model_path, threads, {"max_batch_size": 8, "backends": [spec.model_dump()]})
        except Exception as error:
            print(f"{spec.name}: unavailable ({error})", flush=True)
            continue
        engine.unet(sample, timestep, context)  # warm-up (and ONNX export on first use)
        built.append((name, reduction, spec, engine))
    times = time_in_turns(
        {name: partial(engine.unet, sample, timestep, context) for name, _, _, engine in built}, TIMING_ROUNDS
    )

    reference, rows = None, []
    for name, reduction, spec, engine in built:
        futures = [engine.submit(job) for job in jobs]  # side by side: images do not depend on their batch
        images = [vae.decode_pixels(future.result())[0] for future in futures]
        if reference is None:
            reference = images
        scores = [psnr_db(a, b) for a, b in zip(images, reference)]
        finite = [s for s in scores if math.isfinite(s)]
        mean_psnr = statistics.mean(finite) if finite else math.inf
        row = {
            "name": name,
            "backend": spec.backend,
            "precision": spec.precision,
            "channels_last": spec.channels_last,
            "params_reduction": reduction,
            "ms_per_step": round(statistics.median(times[name]), 2),
            "psnr_db": round(mean_psnr, 2),
            "min_psnr_db": round(min(scores), 2),
        }
        if judge is not None and asked is not None:
            from PIL import Image

            report = adherence_report(asked, judge.read([Image.fromarray(image) for image in images]))
            row["adherence"] = round(report.overall, 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0]["ms_per_step"]
    for row in rows:
        row["speedup"] = round(base / row["ms_per_step"], 3)
        close_enough = "adherence" not in row or row["adherence"] >= rows[0]["adherence"] - max_adherence_drop
        row["allowed"] = row["psnr_db"] >= min_psnr and close_enough
    return {
        "variants": rows,
        "config": {
            "model": model,
            "size": size,
            "steps": steps,
            "images": len(jobs),
            "min_psnr_db": min_psnr,
            "max_adherence_drop": max_adherence_drop,
            "threads": threads,
            "command": command_line("benchmarks.unet_variants"),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
            "torch": torch.__version__,
        },
    }


def markdown(results: dict) -> str:
    c = results["config"]
    judged = "adherence" in results["variants"][0]
    rule = f"≥ {c['min_psnr_db']:g} dB" + (
        f" and adherence within {100 * c['max_adherence_drop']:g} points" if judged else ""
    )
    lines = [
        "| variant | UNet parameters removed | ms per step | speed-up vs fp32 | PSNR vs fp32 (mean / min) "
        + ("| adherence " if judged else "")
        + f"| allowed ({rule}) |",
        "|---|---:|---:|---:|---:|" + ("---:|" if judged else "") + "---|",
    ]
    for r in results["variants"]:
        mean = "identical" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.1f} dB"
        low = "identical" if math.isinf(r["min_psnr_db"]) else f"{r['min_psnr_db']:.1f} dB"
        lines.append(
            f"| {r['name']} | {r['params_reduction']:.0%} | {r['ms_per_step']:.1f} | {r['speedup']:.2f}x "
            f"| {mean} / {low} "
            + (f"| {100 * r['adherence']:.1f}% " if judged else "")
            + f"| {'yes' if r['allowed'] else 'no'} |"
        )
    lines += [
        "",
        f"{c['model']} model, {c['size']}x{c['size']}, {c['steps']} steps, {c['images']} images"
        + (" (held-out prompts)" if judged else "")
        + f"; a guided step at batch 2; {c['threads']} threads, {c['machine']}, torch {c['torch']}; "
        f"{c['date'][:10]}; `{c['command'].strip()}`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from serve_app.config import QualityGuardSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 prompts, 4 steps")
    parser.add_argument("--model", default="portrait", help="portrait (judged) or another model (PSNR only)")
    parser.add_argument("--size", type=int, help="default: the model's native size")
    parser.add_argument("--steps", type=int, default=15, help="default: the step controller's balanced choice")
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts (portrait model)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--min-psnr",
        type=float,
        default=QualityGuardSettings().min_psnr_db,
        help="mean PSNR a variant needs to be allowed (default: the quality guard's, %(default)s dB)",
    )
    parser.add_argument(
        "--max-adherence-drop",
        type=float,
        default=QualityGuardSettings().max_adherence_drop,
        help="most adherence a variant may lose against torch fp32 (default: the quality guard's, %(default)s)",
    )
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]unet_variants.json)")
    parser.add_argument("--update-readme", metavar="README")
    options = parser.parse_args(argv)
    steps, count = (4, 8) if options.quick else (options.steps, options.prompts)
    results = run(
        options.model, options.size, steps, count, options.threads, options.min_psnr, options.max_adherence_drop
    )
    json_path = results_path(SECTION, options.quick, options.json)
    publish(results, json_path, markdown(results), options.update_readme, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
