"""Portrait quality, part one: how well the judge reads attributes from renders it never saw.

The judge (deployments/models/portrait/judge.py) is trained on renders only; here it reads
renders with seeds from a range training never draws from, and its accuracy per attribute
(over the images that show it) and per accessory (worn or not) is the share it gets right.
It also reports the Fréchet distance on judge features between two independent sets of
renders: the noise floor that generated images will be compared against. Generated-image
adherence joins this benchmark when the portrait model is trained (issue 18).

    .venv/bin/python -m benchmarks.portrait_quality [--images 1000] [--update-readme README.md]
    .venv/bin/python -m benchmarks.portrait_quality --quick     # 200 images
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import UTC, datetime

from benchmarks.readme_table import command_line, publish, results_path

SECTION = "portrait_quality"
TARGET = 0.97  # judge accuracy per attribute (issue 18)


def run(images: int) -> dict:
    from deployments.models.portrait.judge import Judge, frechet_distance
    from deployments.models.portrait.judge_training import evaluation_set, judge_accuracy
    from deployments.models.portrait.renderer import render_portrait

    judge = Judge.packaged()
    started = time.perf_counter()
    attributes, seeds = evaluation_set(images)
    accuracy = judge_accuracy(judge, attributes, seeds)
    other_attributes, other_seeds = evaluation_set(images, seed=1)
    features = [
        judge.embed([render_portrait(a, s) for a, s in zip(group, group_seeds)])
        for group, group_seeds in ((attributes, seeds), (other_attributes, other_seeds))
    ]
    return {
        "config": {
            "images": images,
            "machine": platform.processor() or platform.machine(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "command": command_line("benchmarks.portrait_quality"),
            "seconds": round(time.perf_counter() - started, 1),
        },
        "judge_accuracy": {name: round(value, 4) for name, value in sorted(accuracy.items())},
        "judge_accuracy_min": round(min(accuracy.values()), 4),
        "frechet_rendered_vs_rendered": round(frechet_distance(*features), 3),
    }


def markdown(results: dict) -> str:
    c = results["config"]
    rows = [
        f"| {name} | {value:.1%} | {'yes' if value >= TARGET else 'no'} |"
        for name, value in results["judge_accuracy"].items()
    ]
    return "\n".join(
        [
            f"| attribute | judge accuracy ({c['images']} held-out renders) | ≥ {TARGET:.0%} |",
            "|---|---|---|",
            *rows,
            "",
            f"Fréchet distance on judge features, rendered vs rendered (the noise floor): "
            f"{results['frechet_rendered_vs_rendered']}. `{c['command']}`, {c['date']}, {c['seconds']} s.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 images")
    parser.add_argument("--images", type=int, default=1000, help="held-out renders (default: %(default)s)")
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]portrait_quality.json)")
    parser.add_argument("--update-readme", metavar="README")
    options = parser.parse_args(argv)
    results = run(200 if options.quick else options.images)
    publish(
        results, results_path(SECTION, options.quick, options.json), markdown(results), options.update_readme, SECTION
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
