"""Serving overhead: what Ray Serve and the four-stage DAG cost per request, and how the
DAG compares with the one-deployment shape of Ray Serve's Stable Diffusion example.

Reproduce (about two and a half minutes on the 2-core development machine):

    .venv/bin/python -m benchmarks.serving_overhead --quick

The same requests (tiny model, 256x256, 20 steps, guidance 7.5, fixed seeds, a few
portrait prompts) run in three modes:

- ``in_process``: ``local_pipeline_for()`` + ``ImagePipeline.generate()`` in this process, no Ray;
- ``served``: the Serve DAG (Ingress + four stages, options from serve_config.yaml) over HTTP;
- ``single_deployment``: the baseline, shaped like Ray Serve's official Stable Diffusion
  example: a FastAPI ``APIIngress`` and ONE ``StableDiffusion`` deployment holding a whole
  diffusers pipeline, one request at a time, given the same CPU shares as the DAG.

Each concurrency level is a closed loop: ``concurrency`` clients, each sending its next
request when its last one returns. At concurrency 1 the in_process and served requests
alternate (A B B A ...), so drift in this machine's speed hits both alike; the serving
overhead is p50(served) - p50(in_process) there. The baseline runs in its own phase,
after the DAG is deleted, in the same Ray instance (the cluster has CPU shares for one
of them at a time). A warm-up request per mode is not measured; the warm-up images of
all modes are compared pixel for pixel (they must match: same seeds, same math).

Writes JSON (``--json``) and a PNG plot (``--plot``). ``--from-json PATH`` only redraws
the plot and the table; ``--markdown`` prints the README table; ``--update-readme
README.md`` rewrites the text between the serving_overhead markers.
"""

import argparse
import asyncio
import base64
import io
import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.readme_table import command_line, plot_path, results_path, update_readme
from benchmarks.stats import percentile

MODES = ("in_process", "served", "single_deployment")
APP_NAME = "fusionserve"
BASELINE_NAME = "baseline"
BASELINE_PREFIX = "/baseline"
CHECKOUT = Path(__file__).resolve().parents[1]  # for the git commit in the results
README_SECTION = "serving_overhead"  # README markers: <!-- NAME:start --> ... <!-- NAME:end -->
PROMPTS = (
    "portrait photo of a smiling woman with curly red hair, soft window light",
    "close-up portrait of an elderly man with a grey beard, studio lighting",
    "portrait of a young Asian man wearing glasses, shallow depth of field",
    "headshot of a woman in a navy blazer, neutral background, professional photo",
)
WARMUP = -1  # request index of the warm-up request
HTTP_TIMEOUT_S = 600.0  # generous: at concurrency 8 a request waits behind seven others

# Returns the PNG bytes of the one image of a request body.
Send = Callable[[dict], Awaitable[bytes]]


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    size: int = 256
    steps: int = 20
    guidance_scale: float = 7.5
    seed_base: int = 1000

    def body(self, index: int) -> dict:
        """Request `index` as the JSON body of POST /v1/images/generations."""
        return {
            "prompt": PROMPTS[index % len(PROMPTS)],
            "n": 1,
            "size": f"{self.size}x{self.size}",
            "seed": self.seed_base + index,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            # The baseline renders prompts as written; so do we here, so all modes draw the
            # same images (the PromptOptimizer stage and its hop still run).
            "optimize_prompt": False,
        }

    def bodies(self, count: int) -> list[dict]:
        return [self.body(i) for i in range(count)]


def requests_for_level(concurrency: int, minimum: int, per_client: int) -> int:
    """Enough requests that every client sends `per_client`, and never fewer than `minimum`."""
    return max(concurrency * per_client, minimum)


# --------------------------------------------------------------------------- senders


def in_process_sender(pipeline, settings) -> Send:
    from serve_app.http.image_request import to_image_request
    from serve_app.http.schemas import ImageGenerationBody

    async def send(body: dict) -> bytes:
        # The same validation and request type as the HTTP route, so both modes run the same job.
        request = to_image_request(ImageGenerationBody.model_validate(body), settings)
        result = await pipeline.generate(request)
        return result.images_png[0]

    return send


def served_sender(client) -> Send:
    async def send(body: dict) -> bytes:
        response = await client.post("/v1/images/generations", json=body)
        _raise_for_status(response)
        return base64.b64decode(response.json()["data"][0]["b64_json"])

    return send


def baseline_sender(client) -> Send:
    async def send(body: dict) -> bytes:
        params = {
            "prompt": body["prompt"],
            "img_size": int(body["size"].split("x")[0]),
            "seed": body["seed"],
            "steps": body["num_inference_steps"],
            "guidance_scale": body["guidance_scale"],
        }
        response = await client.get(f"{BASELINE_PREFIX}/imagine", params=params)
        _raise_for_status(response)
        return response.content

    return send


def _raise_for_status(response) -> None:
    if response.status_code != 200:
        raise RuntimeError(
            f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:500]}"
        )


def http_client(port: int, max_connections: int):
    import httpx

    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        timeout=httpx.Timeout(HTTP_TIMEOUT_S),
        limits=httpx.Limits(max_connections=max_connections + 2),
        trust_env=False,  # never route localhost through an HTTP(S)_PROXY from the environment
    )


async def wait_for_route(client, path: str, timeout_s: float = 60.0) -> None:
    """serve.run returns when replicas are up; the proxy learns the route a moment later."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await client.get(path)).status_code == 200:
                return
        except Exception:  # connection refused while the proxy starts
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not answer 200 within {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- measuring


@dataclass
class LevelResult:
    latencies_s: list[float]
    busy_s: float  # wall time of the level; for an interleaved run, this mode's share of it


async def timed(send: Send, body: dict) -> float:
    start = time.perf_counter()
    await send(body)
    return time.perf_counter() - start


async def closed_loop(send: Send, bodies: list[dict], concurrency: int) -> LevelResult:
    """`concurrency` clients share one request list; each sends its next when the last returns."""
    pending = iter(bodies)  # one iterator: asyncio runs one client at a time between awaits
    latencies: list[float] = []

    async def client() -> None:
        for body in pending:
            latencies.append(await timed(send, body))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return LevelResult(latencies, time.perf_counter() - start)


async def interleaved(senders: dict[str, Send], bodies: list[dict]) -> dict[str, LevelResult]:
    """Concurrency 1 for several modes at once: each request goes to every mode in turn,
    the order flipping each time (A B, B A, ...) so neither always runs first."""
    names = list(senders)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for index, body in enumerate(bodies):
        for name in names if index % 2 == 0 else names[::-1]:
            latencies[name].append(await timed(senders[name], body))
    # Serial requests: a mode's throughput is requests over the time it was busy.
    return {name: LevelResult(values, sum(values)) for name, values in latencies.items()}


def summarize(mode: str, concurrency: int, result: LevelResult, was_interleaved: bool = False) -> dict:
    ms = [1000.0 * s for s in result.latencies_s]
    return {
        "mode": mode,
        "concurrency": concurrency,
        "rps": round(len(ms) / result.busy_s, 4),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "requests": len(ms),
        "mean_ms": round(sum(ms) / len(ms), 1),
        "busy_s": round(result.busy_s, 2),
        "interleaved": was_interleaved,
        "latencies_ms": [round(v, 1) for v in ms],
    }


def progress(run: dict) -> None:
    note = " (interleaved)" if run["interleaved"] else ""
    print(
        f"  {run['mode']:<17} c={run['concurrency']:<2} {run['requests']:>3} requests  "
        f"{run['rps']:6.3f} rps  p50 {run['p50_ms']:8.0f} ms  p95 {run['p95_ms']:8.0f} ms  "
        f"[{run['busy_s']:.1f} s]{note}",
        flush=True,
    )


def max_pixel_difference(png_a: bytes, png_b: bytes) -> int:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png_a)).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(png_b)).convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        return 255
    return int(np.abs(a - b).max())


async def measure_modes(
    senders: dict[str, Send],
    workload: Workload,
    levels: list[int],
    minimum: int,
    per_client: int,
    warmups: dict[str, bytes],
) -> list[dict]:
    """Warm up each mode, then every level; concurrency 1 interleaves the modes."""
    for name, send in senders.items():
        started = time.perf_counter()
        warmups[name] = await send(workload.body(WARMUP))
        print(f"  {name:<17} warm-up {time.perf_counter() - started:.1f} s", flush=True)
    runs = []
    for concurrency in levels:
        bodies = workload.bodies(requests_for_level(concurrency, minimum, per_client))
        if concurrency == 1 and len(senders) > 1:
            for name, result in (await interleaved(senders, bodies)).items():
                runs.append(summarize(name, 1, result, was_interleaved=True))
                progress(runs[-1])
            continue
        for name, send in senders.items():
            runs.append(summarize(name, concurrency, await closed_loop(send, bodies, concurrency)))
            progress(runs[-1])
    return runs


# --------------------------------------------------------------------------- Ray and the two applications


def dag_cpu_shares(deployment_options: dict[str, dict]) -> float:
    """Logical CPUs the DAG holds at its initial size: replicas x num_cpus, config over code."""
    from deployments.denoiser import deployment as denoiser
    from deployments.prompt import deployment as prompt_optimizer
    from deployments.text_encoder import deployment as text_encoder
    from deployments.vae import deployment as vae_codec
    from serve_app.app import Ingress

    code_defaults = {
        "Ingress": Ingress,
        "PromptOptimizer": prompt_optimizer.build_deployment(),
        "TextEncoder": text_encoder.build_deployment(),
        "Denoiser": denoiser.build_deployment(),
        "VaeCodec": vae_codec.build_deployment(),
    }
    total = 0.0
    for name, deployment in code_defaults.items():
        options = deployment_options.get(name, {})
        actor = {**(deployment.ray_actor_options or {}), **(options.get("ray_actor_options") or {})}
        total += initial_replicas(options) * float(actor.get("num_cpus", 1))
    return round(total, 3)


def initial_replicas(options: dict) -> int:
    if isinstance(options.get("num_replicas"), int):
        return options["num_replicas"]
    autoscaling = options.get("autoscaling_config") or {}
    if autoscaling.get("initial_replicas") is not None:
        return autoscaling["initial_replicas"]
    return autoscaling.get("min_replicas", 1)


def check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(f"port {port} is in use; pass --port with a free one") from None


def start_ray(num_cpus: int, port: int, serve_config: dict) -> None:
    from serve_app.config import apply_ray_environment

    apply_ray_environment()  # the environment `fusionserve serve` runs Ray with
    import ray
    from ray import serve

    # Serve's INFO lines ("Connecting to existing Serve app...") would drown the progress lines.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # address="local": always a fresh instance, never a cluster named by RAY_ADDRESS.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    http_options = {**(serve_config.get("http_options") or {}), "host": "127.0.0.1", "port": port}
    serve.start(http_options=http_options, proxy_location=serve_config.get("proxy_location", "HeadOnly"))


def stop_ray() -> None:
    import ray

    # The benchmark's own Ray instance: ray.shutdown() stops Serve with it, without Serve's
    # graceful drain (~30 s for the direct-ingress replica).
    ray.shutdown()


def deploy_dag(settings, deployment_options: dict) -> None:
    from ray import serve

    from serve_app.app import build_application

    serve.run(build_application(settings, deployment_options), name=APP_NAME, route_prefix="/")


def build_baseline_app(model_path: str, num_threads: int | None, ingress_options: dict, model_cpus: float):
    """Ray Serve's Stable Diffusion example on this model: the whole diffusers pipeline in one
    deployment that takes one request at a time; the ingress PNG-encodes the image."""
    from io import BytesIO

    from fastapi import FastAPI
    from fastapi.responses import Response
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    api = FastAPI()

    @serve.deployment(name="APIIngress", **ingress_options)
    @serve.ingress(api)
    class APIIngress:
        def __init__(self, diffusion_model_handle: DeploymentHandle) -> None:
            self.handle = diffusion_model_handle

        @api.get("/imagine", responses={200: {"content": {"image/png": {}}}}, response_class=Response)
        async def generate(
            self, prompt: str, img_size: int = 512, seed: int = 0, steps: int = 20, guidance_scale: float = 7.5
        ):
            assert len(prompt), "prompt parameter cannot be empty"
            image = await self.handle.generate.remote(prompt, img_size, seed, steps, guidance_scale)
            file_stream = BytesIO()
            image.save(file_stream, "PNG")
            return Response(content=file_stream.getvalue(), media_type="image/png")

    @serve.deployment(
        name="StableDiffusion", num_replicas=1, max_ongoing_requests=1, ray_actor_options={"num_cpus": model_cpus}
    )
    class StableDiffusion:
        def __init__(self, path: str, threads: int | None) -> None:
            import torch
            from diffusers import StableDiffusionPipeline

            # fp32 on CPU (the example's fp16 is for GPUs); explicit, or a component stored in
            # fp16 (the portrait text encoder) loads as fp16 beside an fp32 UNet
            self.pipe = StableDiffusionPipeline.from_pretrained(
                path, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
            )
            self.pipe.set_progress_bar_config(disable=True)
            self.threads = int(threads or os.cpu_count() or 1)

        def generate(self, prompt: str, img_size: int, seed: int, steps: int, guidance_scale: float):
            import torch

            # A fractional-CPU replica gets OMP_NUM_THREADS=1 and OpenMP keeps the count per
            # OS thread: set it here, in the thread that runs the model, as our engines do.
            torch.set_num_threads(self.threads)
            generator = torch.Generator("cpu").manual_seed(seed)  # the noise our denoiser draws
            with torch.inference_mode():
                return self.pipe(
                    prompt,
                    height=img_size,
                    width=img_size,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    generator=generator,
                ).images[0]

    return APIIngress.bind(StableDiffusion.bind(model_path, num_threads))


def deploy_baseline(model_path: Path, settings, deployment_options: dict, total_cpus: float) -> None:
    from ray import serve

    # Same ingress settings as ours, the rest of the DAG's CPU shares to the one model replica.
    ours = deployment_options.get("Ingress", {})
    ingress_options = {
        "ray_actor_options": ours.get("ray_actor_options", {"num_cpus": 0.1}),
        "max_ongoing_requests": ours.get("max_ongoing_requests", 64),
    }
    model_cpus = round(total_cpus - float(ingress_options["ray_actor_options"].get("num_cpus", 0)), 3)
    app = build_baseline_app(str(model_path), settings.num_threads, ingress_options, model_cpus)
    serve.run(app, name=BASELINE_NAME, route_prefix=BASELINE_PREFIX)


# --------------------------------------------------------------------------- the run


def run_benchmark(options: argparse.Namespace) -> dict:
    from deployments.models import loading
    from serve_app.flow.pipeline import local_pipeline_for
    from serve_app.ops.cli import load_serve_config, split_app_config

    started = time.perf_counter()
    serve_config = load_serve_config(options.config)
    settings, deployment_options, _ = split_app_config(serve_config, options.model)
    model_path = loading.resolve_model(settings.model)
    workload = Workload(options.size, options.steps, options.guidance_scale)
    levels, modes = options.concurrency, options.modes
    minimum, per_client = options.requests_per_level, (1 if options.quick else 2)
    shares = dag_cpu_shares(deployment_options)
    num_cpus = max(options.num_cpus, math.ceil(shares))
    use_ray = "served" in modes or "single_deployment" in modes
    runs: list[dict] = []
    warmups: dict[str, bytes] = {}

    print(
        f"serving_overhead: {model_path.name}, {workload.size}x{workload.size}, {workload.steps} steps, "
        f"modes {','.join(modes)}, concurrency {','.join(map(str, levels))}",
        flush=True,
    )
    if use_ray:
        check_port_free(options.port)
    # One event loop for every phase: the in-process engines keep their worker threads
    # (and so their OpenMP thread teams) from one phase to the next.
    with asyncio.Runner() as runner:
        if use_ray:
            print(f"starting Ray (num_cpus={num_cpus}) and Serve on 127.0.0.1:{options.port}...", flush=True)
            start_ray(num_cpus, options.port, serve_config)
        try:
            senders: dict[str, Send] = {}
            if "in_process" in modes:
                pipeline = local_pipeline_for(model_path, settings)
                senders["in_process"] = in_process_sender(pipeline, settings)
            if "served" in modes:
                phase = time.perf_counter()
                deploy_dag(settings, deployment_options)
                print(f"deployed {APP_NAME} ({shares} CPU shares) in {time.perf_counter() - phase:.1f} s", flush=True)
            if senders or "served" in modes:
                runs += runner.run(
                    _phase_one(senders, "served" in modes, options, workload, levels, minimum, per_client, warmups)
                )
            if "single_deployment" in modes:
                from ray import serve

                if "served" in modes:
                    serve.delete(APP_NAME)  # frees its CPU shares for the baseline
                phase = time.perf_counter()
                deploy_baseline(model_path, settings, deployment_options, shares)
                print(
                    f"deployed {BASELINE_NAME} ({shares} CPU shares) in {time.perf_counter() - phase:.1f} s", flush=True
                )
                runs += runner.run(_phase_two(options, workload, levels, minimum, per_client, warmups))
        finally:
            if use_ray:
                stop_ray()

    return assemble_results(
        runs, warmups, options, settings, model_path, workload, shares, num_cpus, time.perf_counter() - started
    )


async def _phase_one(
    senders: dict[str, Send], served: bool, options, workload, levels, minimum, per_client, warmups
) -> list[dict]:
    """in_process and served, level by level (interleaved at concurrency 1)."""
    async with http_client(options.port, max(levels)) as client:
        if served:
            await wait_for_route(client, "/healthz")
            senders["served"] = served_sender(client)
        return await measure_modes(senders, workload, levels, minimum, per_client, warmups)


async def _phase_two(options, workload, levels, minimum, per_client, warmups) -> list[dict]:
    async with http_client(options.port, max(levels)) as client:
        await wait_for_route(client, f"{BASELINE_PREFIX}/openapi.json")
        senders = {"single_deployment": baseline_sender(client)}
        return await measure_modes(senders, workload, levels, minimum, per_client, warmups)


def assemble_results(runs, warmups, options, settings, model_path, workload, shares, num_cpus, elapsed_s) -> dict:
    from deployments.models import loading

    results: dict = {"runs": runs}
    results.update(derived_ratios(runs))
    reference = warmups.get("in_process") or next(iter(warmups.values()), None)
    results["config"] = {
        **machine_info(),
        "model": settings.model,
        "model_id": loading.model_id(model_path),
        "size": f"{workload.size}x{workload.size}",
        "steps": workload.steps,
        "guidance_scale": workload.guidance_scale,
        "prompts": list(PROMPTS),
        "seed_base": workload.seed_base,
        "concurrency": options.concurrency,
        "modes": options.modes,
        "quick": options.quick,
        "requests_per_level_min": options.requests_per_level,
        "requests_per_client": 1 if options.quick else 2,
        "ray_num_cpus": num_cpus,
        "cpu_shares_per_app": shares,
        "serve_config": str(options.config),
        "port": options.port,
        # Same seed and math in every mode: the warm-up images should be identical.
        "warmup_max_pixel_diff": {name: max_pixel_difference(reference, png) for name, png in warmups.items()},
        "elapsed_s": round(elapsed_s, 1),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line("benchmarks.serving_overhead"),
    }
    return results


def derived_ratios(runs: list[dict]) -> dict:
    """Serving overhead at concurrency 1 and throughput ratios per level."""
    by_key = {(run["mode"], run["concurrency"]): run for run in runs}
    derived: dict = {"overhead_ms_c1": None, "overhead_ratio_c1": None, "overhead_ms_c1_paired_median": None}
    local, served = by_key.get(("in_process", 1)), by_key.get(("served", 1))
    if local and served:
        derived["overhead_ms_c1"] = round(served["p50_ms"] - local["p50_ms"], 1)
        derived["overhead_ratio_c1"] = round(served["p50_ms"] / local["p50_ms"], 4)
        if served["interleaved"] and local["interleaved"]:
            # Paired differences of back-to-back requests: less sensitive to drift than the p50s.
            pairs = [a - b for a, b in zip(served["latencies_ms"], local["latencies_ms"])]
            derived["overhead_ms_c1_paired_median"] = round(percentile(pairs, 50), 1)
    levels = sorted({run["concurrency"] for run in runs})
    for numerator, denominator in (("served", "single_deployment"), ("served", "in_process")):
        ratios = {
            str(c): round(by_key[(numerator, c)]["rps"] / by_key[(denominator, c)]["rps"], 4)
            for c in levels
            if (numerator, c) in by_key and (denominator, c) in by_key
        }
        derived[f"rps_ratio_{numerator}_vs_{denominator}"] = ratios or None
    return derived


def machine_info() -> dict:
    import diffusers
    import torch

    info = {
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "git_commit": git_commit(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=CHECKOUT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}{'-dirty' if dirty else ''}"


# --------------------------------------------------------------------------- reporting


def _ordered_runs(results: dict) -> list[dict]:
    return sorted(results["runs"], key=lambda r: (r["concurrency"], MODES.index(r["mode"])))


def console_table(results: dict) -> str:
    lines = [f"{'mode':<18}{'conc':>5}{'reqs':>6}{'rps':>9}{'p50 ms':>10}{'p95 ms':>10}"]
    for run in _ordered_runs(results):
        lines.append(
            f"{run['mode']:<18}{run['concurrency']:>5}{run['requests']:>6}{run['rps']:>9.3f}"
            f"{run['p50_ms']:>10.0f}{run['p95_ms']:>10.0f}"
        )
    summary = summary_lines(results)
    return "\n".join(lines + (["", *summary] if summary else []))


def summary_lines(results: dict) -> list[str]:
    lines = []
    if results.get("overhead_ms_c1") is not None:
        line = (
            f"Serving overhead at concurrency 1 (p50 served - p50 in_process): "
            f"{results['overhead_ms_c1']:+.0f} ms per request, served/in_process = "
            f"{results['overhead_ratio_c1']:.3f}x"
        )
        if results.get("overhead_ms_c1_paired_median") is not None:
            line += f" (median of back-to-back pairs: {results['overhead_ms_c1_paired_median']:+.0f} ms)"
        lines.append(line + ".")
    for key, label in (
        ("rps_ratio_served_vs_single_deployment", "Throughput served / single_deployment"),
        ("rps_ratio_served_vs_in_process", "Throughput served / in_process"),
    ):
        if results.get(key):
            lines.append(f"{label}: " + ", ".join(f"c={c} {r:.2f}x" for c, r in results[key].items()) + ".")
    return lines


def markdown_table(results: dict) -> str:
    """The README table, regenerated from a results JSON."""
    lines = [
        "| mode | concurrency | requests | rps | p50 (ms) | p95 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in _ordered_runs(results):
        lines.append(
            f"| {run['mode']} | {run['concurrency']} | {run['requests']} | {run['rps']:.3f} | "
            f"{run['p50_ms']:,.0f} | {run['p95_ms']:,.0f} |"
        )
    config = results.get("config", {})
    note = (
        f"{config.get('model', '?')} model, {config.get('size', '?')}, {config.get('steps', '?')} steps, "
        f"guidance {config.get('guidance_scale', '?')}; {config.get('cpu_count', '?')} CPUs "
        f"({config.get('cpu_model', '?')}), {'GPU ' + config['gpu'] if config.get('gpu') else 'no GPU'}; "
        f"torch {config.get('torch', '?')}, Ray {config.get('ray', '?')}; {config.get('date', '?')}; "
        f"`{config.get('command', '')}`"
    )
    return "\n".join(lines + [""] + [f"{line}  " for line in summary_lines(results)] + ["", f"<sub>{note}</sub>"])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, (rps_axis, latency_axis) = plt.subplots(1, 2, figsize=(11, 4.3))
    colors = {"in_process": "tab:blue", "served": "tab:orange", "single_deployment": "tab:green"}
    levels = sorted({run["concurrency"] for run in results["runs"]})
    for mode in MODES:
        runs = sorted((r for r in results["runs"] if r["mode"] == mode), key=lambda r: r["concurrency"])
        if not runs:
            continue
        x = [r["concurrency"] for r in runs]
        color = colors[mode]
        rps_axis.plot(x, [r["rps"] for r in runs], "o-", color=color, label=mode)
        latency_axis.plot(x, [r["p50_ms"] / 1000 for r in runs], "o-", color=color, label=f"{mode} p50")
        latency_axis.plot(x, [r["p95_ms"] / 1000 for r in runs], "s--", color=color, alpha=0.7, label=f"{mode} p95")
    rps_axis.set(title="Throughput", xlabel="concurrent clients", ylabel="requests / s", xticks=levels)
    latency_axis.set(title="Latency", xlabel="concurrent clients", ylabel="seconds per request", xticks=levels)
    for axis in (rps_axis, latency_axis):
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    config = results.get("config", {})
    figure.suptitle(
        f"Serving overhead — {config.get('model', '?')} model, {config.get('size', '?')}, "
        f"{config.get('steps', '?')} steps, {config.get('cpu_count', '?')} CPUs, "
        f"{config.get('date', '')[:10]}",
        fontsize=10,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def report(results: dict, options: argparse.Namespace, json_path: Path) -> None:
    plot(results, plot_path(json_path))
    print()
    print(console_table(results))
    if options.markdown:
        print()
        print(markdown_table(results))
    if options.update_readme:
        update_readme(Path(options.update_readme), markdown_table(results), options.readme_section)


# --------------------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers like 1,4,8")
    return values


def _modes(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = set(values) - set(MODES)
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}")
    return [mode for mode in MODES if mode in values]  # fixed order: in_process, served, baseline


def parser() -> argparse.ArgumentParser:
    from serve_app.ops.cli import DEFAULT_CONFIG

    root = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument(
        "--quick",
        action="store_true",
        help="one request per client per level, at least 3 (under three minutes on 2 cores)",
    )
    root.add_argument("--concurrency", type=_int_list, default=[1, 4, 8], help="levels (default: 1,4,8)")
    root.add_argument(
        "--requests-per-level",
        type=int,
        help="minimum requests per (mode, level); a level sends max(concurrency x 2, this) "
        "(x 1 with --quick). Default 8, or 3 with --quick",
    )
    root.add_argument("--modes", type=_modes, default=list(MODES), help=f"default: {','.join(MODES)}")
    root.add_argument("--port", type=int, default=8300, help="Serve HTTP port (default: %(default)s)")
    root.add_argument(
        "--num-cpus",
        type=int,
        default=os.cpu_count() or 1,
        help="CPUs given to Ray (default: this machine's, %(default)s)",
    )
    root.add_argument("--config", default=DEFAULT_CONFIG, help="Serve config file (default: %(default)s)")
    root.add_argument("--model", help="model preset or folder (default: the config's, tiny)")
    root.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    root.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    root.add_argument("--guidance-scale", type=float, default=7.5)
    root.add_argument(
        "--json", help="results file, its plot beside it (default: benchmarks/results/[quick/]serving_overhead.json)"
    )
    root.add_argument("--markdown", action="store_true", help="also print the README table (markdown)")
    root.add_argument("--update-readme", metavar="README", help="rewrite the table between the markers in this file")
    root.add_argument(
        "--readme-section", default=README_SECTION, help="marker name in the README (default: %(default)s)"
    )
    root.add_argument(
        "--from-json", metavar="PATH", help="no run: redraw the plot (beside PATH) and the table from this results file"
    )
    return root


def main(argv: list[str] | None = None) -> int:
    options = parser().parse_args(argv)
    if options.from_json:
        json_path = Path(options.from_json)
        results = json.loads(json_path.read_text())
        report(results, options, json_path)
        return 0
    if options.requests_per_level is None:
        options.requests_per_level = 3 if options.quick else 8
    results = run_benchmark(options)
    json_path = results_path(README_SECTION, options.quick, options.json)
    write_json(results, json_path)
    report(results, options, json_path)
    print(f"\ntotal {results['config']['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
