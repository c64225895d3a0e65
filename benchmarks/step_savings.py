"""Step savings: what each sampler costs and draws at each step count, on the portrait model.

Reproduce (about 25 minutes on the 2-core development machine; `--quick`: about 3):

    .venv/bin/python -m benchmarks.step_savings [--prompts 48] [--quick] [--json PATH] [--update-readme README.md]

For DDIM, DPM-Solver++ 2M, DPM-Solver++ 2M with Karras sigmas and UniPC (deployments/denoiser/
solvers.py) x steps {10, 15, 20, 30, 50}, at 128x128 with guidance 7.5:

- **UNet GMACs per image**: one UNet forward (both classifier-free-guidance rows) counted with
  `torch.utils.flop_counter` (MACs = FLOPs / 2), times the steps.
- **ms per image** at batch 1 (a job alone in the step loop) and batch 8 (8 jobs side by side),
  through the served engine (`DenoiserEngine`); settings measured in rounds, the order reversed
  every round (this machine drifts), the median kept.
- **Adherence** on held-out attribute combinations (never seen in training; the full structured
  caption as the prompt), read by the judge, and **PSNR** against DDIM at 50 steps with the
  same seed (how close a cheaper setting comes to the most expensive picture).

Cache interval is 1 for every row: feature caching across steps (DeepCache) is not built yet.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import UTC, datetime

import numpy as np

from benchmarks.readme_table import command_line, plot_path, publish, results_path

SECTION = "step_savings"
MODEL = "portrait"
SOLVER_NAMES = ("ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
STEP_COUNTS = (10, 15, 20, 30, 50)
GUIDANCE = 7.5
REFERENCE = ("ddim", 50)


def unet_gmacs_per_step(model_dir) -> float:
    """GMACs of one UNet forward on the two guidance rows of one image."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from deployments.models import loading

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    side = loading.native_size(model_dir) // 8
    hidden = unet.config.cross_attention_dim
    sample = torch.zeros(2, unet.config.in_channels, side, side)
    context = torch.zeros(2, 77, hidden)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor([500, 500]), context)
    return counter.get_total_flops() / 2 / 1e9


def timings(model_dir, settings: list[tuple[str, int]], rounds: int) -> dict[tuple[str, int], dict[str, float]]:
    """Median ms per image of each setting at batch 1 and batch 8, in rounds of alternating order."""
    import torch

    from deployments.denoiser.engine import DenoiseJob, DenoiserEngine
    from deployments.denoiser.settings import DenoiserSettings
    from deployments.text_encoder.engine import TextEncoderEngine

    encoder = TextEncoderEngine(model_dir, cache={"enabled": False})
    hidden = encoder.encode(["portrait of a woman", ""], "default").hidden
    engine = DenoiserEngine(model_dir, settings=DenoiserSettings(max_batch_size=8))

    def job(seed: int, name: str, steps: int) -> DenoiseJob:
        side = 128
        return DenoiseJob(hidden[0:1], hidden[1:2], side, side, [seed], steps, GUIDANCE, name)

    def per_image_ms(name: str, steps: int, batch: int) -> float:
        start = time.perf_counter()
        futures = [engine.submit(job(seed, name, steps)) for seed in range(batch)]
        for future in futures:
            future.result(timeout=600)
        return (time.perf_counter() - start) * 1000 / batch

    torch.manual_seed(0)
    per_image_ms("ddim", 4, 8)  # warm-up
    samples: dict[tuple[str, int], dict[str, list[float]]] = {s: {"b1": [], "b8": []} for s in settings}
    for round_index in range(rounds):
        order = settings if round_index % 2 == 0 else list(reversed(settings))
        for setting in order:
            samples[setting]["b1"].append(per_image_ms(*setting, 1))
            samples[setting]["b8"].append(per_image_ms(*setting, 8))
    return {s: {k: statistics.median(v) for k, v in d.items()} for s, d in samples.items()}


def quality(model_dir, settings: list[tuple[str, int]], count: int) -> dict[tuple[str, int], dict[str, float]]:
    """Adherence on `count` held-out prompts and PSNR vs DDIM-50, per setting."""
    import diffusers

    from deployments.denoiser.solvers import SOLVERS
    from deployments.models.portrait.evaluation import (
        adherence_report,
        generate,
        held_out_prompts,
        load_pipeline,
        read_prompts,
    )
    from deployments.models.portrait.judge import Judge

    judge = Judge.packaged()
    prompts = held_out_prompts(count)
    texts, seeds = [p.prompt for p in prompts], [p.seed for p in prompts]
    asked = read_prompts(model_dir, texts)
    pipe = load_pipeline(model_dir)
    base_config = pipe.scheduler.config
    images = {}
    for name, steps in [REFERENCE, *[s for s in settings if s != REFERENCE]]:
        solver = SOLVERS[name]
        pipe.scheduler = from_first_step(
            getattr(diffusers, solver.scheduler_class).from_config(base_config, **solver.settings)
        )
        images[(name, steps)] = generate(pipe, texts, seeds, steps, guidance_scale=GUIDANCE)
        print(f"  {name} {steps} steps: {len(texts)} images", flush=True)
    reference = [np.asarray(image, dtype=np.float64) for image in images[REFERENCE]]
    results = {}
    for setting in settings:
        report = adherence_report(asked, judge.read(images[setting]))
        psnr = [psnr_db(np.asarray(image, dtype=np.float64), ref) for image, ref in zip(images[setting], reference)]
        results[setting] = {"adherence": report.overall, "psnr_db": float(np.mean(psnr))}
    return results


def from_first_step(scheduler):
    """`scheduler`, starting at its first timestep after every set_timesteps (as the engine's
    solvers.make_scheduler does: diffusers' pipeline would look a repeated Karras timestep up and
    start at the second)."""
    set_timesteps = scheduler.set_timesteps

    def set_timesteps_from_the_first(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    scheduler.set_timesteps = set_timesteps_from_the_first
    return scheduler


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run(options: argparse.Namespace) -> dict:
    from deployments.models import loading

    model_dir = loading.resolve_model(MODEL)
    settings = [(name, steps) for name in SOLVER_NAMES for steps in options.steps]
    gmacs = unet_gmacs_per_step(model_dir)
    print(f"UNet: {gmacs:.3f} GMACs per step (both guidance rows)", flush=True)
    print("timings...", flush=True)
    times = timings(model_dir, settings, options.rounds)
    print("adherence...", flush=True)
    drawn = quality(model_dir, settings, options.prompts)
    rows = [
        {
            "scheduler": name,
            "steps": steps,
            "cache_interval": 1,
            "gmacs_per_image": round(gmacs * steps, 2),
            "ms_per_image_b1": round(times[(name, steps)]["b1"], 1),
            "ms_per_image_b8": round(times[(name, steps)]["b8"], 1),
            "adherence": round(drawn[(name, steps)]["adherence"], 4),
            "psnr_db": round(drawn[(name, steps)]["psnr_db"], 2),
        }
        for name, steps in settings
    ]
    return {"settings": rows, "prompts": options.prompts, "rounds": options.rounds, "unet_gmacs_per_step": gmacs}


def pareto(rows: list[dict]) -> list[dict]:
    """The settings no other beats on both ms per image (batch 8) and adherence."""
    return [
        row
        for row in rows
        if not any(
            other["ms_per_image_b8"] <= row["ms_per_image_b8"]
            and other["adherence"] >= row["adherence"]
            and (other["ms_per_image_b8"], other["adherence"]) != (row["ms_per_image_b8"], row["adherence"])
            for other in rows
        )
    ]


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in SOLVER_NAMES:
        rows = [r for r in results["settings"] if r["scheduler"] == name]
        axes.plot([r["ms_per_image_b8"] for r in rows], [r["adherence"] for r in rows], "o-", label=name)
        for row in rows:
            axes.annotate(str(row["steps"]), (row["ms_per_image_b8"], row["adherence"]), fontsize=7)
    front = sorted(pareto(results["settings"]), key=lambda r: r["ms_per_image_b8"])
    axes.plot([r["ms_per_image_b8"] for r in front], [r["adherence"] for r in front], "k--", lw=0.8, label="Pareto")
    axes.set_xlabel("ms per image at batch 8 (128x128, 2 cores)")
    axes.set_ylabel(f"adherence ({results['prompts']} held-out prompts)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(results: dict) -> str:
    front = {(r["scheduler"], r["steps"]) for r in pareto(results["settings"])}
    lines = [
        "| sampler | steps | cache interval | UNet GMACs / image | ms / image, batch 1 | ms / image, batch 8 "
        "| adherence | PSNR vs DDIM-50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["settings"]:
        mark = " ◆" if (r["scheduler"], r["steps"]) in front else ""
        psnr = "ref" if (r["scheduler"], r["steps"]) == REFERENCE else f"{r['psnr_db']} dB"
        lines.append(
            f"| {r['scheduler']}{mark} | {r['steps']} | {r['cache_interval']} | {r['gmacs_per_image']} | "
            f"{r['ms_per_image_b1']} | {r['ms_per_image_b8']} | {100 * r['adherence']:.1f}% | {psnr} |"
        )
    setup = results["setup"]
    lines += [
        "",
        f"<sub>◆ on the Pareto front (adherence vs ms at batch 8). `{setup['command']}`, {setup['machine']}, "
        f"{setup['date']}; {results['prompts']} held-out prompts, median of {results['rounds']} interleaved rounds."
        "</sub>",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts for adherence and PSNR")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (order reversed every round)")
    parser.add_argument("--quick", action="store_true", help="8 prompts, steps {10, 20, 50}, 1 round")
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]step_savings.json)")
    parser.add_argument("--update-readme", metavar="README", help="rewrite the README's step-savings table")
    options = parser.parse_args(argv)
    options.steps = STEP_COUNTS
    if options.quick:
        options.prompts, options.rounds, options.steps = 8, 1, (10, 20, 50)
    started = time.perf_counter()
    results = run(options)
    results["setup"] = {
        "model": MODEL,
        "command": command_line("benchmarks.step_savings"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    json_path = results_path(SECTION, options.quick, options.json)
    plot(results, plot_path(json_path))
    publish(results, json_path, table(results), options.update_readme, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
