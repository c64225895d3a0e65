"""Edits vs generations, and the reference-face embedding cache, on the embedded model.

In one run, in-process (the served settings: same threads, same stages), sequential
requests at one size and step count:
- a generation, and img2img edits at strength 0.3 / 0.6 / 1.0 and an inpainting edit (mask,
  strength 1.0): median latency and its ratio to the generation. An edit runs only the last
  strength x steps, so its latency should fall roughly in proportion, plus the VAE encode.
- an edit with a reference face (image-prompt adapter), each time a new face (cache miss)
  vs the same face again (hit): the reference stage's time and the whole request's.

    .venv/bin/python -m benchmarks.edits [--quick] [--json PATH] [--update-readme README.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime

from benchmarks.readme_table import command_line, publish, results_path
from benchmarks.stats import percentile

SECTION = "edits"
PROMPT = "portrait of a smiling woman, age:30, soft lighting"


def synthetic_photo(size: int, seed: int):
    """Smooth gradients and a disc: structure for the VAE without any download."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0.3, 0.7, 2)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < 0.09).astype(np.float32)
    return Image.fromarray(((np.stack([x, y, disc], -1) * 0.8 + 0.1) * 255).astype(np.uint8))


def centre_mask(size: int):
    import numpy as np
    from PIL import Image

    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask, "L")


def run(size: int, steps: int, repeats: int) -> dict:
    from deployments.models import loading
    from serve_app.flow.pipeline import local_pipeline_for
    from serve_app.flow.request import ImageRequest
    from serve_app.ops.cli import DEFAULT_CONFIG, load_serve_config, split_app_config

    settings, _, _ = split_app_config(load_serve_config(DEFAULT_CONFIG), "tiny")
    pipeline = local_pipeline_for(loading.resolve_model("tiny"), settings)
    target = synthetic_photo(size, 0)

    def request(seed: int, **edit) -> ImageRequest:
        return ImageRequest(
            prompt=PROMPT,
            negative_prompt="",
            width=size,
            height=size,
            n=1,
            seed=seed,
            guidance_scale=7.5,
            num_inference_steps=steps,
            **edit,
        )

    async def timed(req: ImageRequest) -> tuple[float, dict]:
        start = time.perf_counter()
        result = await pipeline.generate(req)
        return (time.perf_counter() - start) * 1000.0, result

    async def measure() -> dict:
        modes = [
            ("generation", None, lambda s: request(s)),
            *[
                ("img2img", strength, lambda s, st=strength: request(s, image=target, strength=st))
                for strength in (0.3, 0.6, 1.0)
            ],
            ("inpaint", 1.0, lambda s: request(s, image=target, mask=centre_mask(size), strength=1.0)),
        ]
        # reference faces: a new one each time (miss) or face 1000 again (hit, after the warm-up)
        reference_modes = [("miss", lambda i: 1000 + i + 1), ("hit", lambda i: 1000)]

        def reference_request(face_seed: int, seed: int) -> ImageRequest:
            return request(seed, image=target, strength=0.6, reference_image=synthetic_photo(size, face_seed))

        for _, _, make in modes:  # warm-up: first-use loading
            await timed(make(0))
        await timed(reference_request(1000, 0))  # loads the encoder and the adapter UNet; caches face 1000
        samples = {i: [] for i in range(len(modes))}
        reference = {name: [] for name, _ in reference_modes}
        for repeat in range(1, repeats + 1):  # round robin: the machine's drift hits every mode alike
            for i, (_, _, make) in enumerate(modes):
                ms, result = await timed(make(repeat))
                samples[i].append((ms, result))
            for name, face in reference_modes:
                ms, result = await timed(reference_request(face(repeat), repeat))
                assert result.usage.reference_image_cached == (name == "hit")
                reference[name].append((ms, result.stage_ms["reference"]))
        runs = []
        for i, (mode, strength, _) in enumerate(modes):
            p50 = percentile((ms for ms, _ in samples[i]), 50)
            runs.append(
                {
                    "mode": mode,
                    "strength": strength,
                    "denoising_steps": samples[i][-1][1].usage.denoising_steps,
                    "p50_ms": round(p50, 1),
                }
            )
            print(f"{mode} {strength}: {p50:.0f} ms", file=sys.stderr)
        base = runs[0]["p50_ms"]
        for row in runs:
            row["ratio_to_generation"] = round(row["p50_ms"] / base, 3)
        summary = {}
        for name, _ in reference_modes:
            summary[f"{name}_p50_ms"] = round(percentile((ms for ms, _ in reference[name]), 50), 1)
            summary[f"{name}_reference_stage_ms"] = round(statistics.median(st for _, st in reference[name]), 2)
        return {"runs": runs, "reference": summary}

    return asyncio.run(measure())


def table(results: dict) -> str:
    setup = results["setup"]
    lines = [
        f"Embedded model, {setup['size']}x{setup['size']}, {setup['steps']} steps, sequential requests "
        f"(median of {setup['repeats']}), in-process with the served settings, {setup['machine']}; "
        f"`{setup['command']}`:",
        "",
        "| request | strength | UNet steps run | p50 ms | vs generation |",
        "|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        strength = "" if row["strength"] is None else f"{row['strength']:.1f}"
        lines.append(
            f"| {row['mode']} | {strength} | {row['denoising_steps']} | {row['p50_ms']:.0f} | "
            f"{row['ratio_to_generation']:.2f}x |"
        )
    ref = results["reference"]
    lines += [
        "",
        "The reference stage runs while the prompt is optimized and encoded, so it is off the critical "
        "path unless the image encoder is slower than the text encoder.",
        "",
        "| reference face (img2img 0.6 + image-prompt adapter) | reference stage ms | request p50 ms |",
        "|---|---|---|",
        f"| new face each time (cache miss) | {ref['miss_reference_stage_ms']:.1f} | {ref['miss_p50_ms']:.0f} |",
        f"| same face again (cache hit) | {ref['hit_reference_stage_ms']:.1f} | {ref['hit_p50_ms']:.0f} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="128x128, 3 repeats (about a minute)")
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]edits.json)")
    parser.add_argument("--update-readme", metavar="README", help="rewrite the README's edits table")
    options = parser.parse_args(argv)
    if options.quick:
        options.size, options.repeats = 128, 3
    results = run(options.size, options.steps, options.repeats)
    results["setup"] = {
        "size": options.size,
        "steps": options.steps,
        "repeats": options.repeats,
        "command": command_line("benchmarks.edits"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    publish(results, results_path(SECTION, options.quick, options.json), table(results), options.update_readme, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
