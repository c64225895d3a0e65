"""One copy of the UNet per Denoiser replica: the memory of the image-prompt adapter beside the
production backend, and what the shared graph costs plain requests.

On ONNX Runtime (the CPU default) a model with an adapter runs one graph with the adapter in
(`deployments/denoiser/backends.py: export_adapter_onnx`): reference rows at their scale, plain
rows with zero embeddings at scale 0. Before it, the replica held the plain graph and, for
reference edits, the adapter on its own fp32 torch copy of the UNet. Each arrangement is built
in a fresh Python process (after its imports), one plain and one reference forward run, and
the process's resident memory measured before and after; then, in one process, the ms of a
plain forward on the plain graph and on the shared graph (scale 0), timed in turns
(benchmarks/turns.py), median.

    .venv/bin/python -m benchmarks.adapter_sharing [--quick] [--json PATH] [--update-readme README.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from benchmarks.readme_table import command_line, publish, results_path
from benchmarks.turns import PER_TURN, time_in_turns

SECTION = "adapter_sharing"
MODEL = Path("deployments/models/trained/portrait")
ARRANGEMENTS = {
    "onnx_shared": "ONNX Runtime fp32, one graph: the adapter in, deep features out (now)",
    "onnx_separate": "ONNX Runtime fp32, the plain graph + the adapter on its own torch copy (before)",
    "torch_shared": "torch fp32, the adapter's processors swapped into the production UNet",
}

# Run in a child process: prints one JSON line {"before": rss, "after": rss}.
_CHILD = """
import json, sys, psutil, torch, onnxruntime, diffusers
from pathlib import Path
from deployments.denoiser import backends
from deployments.denoiser.settings import BackendSpec
torch.set_num_threads(2)
model, arrangement = Path(sys.argv[1]), sys.argv[2]
rss = lambda: psutil.Process().memory_info().rss
before = rss()
cache = None
if arrangement == "onnx_shared":
    runner = backends.OnnxRunner(model, BackendSpec(backend="onnxruntime", precision="fp32"), 2)
    adapter, cache = runner.adapter, runner.feature_cache
elif arrangement == "onnx_separate":
    graph = str(backends.onnx_plain_graph_file(model))
    session = backends._FP32Session(onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"]))
    runner = lambda s, t, c: torch.from_numpy(session.run(s, t, c)[0])
    adapter = backends.AdapterUNet(model)
else:
    torch_runner = backends.TorchRunner(model, BackendSpec(backend="torch", precision="fp32"))
    runner, adapter = torch_runner, backends.AdapterUNet(model, torch_runner)
    cache = torch_runner.feature_cache
sample, timesteps, context = torch.randn(2, 4, 16, 16), torch.tensor([999, 999]), torch.randn(2, 77, 128)
with torch.inference_mode():
    runner(sample, timesteps, context)
    adapter(sample, timesteps, context, torch.randn(2, 1, 128), 1.0)
    if cache is not None and len(sys.argv) > 3:  # a cached job: a whole step keeping features, a shallow one
        _, deep = cache.full(sample, timesteps, context, [0])
        cache.shallow(sample, timesteps, context, deep[0], 0)
print(json.dumps({"before": before, "after": rss()}))
"""


def memory_of(arrangement: str, cached_job: bool = False) -> float:
    """MB of resident memory the arrangement adds, built in a fresh process."""
    command = [sys.executable, "-c", _CHILD, str(MODEL), arrangement, *(["cached"] if cached_job else [])]
    sizes = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    return round((sizes["after"] - sizes["before"]) / 2**20, 1)


def unet_weights_mb() -> float:
    """The UNet's parameters as a replica holds them (fp32)."""
    from safetensors import safe_open

    with safe_open(str(next((MODEL / "unet").glob("*.safetensors"))), "pt") as weights:
        count = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118 (not iterable)
    return round(count * 4 / 2**20, 1)


def plain_step_ms(rows: int, rounds: int) -> dict:
    """ms of a plain forward: the plain graph vs the production graph (deep features out, the
    adapter in at scale 0), timed in turns, median; and whether they agree bit for bit."""
    import numpy as np
    import onnxruntime
    import torch

    from deployments.denoiser import backends

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2

    def session(path: Path) -> backends._FP32Session:
        return backends._FP32Session(
            onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        )

    plain = session(backends.onnx_plain_graph_file(MODEL))
    shared = session(backends.onnx_model_file(MODEL, "fp32"))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, 4, 16, 16, generator=generator)
    timesteps = torch.full((rows,), 500)
    context = torch.randn(rows, 77, 128, generator=generator)
    runs = {"plain_graph": plain, "shared_graph": shared}
    calls = {name: partial(graph.run, sample, timesteps, context) for name, graph in runs.items()}
    times = time_in_turns(calls, rounds)
    a, b = plain.run(sample, timesteps, context)[0], shared.run(sample, timesteps, context)[0]
    result = {name: round(statistics.median(values), 2) for name, values in times.items()}
    return {
        **result,
        "ratio": round(result["shared_graph"] / result["plain_graph"], 3),
        "max_difference": float(np.abs(a - b).max()),
    }


def render_table(results: dict) -> str:
    memory, cached = results["memory_mb"], results["memory_mb_with_a_cached_job"]
    lines = [
        f"Portrait model (UNet {results['unet_fp32_mb']} MB in fp32): resident memory a Denoiser's UNet"
        " arrangement adds, built in a fresh process, after a plain and a reference forward (and, where"
        " shown, a cached job's whole and shallow steps):",
        "",
        "| arrangement | memory added | with a cached job |",
        "|---|---|---|",
    ]
    for name, description in ARRANGEMENTS.items():
        lines.append(f"| {description} | {memory[name]} MB | {f'{cached[name]} MB' if name in cached else ''} |")
    lines += [
        "",
        "A plain forward on the production graph (deep features out, the adapter in at scale 0) against"
        f" the plain UNet's graph, ms, median of {results['timed_forwards']} forwards each, timed in turns"
        " (each turn after a settling pause):",
        "",
        "| UNet rows | plain graph | production graph | ratio | max difference |",
        "|---|---|---|---|---|",
    ]
    for rows, timing in results["plain_step"].items():
        lines.append(
            f"| {rows} | {timing['plain_graph']} | {timing['shared_graph']} | {timing['ratio']}x"
            f" | {timing['max_difference']:.1e} |"
        )
    lines += [
        "",
        f"<sub>`{results['command']}`, {results['machine']}, {results['date']}, {results['seconds']} s.</sub>",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds")
    parser.add_argument("--json", help="results file (default: benchmarks/results/[quick/]adapter_sharing.json)")
    parser.add_argument("--update-readme", metavar="README", help="replace this README's adapter_sharing section")
    options = parser.parse_args(argv)
    began = time.perf_counter()
    rounds = 2 if options.quick else 40
    results = {
        "unet_fp32_mb": unet_weights_mb(),
        "memory_mb": {name: memory_of(name) for name in ARRANGEMENTS},
        "memory_mb_with_a_cached_job": {name: memory_of(name, True) for name in ("onnx_shared", "torch_shared")},
        "plain_step": {str(rows): plain_step_ms(rows, rounds) for rows in (2, 16)},
        "timed_forwards": rounds * PER_TURN,
        "command": command_line("benchmarks.adapter_sharing"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    results["seconds"] = round(time.perf_counter() - began, 1)
    publish(
        results,
        results_path(SECTION, options.quick, options.json),
        render_table(results),
        options.update_readme,
        SECTION,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
