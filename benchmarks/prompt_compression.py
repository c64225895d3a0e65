"""Prompt compression: how many CLIP tokens the prompt optimizer saves, and whether it
keeps every attribute, on our labelled set of portrait instructions.

Reproduce (a few seconds, no Ray):

    .venv/bin/python -m benchmarks.prompt_compression --update-readme README.md

Baseline: the instruction as the user wrote it (what the text encoder sees without the
optimizer), counted with the same CLIP tokenizer in the same run. Token reduction is
1 - optimized/original per instruction. Retention: every labelled attribute value of
`tests/data/portrait_instructions.jsonl` appears in the optimized prompt text. Compact
instructions (`"compact": true`) are reported apart: they must not get longer.

Priced in pictures (`--adherence-model`, default `portrait`; `--no-adherence` skips it): every
instruction is drawn twice at 20 steps with the same seed, once from the instruction as written
(the optimizer off) and once from the optimized prompt and negative prompt (the optimizer on),
and the judge scores each picture on the row's labelled attributes that a portrait can show.

The held-out set (`tests/data/portrait_instructions_heldout.jsonl`) was written after the
rules and measured before any rule was changed for it; its rows say how the rules carry
to phrasings they were not tuned on. It is frozen: its rows never move, not even when a
rule is added for one of them (tests/unit/test_prompt_optimizer.py pins its content). If
a fresh measure of unseen phrasings is needed, write a new held-out set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.readme_table import command_line, plot_path, publish, results_path

CHECKOUT = Path(__file__).resolve().parents[1]  # the labelled sets live with the tests
DATASET = CHECKOUT / "tests" / "data" / "portrait_instructions.jsonl"
HELD_OUT = CHECKOUT / "tests" / "data" / "portrait_instructions_heldout.jsonl"
SECTION = "prompt_compression"
EXAMPLE = (
    "A smiling Asian man who is wearing glasses and looks about 35 years old, standing in a studio "
    "with soft lighting, highly detailed skin texture, sharp focus"
)


def load_dataset(path: Path = DATASET) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def expected_terms(expected: dict) -> list[str]:
    terms = []
    for value in expected.values():
        terms.extend(value if isinstance(value, list) else [value])
    return terms


def evaluate(engine, rows: list[dict]) -> list[dict]:
    results = []
    for row in rows:
        optimized = engine.optimize(row["instruction"])
        text = optimized.prompt.lower()
        missing = [term for term in expected_terms(row["expected"]) if term.lower() not in text]
        results.append(
            {
                "id": row["id"],
                "lang": row["lang"],
                "compact": bool(row.get("compact")),
                "original_tokens": optimized.original_tokens,
                "optimized_tokens": optimized.prompt_tokens,
                "reduction": 1 - optimized.prompt_tokens / optimized.original_tokens,
                "missing": missing,
                "prompt": optimized.prompt,
            }
        )
    return results


def summarize(results: list[dict]) -> dict:
    def group(rows):
        reductions = [r["reduction"] for r in rows]
        kept = sum(not r["missing"] for r in rows)
        return {
            "count": len(rows),
            "mean_reduction": statistics.mean(reductions),
            "median_reduction": statistics.median(reductions),
            "mean_original_tokens": statistics.mean(r["original_tokens"] for r in rows),
            "mean_optimized_tokens": statistics.mean(r["optimized_tokens"] for r in rows),
            "attribute_retention": kept / len(rows),
            "all_attributes_kept": kept,
            "made_longer": sum(r["optimized_tokens"] > r["original_tokens"] for r in rows),
        }

    tuned = [r for r in results if not r.get("held_out")]
    verbose = [r for r in tuned if not r["compact"]]
    held_out = [r for r in results if r.get("held_out")]
    summary = {
        "verbose": group(verbose),
        "verbose_en": group([r for r in verbose if r["lang"] == "en"]),
        "verbose_zh": group([r for r in verbose if r["lang"] == "zh"]),
        "compact": group([r for r in tuned if r["compact"]]),
    }
    if held_out:
        summary["held_out_en"] = group([r for r in held_out if r["lang"] == "en"])
        summary["held_out_zh"] = group([r for r in held_out if r["lang"] == "zh"])
    return summary


ADHERENCE_STEPS = 20


def picture_adherence(engine, rows: list[dict], model: str, steps: int = ADHERENCE_STEPS) -> dict:
    """Adherence of pictures drawn from each instruction as written and from its optimized prompt
    (same seed), on the row's labelled drawable attributes."""
    from deployments.models import loading
    from deployments.models.portrait.adherence import expectations
    from deployments.models.portrait.evaluation import generate, load_pipeline
    from deployments.models.portrait.judge import Judge

    judge = Judge.packaged()
    pipe = load_pipeline(loading.resolve_model(model))
    asked = [
        expectations({k: v if isinstance(v, list) else [v] for k, v in row["expected"].items()}, row["instruction"])
        for row in rows
    ]
    seeds = list(range(len(rows)))
    optimized = [engine.optimize(row["instruction"]) for row in rows]
    raw_images = generate(pipe, [row["instruction"] for row in rows], seeds, steps)
    optimized_images = generate(
        pipe, [o.prompt for o in optimized], seeds, steps, negative_prompts=[o.negative_prompt for o in optimized]
    )
    scores: dict[str, dict[str, list[float]]] = {}
    for row, expectation, raw, better in zip(
        rows, asked, judge.read(raw_images), judge.read(optimized_images), strict=True
    ):
        raw_score, optimized_score = expectation.adherence(raw), expectation.adherence(better)
        if raw_score is None or optimized_score is None:
            continue
        group = scores.setdefault(
            ("held_out_" if row.get("held_out") else "") + row["lang"], {"raw": [], "optimized": []}
        )
        group["raw"].append(raw_score)
        group["optimized"].append(optimized_score)
    return {
        "model": model,
        "steps": steps,
        "groups": {
            name: {
                "count": len(g["raw"]),
                "raw": statistics.mean(g["raw"]),
                "optimized": statistics.mean(g["optimized"]),
            }
            for name, g in sorted(scores.items())
        },
    }


def run(model: str, adherence_model: str | None) -> dict:
    from deployments.models import loading
    from deployments.prompt.optimizer import PromptOptimizerEngine

    engine = PromptOptimizerEngine(loading.resolve_model(model))
    results = evaluate(engine, load_dataset())
    results += [{**row, "held_out": True} for row in evaluate(engine, load_dataset(HELD_OUT))]
    example = engine.optimize(EXAMPLE)
    rows = load_dataset() + [{**row, "held_out": True} for row in load_dataset(HELD_OUT)]
    return {
        "summary": summarize(results),
        "adherence": picture_adherence(engine, rows, adherence_model) if adherence_model else None,
        "example": {
            "instruction": EXAMPLE,
            "prompt": example.prompt,
            "attributes": example.attribute_text(),
            "original_tokens": example.original_tokens,
            "optimized_tokens": example.prompt_tokens,
        },
        "rows": results,
        "config": {
            "dataset": str(DATASET.relative_to(CHECKOUT)),
            "held_out": str(HELD_OUT.relative_to(CHECKOUT)),
            "model": model,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command_line("benchmarks.prompt_compression"),
        },
    }


def markdown(results: dict) -> str:
    lines = [
        "| set | instructions | mean tokens before → after | mean reduction | median reduction "
        "| every attribute kept | made longer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "verbose": "verbose, all",
        "verbose_en": "verbose, English",
        "verbose_zh": "verbose, Chinese",
        "compact": "already compact",
        "held_out_en": "held out, English",
        "held_out_zh": "held out, Chinese",
    }
    for key, label in labels.items():
        if key not in results["summary"]:
            continue
        s = results["summary"][key]
        lines.append(
            f"| {label} | {s['count']} | {s['mean_original_tokens']:.1f} → {s['mean_optimized_tokens']:.1f} "
            f"| {s['mean_reduction']:.0%} | {s['median_reduction']:.0%} "
            f"| {s['all_attributes_kept']}/{s['count']} ({s['attribute_retention']:.1%}) "
            f"| {s['made_longer']} |"
        )
    example = results["example"]
    lines += [
        "",
        f"Example: *{example['instruction']}* ({example['original_tokens']} tokens) → "
        f"`{example['prompt']}` ({example['optimized_tokens']} tokens).",
    ]
    if results.get("adherence"):
        lines += ["", *adherence_markdown(results["adherence"])]
    return "\n".join(lines)


def adherence_markdown(adherence: dict) -> list[str]:
    labels = {"en": "English", "zh": "Chinese", "held_out_en": "held out, English", "held_out_zh": "held out, Chinese"}
    rows = [
        f"| {labels.get(name, name)} | {g['count']} | {g['raw']:.1%} | **{g['optimized']:.1%}** |"
        for name, g in adherence["groups"].items()
    ]
    return [
        f"Priced in pictures (`{adherence['model']}`, {adherence['steps']} steps, same seeds; adherence on the "
        "labelled drawable attributes, read by the judge):",
        "",
        "| set | instructions | drawn from the instruction as written | drawn from the optimized prompt |",
        "|---|---|---|---|",
        *rows,
    ]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if not r["compact"] and not r.get("held_out")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for lang, color in (("en", "tab:blue"), ("zh", "tab:orange")):
        picked = [r for r in rows if r["lang"] == lang]
        left.hist([100 * r["reduction"] for r in picked], bins=20, alpha=0.7, color=color, label=lang)
        right.scatter(
            [r["original_tokens"] for r in picked],
            [r["optimized_tokens"] for r in picked],
            s=12,
            color=color,
            label=lang,
        )
    left.set(xlabel="token reduction (%)", ylabel="instructions", title="Reduction per instruction")
    top = max(r["original_tokens"] for r in rows)
    right.plot([0, top], [0, top], color="gray", linestyle="--", linewidth=1, label="no change")
    right.set(xlabel="original CLIP tokens", ylabel="optimized CLIP tokens", title="Before and after")
    left.legend()
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="model whose tokenizer counts (default: %(default)s)")
    parser.add_argument(
        "--json", help="results file, its plot beside it (default: benchmarks/results/[quick/]prompt_compression.json)"
    )
    parser.add_argument("--update-readme", metavar="README")
    parser.add_argument("--adherence-model", default="portrait", help="model that draws (default: %(default)s)")
    parser.add_argument("--no-adherence", action="store_true", help="token counts only (seconds, no drawing)")
    parser.add_argument(
        "--quick", action="store_true", help="the same run (it takes seconds), written to benchmarks/results/quick/"
    )
    options = parser.parse_args(argv)
    results = run(options.model, None if options.no_adherence else options.adherence_model)
    json_path = results_path(SECTION, options.quick, options.json)
    publish(results, json_path, markdown(results), options.update_readme, SECTION)
    plot(results, plot_path(json_path))
    failures = [r["id"] for r in results["rows"] if r["missing"]]
    if failures:
        print(f"\nattributes missing in: {', '.join(failures)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
