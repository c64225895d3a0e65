"""Text encoder prefix cache: cold encode vs prefix hit vs exact hit, in one run.

For each model, batch size B and shared prefix length P (tokens, BOS included), with the
cache engine of `deployments/text_encoder.py`:

- cold: an empty cache, B windows that start with the P-token prefix (everything computed,
  blocks written back, as a first request really costs);
- prefix hit: the prefix's blocks cached by an earlier window, B new windows with it;
- exact hit: the same B windows again (stored outputs, no model call);
- baseline: transformers' `CLIPTextModel` forward of the same windows (no cache code);

with speed-up = cold / prefix hit against the ceiling 77 / (77 - P), and the max absolute
difference of every cached output to the baseline forward (0 means bit-exact).
Each figure is the median over `--repeats` runs with fresh suffixes.

Models: `sd15` is the real SD-1.5 text-encoder architecture (12 layers, width 768,
77 tokens) with random weights, built in memory; `tiny` is the embedded default model.

    .venv/bin/python -m benchmarks.text_encoder_cache                       # full grid, ~3 min
    .venv/bin/python -m benchmarks.text_encoder_cache --quick               # < 1 min
    .venv/bin/python -m benchmarks.text_encoder_cache --update-readme README.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.readme_table import command_line, plot_path, publish, results_path

SECTION = "text_encoder_cache"
WINDOW = 77
VOCAB = 49406


def load_engine(model: str, threads: int):
    import torch
    import yaml
    from transformers import CLIPTextConfig, CLIPTextModel

    from deployments.models import builder, loading
    from deployments.text_encoder.engine import TextEncoderEngine

    tiny = loading.resolve_model("tiny")
    cache = {"max_mib": 4096, "watchdog": {"enabled": False}}
    if model == "tiny":
        return TextEncoderEngine(tiny, threads, cache)
    preset = yaml.safe_load((builder.PRESET_DIR / f"{model}.yaml").read_text())
    torch.manual_seed(0)
    text_model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **preset["text_encoder"])).eval()
    return TextEncoderEngine.from_model(text_model, loading.load_tokenizer(tiny), f"{model}-random", threads, cache)


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return (time.perf_counter() - start) * 1000.0, result


def measure(engine, prefix_tokens: int, batch: int, repeats: int, rng: random.Random) -> dict:
    import torch

    def windows(prefix: list[int], count: int) -> torch.Tensor:
        return torch.tensor(
            [prefix + [rng.randrange(VOCAB) for _ in range(WINDOW - len(prefix))] for _ in range(count)]
        )

    namespaces = ["bench"] * batch
    cold, prefix_hit, exact_hit, baseline, diffs, cached = [], [], [], [], [], []
    for repeat in range(repeats + 1):  # the first round warms this shape up and is not counted
        prefix = [49406] + [rng.randrange(VOCAB) for _ in range(prefix_tokens - 1)]  # BOS + P-1 tokens
        engine.clear_cache()
        ids = windows(prefix, batch)
        ms, _ = timed(lambda ids=ids: engine.encode_token_ids(ids, namespaces))
        cold.append(ms)
        ids = windows(prefix, batch)  # new suffixes: only the prefix blocks are cached
        ms, (hidden, hit_tokens) = timed(lambda ids=ids: engine.encode_token_ids(ids, namespaces))
        prefix_hit.append(ms)
        cached.append(min(hit_tokens))
        ms, (again, _) = timed(lambda ids=ids: engine.encode_token_ids(ids, namespaces))
        exact_hit.append(ms)
        with torch.inference_mode():
            ms, reference = timed(lambda ids=ids: engine.model(ids)[0])
        baseline.append(ms)
        diffs.append(max((hidden - reference).abs().max().item(), (again - reference).abs().max().item()))
        if repeat == 0:
            for figures in (cold, prefix_hit, exact_hit, baseline, cached):
                figures.clear()
    med = statistics.median
    cold_ms, hit_ms = med(cold), med(prefix_hit)
    ceiling = WINDOW / (WINDOW - prefix_tokens)
    return {
        "prefix_tokens": prefix_tokens,
        "batch": batch,
        "cached_tokens": min(cached),
        "baseline_ms": round(med(baseline), 3),
        "cold_ms": round(cold_ms, 3),
        "prefix_hit_ms": round(hit_ms, 3),
        "exact_hit_ms": round(med(exact_hit), 4),
        "speedup": round(cold_ms / hit_ms, 3),
        "ceiling": round(ceiling, 3),
        "fraction_of_ceiling": round(cold_ms / hit_ms / ceiling, 3),
        "exact_speedup": round(cold_ms / med(exact_hit), 1),
        "max_abs_diff": max(diffs),
    }


def run(models_: list[str], prefixes: list[int], batches: list[int], repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    rng = random.Random(0)
    cases, memory = [], {}
    for model in models_:
        engine = load_engine(model, threads)
        engine.encode_token_ids(torch.randint(0, VOCAB, (2, WINDOW)), ["warmup"] * 2)  # first-call costs
        hidden = engine.model.config.hidden_size
        memory[model] = {
            "kv_bytes_per_token": engine.forward.kv_bytes_per_token(),
            "bytes_per_cached_token": engine.forward.kv_bytes_per_token() + hidden * 4,
            "exact_entry_bytes": WINDOW * hidden * 4,
        }
        for batch in batches:
            for prefix_tokens in prefixes:
                case = {"model": model, **measure(engine, prefix_tokens, batch, repeats, rng)}
                print(json.dumps(case), flush=True)
                cases.append(case)
    return {
        "cases": cases,
        "memory": memory,
        "config": {
            "command": command_line("benchmarks.text_encoder_cache"),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "threads": threads,
            "repeats": repeats,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
            "torch": torch.__version__,
        },
    }


def markdown(results: dict) -> str:
    lines = [
        "| model | batch | prefix P | cold ms | prefix hit ms | speed-up | ceiling 77/(77-P) | of ceiling "
        "| exact hit ms | exact speed-up | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["cases"]:
        lines.append(
            f"| {c['model']} | {c['batch']} | {c['prefix_tokens']} | {c['cold_ms']:.1f} | {c['prefix_hit_ms']:.1f} "
            f"| {c['speedup']:.2f}x | {c['ceiling']:.2f}x | {c['fraction_of_ceiling']:.0%} "
            f"| {c['exact_hit_ms']:.2f} | {c['exact_speedup']:.0f}x | {c['max_abs_diff']:.1g} |"
        )
    memory = "; ".join(
        f"{model}: {m['bytes_per_cached_token'] / 1024:.1f} KiB per cached token "
        f"(K/V of every layer + output row), {m['exact_entry_bytes'] / 1024:.0f} KiB per exact entry"
        for model, m in results["memory"].items()
    )
    config = results["config"]
    lines += [
        "",
        f"Cache memory: {memory}. Measured {config['date'][:10]} on {config['machine']}, "
        f"{config['threads']} torch threads, median of {config['repeats']}; `{config['command'].strip()}`.",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models_ = sorted({c["model"] for c in results["cases"]}, key=lambda m: m != "sd15")
    fig, axes = plt.subplots(1, len(models_), figsize=(5.5 * len(models_), 4), squeeze=False)
    for axis, model in zip(axes[0], models_):
        cases = [c for c in results["cases"] if c["model"] == model]
        prefixes = sorted({c["prefix_tokens"] for c in cases})
        axis.plot(prefixes, [WINDOW / (WINDOW - p) for p in prefixes], "k--", label="ceiling 77/(77-P)")
        for batch in sorted({c["batch"] for c in cases}):
            picked = sorted((c for c in cases if c["batch"] == batch), key=lambda c: c["prefix_tokens"])
            axis.plot(
                [c["prefix_tokens"] for c in picked], [c["speedup"] for c in picked], "o-", label=f"batch {batch}"
            )
        axis.set(
            xlabel="cached prefix P (tokens)",
            ylabel="speed-up of a prefix hit over a cold encode",
            title=f"{model} text encoder",
        )
        axis.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="P in {32, 64}, 2 repeats: under a minute")
    parser.add_argument("--models", default="sd15,tiny")
    parser.add_argument("--prefixes", default="16,32,48,64")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--json", help="results file, its plot beside it (default: benchmarks/results/[quick/]text_encoder_cache.json)"
    )
    parser.add_argument("--update-readme", metavar="README")
    options = parser.parse_args(argv)
    prefixes = [int(p) for p in options.prefixes.split(",")]
    repeats = options.repeats
    if options.quick:
        prefixes, repeats = [32, 64], 2
    results = run(
        options.models.split(","), prefixes, [int(b) for b in options.batches.split(",")], repeats, options.threads
    )
    json_path = results_path(SECTION, options.quick, options.json)
    publish(results, json_path, markdown(results), options.update_readme, SECTION)
    plot(results, plot_path(json_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
