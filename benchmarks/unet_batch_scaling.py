"""How much can batching UNet forwards gain on this machine? The ceiling, measured.

Step-level batching shares one UNet forward between requests; its best case is the
per-image cost of a forward at full batch against that of one guided image alone
(batch 2: conditional + unconditional). This script measures it directly — one UNet
forward at 1, 2, 4 and 8 guided images (2-16 rows), same model, same inputs, one run —
and splits each forward's time by operator kind with torch's profiler, so a missed
batching target can be traced to the operators whose cost is per image (attention over
the latent's positions) rather than per call.

    .venv/bin/python -m benchmarks.unet_batch_scaling                      # ~2 min
    .venv/bin/python -m benchmarks.unet_batch_scaling --quick              # tiny, 64x64: seconds
    .venv/bin/python -m benchmarks.unet_batch_scaling --update-readme README.md

Baseline: the forward of one guided image (batch 2), as the one-request-at-a-time server
runs it. Reported: ms per forward, ms per image, throughput vs the baseline (the
ceiling of any batching policy at that batch), and the share of a forward spent in
attention, convolutions and linear layers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime

from benchmarks.readme_table import command_line, publish, results_path

SECTION = "unet_batch_scaling"
# profiler op name -> kind (each op's total includes its children); everything else is
# "other". diffusers' UNet attends through scaled_dot_product_attention (AttnProcessor2_0);
# bmm is left out, since linear layers on 3-D inputs call it too and would count twice.
OP_KINDS = {
    "aten::scaled_dot_product_attention": "attention",
    "aten::convolution": "convolution",
    "aten::linear": "linear",
}


def inputs(unet, rows: int, size: int, hidden: int):
    import torch

    from deployments.common.vae_scale import VAE_SCALE_FACTOR

    generator = torch.Generator().manual_seed(rows)
    latent = size // VAE_SCALE_FACTOR
    return (
        torch.randn(rows, unet.config.in_channels, latent, latent, generator=generator),
        torch.full((rows,), 500),
        torch.randn(rows, 77, hidden, generator=generator),
    )


def time_forwards(unet, row_counts: list[int], size: int, hidden: int, repeats: int) -> dict[int, float]:
    """Median seconds of one forward per row count. The counts are interleaved round by
    round, so this machine's drift (±30% between runs) moves them all alike."""
    import torch

    batches = {rows: inputs(unet, rows, size, hidden) for rows in row_counts}
    times: dict[int, list[float]] = {rows: [] for rows in row_counts}
    with torch.inference_mode():
        for batch in batches.values():
            unet(*batch)  # first-call costs
        for _ in range(repeats):
            for rows, batch in batches.items():
                start = time.perf_counter()
                unet(*batch)
                times[rows].append(time.perf_counter() - start)
    return {rows: statistics.median(values) for rows, values in times.items()}


def op_shares(unet, rows: int, size: int, hidden: int) -> dict[str, float]:
    """Share of one forward's CPU time by operator kind (top-level ops only)."""
    import torch

    batch = inputs(unet, rows, size, hidden)
    with torch.inference_mode():
        unet(*batch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            unet(*batch)
    totals = {kind: 0.0 for kind in ("attention", "convolution", "linear")}
    for event in profile.key_averages():
        kind = OP_KINDS.get(event.key)
        if kind:
            totals[kind] += event.cpu_time_total
    whole = sum(e.self_cpu_time_total for e in profile.key_averages())
    shares = {kind: value / whole for kind, value in totals.items()}
    shares["other"] = max(0.0, 1 - sum(shares.values()))
    return shares


def run(models_to_run: list[str], sizes: list[int], images: list[int], repeats: int, threads: int) -> dict:
    import torch

    from deployments.models import loading

    torch.set_num_threads(threads)
    rows = []
    for model in models_to_run:
        model_path = loading.resolve_model(model)
        unet = loading.load_unet(model_path).eval()
        hidden = unet.config.cross_attention_dim
        for size in sizes:
            base = None
            medians = time_forwards(unet, [2 * count for count in images], size, hidden, repeats)
            for count in images:
                seconds = medians[2 * count]
                per_image = seconds / count
                base = base or per_image
                row = {
                    "model": model,
                    "size": size,
                    "images": count,
                    "rows": 2 * count,
                    "ms_per_forward": seconds * 1e3,
                    "ms_per_image": per_image * 1e3,
                    "throughput_vs_one": base / per_image,
                    **op_shares(unet, 2 * count, size, hidden),
                }
                print(row, flush=True)
                rows.append(row)
    return {
        "rows": rows,
        "config": {
            "command": command_line("benchmarks.unet_batch_scaling"),
            "threads": threads,
            "repeats": repeats,
            "torch": torch.__version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
        },
    }


def markdown(results: dict) -> str:
    lines = [
        "| model | size | guided images | ms per forward | ms per image | throughput vs 1 image "
        "| attention | convolution | linear | other |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['size']}x{r['size']} | {r['images']} | {r['ms_per_forward']:.1f} "
            f"| {r['ms_per_image']:.1f} | {r['throughput_vs_one']:.2f}x | {r['attention']:.0%} "
            f"| {r['convolution']:.0%} | {r['linear']:.0%} | {r['other']:.0%} |"
        )
    c = results["config"]
    lines += [
        "",
        f"One UNet forward with classifier-free guidance (2 rows per image), median of {c['repeats']}; "
        f"{c['threads']} torch threads, torch {c['torch']}, {c['machine']}; {c['date'][:10]}; "
        f"`{c['command'].strip()}`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 64x64, 1-4 images, 3 repeats")
    parser.add_argument("--models", default="tiny,small", help="presets or model folders, comma-separated")
    parser.add_argument("--sizes", default="256,64")
    parser.add_argument("--images", default="1,2,4,8", help="guided images per forward; the first is the baseline")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]unet_batch_scaling.json)")
    parser.add_argument("--update-readme", metavar="README")
    options = parser.parse_args(argv)
    models, sizes = options.models.split(","), [int(s) for s in options.sizes.split(",")]
    images, repeats = [int(n) for n in options.images.split(",")], options.repeats
    if options.quick:
        models, sizes, images, repeats = ["tiny"], [64], [1, 2, 4], 3
    results = run(models, sizes, images, repeats, options.threads)
    json_path = results_path(SECTION, options.quick, options.json)
    publish(results, json_path, markdown(results), options.update_readme, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
