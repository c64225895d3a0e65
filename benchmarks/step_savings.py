"""Step savings: what each sampler and cache interval costs and draws at each step count, on
the portrait model; the step controller's table (configs/samplers/portrait.json) comes from it.

Reproduce (about 35 minutes on the 2-core development machine; `--quick`: about 4):

    .venv/bin/python -m benchmarks.step_savings [--prompts 48] [--quick] [--json PATH] [--update-readme README.md]

For DDIM, DPM-Solver++ 2M and UniPC (deployments/denoiser/solvers.py) x steps {10, 15, 20, 30}
x feature-cache interval {1, 2, 3, 5} (DeepCache, branch 0: deployments/denoiser/deep_cache.py),
plus DDIM at 50 steps uncached (the reference), at 128x128 with guidance 7.5, everything through
the served engines (text encoder, `DenoiserEngine`'s step loop, VAE):

- **UNet GMACs per image**: a whole forward and a cached (shallow) forward on the two
  classifier-free-guidance rows of one image, counted with `torch.utils.flop_counter` (MACs =
  FLOPs / 2), times the steps of each kind.
- **ms per image** at batch 1 (a job alone in the step loop) and batch 8 (8 jobs side by side);
  settings measured in rounds, the order reversed every round (this machine drifts), the median
  kept. **Whole-step equivalents**: ms per image at batch 8 over one whole step's (the median
  of the uncached settings' ms per image per step): the controller's cost unit.
- **Adherence** on held-out attribute combinations (never seen in training; the full structured
  caption as the prompt), read by the judge, and **PSNR** against DDIM at 50 steps uncached
  with the same seed (how close a cheaper setting comes to the most expensive picture).

DPM-Solver++ 2M with Karras sigmas is left out: the previous run (48 prompts, git history of
this file's README table) measured it under the other three at every step count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.readme_table import command_line, plot_path, publish, results_path

SECTION = "step_savings"
MODEL = "portrait"
SOLVER_NAMES = ("ddim", "dpmpp_2m", "unipc")
STEP_COUNTS = (10, 15, 20, 30)
CACHE_INTERVALS = (1, 2, 3, 5)
GUIDANCE = 7.5
REFERENCE = ("ddim", 50, 1)
TABLE_PATH = Path("configs/samplers") / f"{MODEL}.json"

Setting = tuple[str, int, int]  # (sampler, steps, cache interval)


def unet_gmacs(model_dir) -> tuple[float, float]:
    """GMACs of a whole UNet forward and of a cached one (branch 0), on the two guidance rows of one image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deployments.denoiser.deep_cache import DeepCacheUNet
    from deployments.models import loading

    unet = loading.load_unet(model_dir)
    side = loading.native_size(model_dir) // 8
    sample = torch.zeros(2, unet.config.in_channels, side, side)
    context = torch.zeros(2, 77, unet.config.cross_attention_dim)
    timesteps = torch.tensor([500, 500])
    cached = DeepCacheUNet(unet)
    with torch.inference_mode():
        _, features = cached.full(sample, timesteps, context, [0])
        with FlopCounterMode(display=False) as whole:
            unet(sample, timesteps, context)
        with FlopCounterMode(display=False) as shallow:
            cached.shallow(sample, timesteps, context, features[0], 0)
    return whole.get_total_flops() / 2 / 1e9, shallow.get_total_flops() / 2 / 1e9


def whole_steps(steps: int, interval: int) -> int:
    """Steps on which the UNet runs whole: 0, interval, 2 x interval, ..."""
    return math.ceil(steps / interval)


class Engines:
    """The served engines in this process: prompts encoded once, images rendered through the step loop."""

    def __init__(self, model_dir):
        from deployments.denoiser.engine import DenoiserEngine
        from deployments.denoiser.settings import DenoiserSettings
        from deployments.models import loading
        from deployments.text_encoder.engine import TextEncoderEngine
        from deployments.vae.codec import VaeCodecEngine

        self.side = loading.native_size(model_dir)
        self.encoder = TextEncoderEngine(model_dir, cache={"enabled": False})
        self.denoiser = DenoiserEngine(model_dir, settings=DenoiserSettings(max_batch_size=8))
        self.vae = VaeCodecEngine(model_dir)
        self._hidden: dict[str, object] = {}

    def job(self, prompt: str, seed: int, setting: Setting):
        from deployments.denoiser.engine import DenoiseJob

        if prompt not in self._hidden:
            self._hidden[prompt] = self.encoder.encode([prompt, ""], "default").hidden
        hidden = self._hidden[prompt]
        name, steps, interval = setting
        return DenoiseJob(
            hidden[0:1], hidden[1:2], self.side, self.side, [seed], steps, GUIDANCE, name, cache_interval=interval
        )

    def latents(self, prompts: list[str], seeds: list[int], setting: Setting) -> list:
        futures = [self.denoiser.submit(self.job(p, s, setting)) for p, s in zip(prompts, seeds)]
        return [future.result(timeout=600) for future in futures]

    def images(self, prompts: list[str], seeds: list[int], setting: Setting) -> list:
        from PIL import Image

        return [Image.fromarray(self.vae.decode_pixels(x)[0]) for x in self.latents(prompts, seeds, setting)]


def timings(engines: Engines, settings: list[Setting], rounds: int) -> dict[Setting, dict[str, float]]:
    """Median ms per image of each setting at batch 1 and batch 8, in rounds of alternating order."""

    def per_image_ms(setting: Setting, batch: int) -> float:
        start = time.perf_counter()
        engines.latents(["portrait of a woman"] * batch, list(range(batch)), setting)
        return (time.perf_counter() - start) * 1000 / batch

    per_image_ms(("ddim", 4, 2), 8)  # warm-up
    samples: dict[Setting, dict[str, list[float]]] = {s: {"b1": [], "b8": []} for s in settings}
    for round_index in range(rounds):
        order = settings if round_index % 2 == 0 else list(reversed(settings))
        for setting in order:
            samples[setting]["b1"].append(per_image_ms(setting, 1))
            samples[setting]["b8"].append(per_image_ms(setting, 8))
        print(f"  timing round {round_index + 1}/{rounds}", flush=True)
    return {s: {k: statistics.median(v) for k, v in d.items()} for s, d in samples.items()}


def quality(model_dir, engines: Engines, settings: list[Setting], count: int) -> dict[Setting, dict[str, float]]:
    """Adherence on `count` held-out prompts and PSNR vs DDIM-50 uncached, per setting."""
    from deployments.models.portrait.evaluation import adherence_report, held_out_prompts, read_prompts
    from deployments.models.portrait.judge import Judge

    judge = Judge.packaged()
    prompts = held_out_prompts(count)
    texts, seeds = [p.prompt for p in prompts], [p.seed for p in prompts]
    asked = read_prompts(model_dir, texts)
    reference = [np.asarray(image, dtype=np.float64) for image in engines.images(texts, seeds, REFERENCE)]
    results = {}
    for setting in settings:
        images = engines.images(texts, seeds, setting)
        report = adherence_report(asked, judge.read(images))
        psnr = [psnr_db(np.asarray(image, dtype=np.float64), ref) for image, ref in zip(images, reference)]
        results[setting] = {"adherence": report.overall, "psnr_db": float(np.mean(psnr))}
        print(f"  {setting}: adherence {report.overall:.3f}", flush=True)
    return results


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run(options: argparse.Namespace) -> dict:
    from deployments.models import loading

    model_dir = loading.resolve_model(MODEL)
    settings = [(n, s, i) for n in SOLVER_NAMES for s in options.steps for i in options.intervals] + [REFERENCE]
    whole, shallow = unet_gmacs(model_dir)
    print(f"UNet: {whole:.3f} GMACs whole, {shallow:.3f} cached (both guidance rows)", flush=True)
    engines = Engines(model_dir)
    print("timings...", flush=True)
    times = timings(engines, settings, options.rounds)
    print("adherence...", flush=True)
    drawn = quality(model_dir, engines, settings, options.prompts)
    # one whole step's ms per image at batch 8: the median over the uncached settings
    whole_step_ms = statistics.median(times[s]["b8"] / s[1] for s in settings if s[2] == 1)
    rows = []
    for setting in settings:
        name, steps, interval = setting
        full = whole_steps(steps, interval)
        rows.append(
            {
                "scheduler": name,
                "steps": steps,
                "cache_interval": interval,
                "gmacs_per_image": round(whole * full + shallow * (steps - full), 2),
                "ms_per_image_b1": round(times[setting]["b1"], 1),
                "ms_per_image_b8": round(times[setting]["b8"], 1),
                "step_equivalents": round(times[setting]["b8"] / whole_step_ms, 2),
                "adherence": round(drawn[setting]["adherence"], 4),
                "psnr_db": round(drawn[setting]["psnr_db"], 2),
            }
        )
    return {
        "settings": rows,
        "prompts": options.prompts,
        "rounds": options.rounds,
        "unet_gmacs_per_step": whole,
        "unet_gmacs_per_cached_step": shallow,
        "whole_step_ms_b8": round(whole_step_ms, 2),
        "unet_digest": loading.unet_digest(model_dir),
    }


def sampler_table(results: dict) -> dict:
    """The step controller's table (serve_app/flow/sampler_table.py) from a full run."""
    keys = ("scheduler", "steps", "cache_interval", "step_equivalents", "adherence", "psnr_db")
    setup = results["setup"]
    return {
        "model": MODEL,
        "unet_digest": results["unet_digest"],
        "measured": f"{setup['command']}, {setup['machine']}, {setup['date']}, {results['prompts']} held-out prompts",
        "settings": [{key: row[key] for key in keys} for row in results["settings"]],
    }


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

    figure, axes = plt.subplots(figsize=(8, 5))
    markers = {1: "o", 2: "s", 3: "^", 5: "D"}
    for name in SOLVER_NAMES:
        for interval in sorted({r["cache_interval"] for r in results["settings"]}):
            rows = [r for r in results["settings"] if r["scheduler"] == name and r["cache_interval"] == interval]
            label = f"{name}, cache {interval}"
            xs, ys = [r["ms_per_image_b8"] for r in rows], [r["adherence"] for r in rows]
            axes.plot(xs, ys, markers.get(interval, "x") + "-", label=label, lw=0.7, ms=4)
            for row in rows:
                axes.annotate(str(row["steps"]), (row["ms_per_image_b8"], row["adherence"]), fontsize=6)
    front = sorted(pareto(results["settings"]), key=lambda r: r["ms_per_image_b8"])
    axes.plot([r["ms_per_image_b8"] for r in front], [r["adherence"] for r in front], "k--", lw=0.8, label="Pareto")
    axes.set_xlabel("ms per image at batch 8 (128x128, 2 cores)")
    axes.set_ylabel(f"adherence ({results['prompts']} held-out prompts)")
    axes.legend(fontsize=6, ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(results: dict) -> str:
    front = {(r["scheduler"], r["steps"], r["cache_interval"]) for r in pareto(results["settings"])}
    lines = [
        "| sampler | steps | cache interval | UNet GMACs / image | ms / image, batch 1 | ms / image, batch 8 "
        "| whole-step equivalents | adherence | PSNR vs DDIM-50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["settings"]:
        setting = (r["scheduler"], r["steps"], r["cache_interval"])
        mark = " ◆" if setting in front else ""
        psnr = "ref" if setting == REFERENCE else f"{r['psnr_db']} dB"
        lines.append(
            f"| {r['scheduler']}{mark} | {r['steps']} | {r['cache_interval']} | {r['gmacs_per_image']} | "
            f"{r['ms_per_image_b1']} | {r['ms_per_image_b8']} | {r['step_equivalents']} | "
            f"{100 * r['adherence']:.1f}% | {psnr} |"
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
    parser.add_argument("--quick", action="store_true", help="8 prompts, steps {10, 20}, intervals {1, 3}, 1 round")
    parser.add_argument(
        "--sampler-table",
        metavar="PATH",
        help=f"where to write the step controller's table (default: {TABLE_PATH} on a full run, none on --quick)",
    )
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]step_savings.json)")
    parser.add_argument("--update-readme", metavar="README", help="rewrite the README's step-savings table")
    options = parser.parse_args(argv)
    options.steps, options.intervals = STEP_COUNTS, CACHE_INTERVALS
    if options.quick:
        options.prompts, options.rounds, options.steps, options.intervals = 8, 1, (10, 20), (1, 3)
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
    table_path = options.sampler_table or (None if options.quick else TABLE_PATH)
    if table_path:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(json.dumps(sampler_table(results), indent=1) + "\n")
        print(f"step controller table: {table_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
