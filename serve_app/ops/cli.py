"""The `fusionserve` command: serve, generate in-process, build model presets, manage API keys."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
import time
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from deployments.models.portrait.adherence import PromptExpectations
    from deployments.models.portrait.judge import Reading
    from serve_app.config import AppSettings
    from serve_app.flow.quality import ABResult
    from serve_app.flow.request import ImageRequest

DEFAULT_CONFIG = "serve_config.yaml"
CONFIG_PACKAGE = "fusionserve_configs"  # configs/, installed as package data (pyproject.toml)


class CliError(Exception):
    """A mistake the user can fix: `main` prints `error: MESSAGE` to stderr and exits with `status`
    (2, as argparse does for bad arguments; 1 for an unusable config file, as it always was)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


@contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Exceptions of `kinds` raised inside become a CliError with their message; an API error
    (`.message` and `.param`) names the parameter to fix first."""
    try:
        yield
    except kinds as exc:
        message, param = getattr(exc, "message", None), getattr(exc, "param", None)
        if message is None:
            message = str(exc)
        raise CliError(f"{param}: {message}" if param else message) from exc


# --------------------------------------------------------------------------- the config file


def packaged_config() -> Path:
    """serve_config.yaml as installed with the package (in a checkout: the top-level file)."""
    return Path(str(resources.files(CONFIG_PACKAGE) / DEFAULT_CONFIG))


def load_serve_config(path: str | os.PathLike[str], profile: str | None = None) -> dict[str, Any]:
    """serve_config.yaml's content, with a named profile (configs/profiles/) applied."""
    config = _read_serve_config(Path(path))
    if profile:
        from serve_app.ops.profiles import apply_profile, load_profile

        try:
            config = apply_profile(config, load_profile(profile))
        except ValueError as exc:
            raise CliError(str(exc), status=1) from None
    return config


def _read_serve_config(path: Path) -> dict[str, Any]:
    if str(path) == DEFAULT_CONFIG and not path.is_file():
        path = packaged_config()  # run from another directory: the config the package ships
    if not path.is_file():
        raise CliError(f"config file {path} not found (pass --config PATH)", status=1)
    config = yaml.safe_load(path.read_text()) or {}
    if not config.get("applications"):
        raise CliError(f"{path} has no `applications:` entry", status=1)
    return config


def split_app_config(
    config: dict[str, Any], model: str | None = None
) -> tuple[AppSettings, dict[str, dict[str, Any]], dict[str, Any]]:
    """serve_config.yaml -> (AppSettings, deployment options by name, application entry)."""
    from serve_app.config import AppSettings

    application = config["applications"][0]
    args = dict(application.get("args") or {})
    if model:
        args["model"] = model
    deployment_options = {}
    for entry in application.get("deployments") or []:
        entry = dict(entry)
        deployment_options[entry.pop("name")] = entry
    return AppSettings.model_validate(args), deployment_options, application


def _settings(options: argparse.Namespace) -> AppSettings:
    """The application settings a command runs with: --config, --model over it."""
    settings, _, _ = split_app_config(load_serve_config(options.config), options.model)
    return settings


def _resolved_model(settings: AppSettings) -> Path:
    from deployments.models import loading

    with user_errors(loading.ModelNotFoundError):
        return loading.resolve_model(settings.model)


def _serving_settings(options: argparse.Namespace) -> AppSettings:
    """The settings as the server has them once its model is loaded (the default size filled in)."""
    from deployments.models import loading

    settings = _settings(options)
    return settings.with_native_size(loading.native_size(_resolved_model(settings)))


# --------------------------------------------------------------------------- serve


def cmd_serve(options: argparse.Namespace) -> int:
    from serve_app.config import apply_ray_environment

    apply_ray_environment()
    import ray
    from ray import serve

    from serve_app.app import build_application

    config = load_serve_config(options.config, options.profile)
    settings, deployment_options, application = split_app_config(config, options.model)
    _resolved_model(settings)  # fail (or build the preset) before Ray starts
    settings = _with_api_keys(settings, options.api_keys_file)
    http_options = dict(config.get("http_options") or {})
    if options.host:
        http_options["host"] = options.host
    if options.port:
        http_options["port"] = options.port
    _warn_if_open(http_options, settings)

    profile = f", profile {options.profile}" if options.profile else ""
    print(f"fusionserve: model {settings.model!r}, config {options.config}{profile}", flush=True)
    joined_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if joined_cluster:  # an existing cluster (e.g. KubeRay): join it as it is
        context = ray.init(logging_level=logging.WARNING)
    else:
        context = ray.init(dashboard_host="127.0.0.1", include_dashboard=True, logging_level=logging.WARNING)
    serve.start(http_options=http_options, proxy_location=config.get("proxy_location", "HeadOnly"))
    serve.run(
        build_application(settings, deployment_options),
        name=application.get("name", "fusionserve"),
        route_prefix=application.get("route_prefix", "/"),
    )
    _print_addresses(http_options, context.dashboard_url or "")
    _wait_for_ctrl_c()
    _drain(application.get("name", "fusionserve"), settings.drain_grace_s)
    print("stopping: shutting down Serve and Ray...", flush=True)
    try:
        # On a Ray instance of our own, ray.shutdown() stops every process at once; Serve's
        # graceful shutdown would wait ~30 s for the direct-ingress replica to drain.
        if joined_cluster:
            serve.shutdown()
    finally:
        ray.shutdown()
    print("stopped.", flush=True)
    return 0


def _drain(app_name: str, grace_s: float) -> None:
    """New requests get 503 from now on; wait for those in flight, up to `grace_s`."""
    from serve_app.http.drain import begin_drain_in_replica, in_flight_in_replica
    from serve_app.ops.replicas import call_in_replicas

    waiting = sum(call_in_replicas(app_name, "Ingress", begin_drain_in_replica))
    print(f"\ndraining: new requests get 503; {waiting} in flight, up to {grace_s:g} s to finish", flush=True)
    deadline = time.monotonic() + grace_s
    while waiting and time.monotonic() < deadline:
        time.sleep(0.2)
        waiting = sum(call_in_replicas(app_name, "Ingress", in_flight_in_replica))
    if waiting:
        print(f"drain: {waiting} requests still in flight after {grace_s:g} s; stopping anyway", flush=True)


def _with_api_keys(settings: AppSettings, api_keys_file: str | None) -> AppSettings:
    """The settings with --api-keys-file over the config's, as an absolute path (the ingress
    replica's working directory is not ours); the file is read now, so a bad one fails before Ray starts."""
    from serve_app.http.api_keys import KeyFileError, read_keys

    path = api_keys_file or settings.api_keys_file
    if path is None:
        return settings
    resolved = Path(path).expanduser().resolve()
    with user_errors(KeyFileError):
        keys = read_keys(resolved)
    if not keys.keys:
        print(f"warning: {resolved} holds no key: every /v1 request will be refused", file=sys.stderr, flush=True)
    return settings.model_copy(update={"api_keys_file": str(resolved)})


def _warn_if_open(http_options: dict[str, Any], settings: AppSettings) -> None:
    host = http_options.get("host", "127.0.0.1")
    if settings.api_keys_file is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {host} without API keys: anyone who reaches the port can use the "
            "machine; turn them on with --api-keys-file (see `fusionserve keys add`)",
            file=sys.stderr,
            flush=True,
        )


def _print_addresses(http_options: dict[str, Any], dashboard: str) -> None:
    host, port = http_options.get("host", "127.0.0.1"), http_options.get("port", 8000)
    if dashboard and not dashboard.startswith("http"):
        dashboard = f"http://{dashboard}"
    print(f"\nAPI:        http://{host}:{port}   (OpenAPI docs at http://{host}:{port}/docs)", flush=True)
    print(f"Dashboard:  {dashboard or 'not running'}", flush=True)
    token_file = Path.home() / ".ray" / "auth_token"
    if dashboard and token_file.is_file():
        print(
            f"            (Ray token auth is on: sign in with the token in {token_file}, "
            "also printed by `ray get-auth-token`)",
            flush=True,
        )
    print("Logs:       /tmp/ray/session_latest/logs/serve/", flush=True)
    print("Press Ctrl-C to stop.", flush=True)


def _wait_for_ctrl_c() -> None:
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    # Explicit handlers: a shell may start us with SIGINT ignored, and Ctrl-C must work.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stop:
        time.sleep(0.2)


# --------------------------------------------------------------------------- in-process images


def _request_options(options: argparse.Namespace) -> dict[str, Any]:
    """The fields `generate` and `edit` share, from their command-line options."""
    return dict(
        prompt=options.prompt,
        n=options.n,
        size=options.size,
        negative_prompt=options.negative_prompt,
        seed=options.seed,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance_scale,
        optimize_prompt=not options.no_optimize,
        step_policy=options.step_policy,
        deadline_ms=options.deadline_ms,
        quality=options.quality,
        scheduler=options.scheduler,
    )


def cmd_generate(options: argparse.Namespace) -> int:
    # The server's settings (threads, limits, prompt templates), so images match it byte for byte.
    from deployments.models import loading
    from serve_app.http.image_request import check_generation_supported, to_image_request
    from serve_app.http.schemas import ImageGenerationBody

    settings = _serving_settings(options)

    def request() -> ImageRequest:
        check_generation_supported(loading.features(_resolved_model(settings)))
        return to_image_request(ImageGenerationBody(**_request_options(options)), settings)

    return _render(options, settings, request)


def cmd_edit(options: argparse.Namespace) -> int:
    """An edit in-process, through the same checks as `/v1/images/edits`."""
    from deployments.models import loading
    from serve_app.http.image_request import decoded_edit_inputs, to_image_request
    from serve_app.http.schemas import ImageEditForm

    settings = _serving_settings(options)
    files = {}
    for field, path in (("image", options.image), ("mask", options.mask), ("reference_image", options.reference)):
        if path is not None:
            try:
                files[field] = Path(path).read_bytes()
            except OSError as exc:
                raise CliError(f"{field}: {exc}") from None

    def request() -> ImageRequest:
        form = ImageEditForm(
            **_request_options(options),
            strength=options.strength,
            keep_unmasked=not options.blend_only,
            reference_scale=options.reference_scale,
        )
        features = loading.features(_resolved_model(settings))
        return to_image_request(form, settings, decoded_edit_inputs(files, form, settings, features))

    return _render(options, settings, request)


def _render(options: argparse.Namespace, settings: AppSettings, make_request: Callable[[], ImageRequest]) -> int:
    """Check the request as the server would, run it in-process with a progress bar, write the PNGs."""
    from tqdm import tqdm

    from serve_app.flow.pipeline import local_pipeline_for
    from serve_app.http.errors import ApiError

    with user_errors(ApiError, ValueError):  # ValueError: pydantic's ValidationError
        request = make_request()
    model_path = _resolved_model(settings)
    bar = tqdm(desc="denoising", unit="step")

    def on_step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    pipeline = local_pipeline_for(model_path, settings, on_step=on_step)
    result = asyncio.run(pipeline.generate(request))
    bar.close()

    output = Path(options.output)
    paths = (
        [output]
        if len(result.images_png) == 1
        else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(result.images_png))]
    )
    for path, png in zip(paths, result.images_png):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        print(f"wrote {path}")
    steps = result.steps.steps
    ran = result.usage.denoising_steps
    print(
        f"prompt: {result.prompt.prompt!r} ({result.prompt.prompt_tokens} tokens), seed {request.seed}, "
        f"{steps} steps ({result.steps.reason})"
        + (f", {ran} run at strength {request.strength}" if request.is_edit else "")
    )
    return 0


def cmd_optimize(options: argparse.Namespace) -> int:
    """What the prompt optimizer makes of a prompt (the /v1/prompts/optimize body), no Ray."""
    from deployments.prompt.optimizer import PromptOptimizerEngine
    from serve_app.http.errors import ApiError
    from serve_app.http.image_request import check_text
    from serve_app.http.schemas import OptimizedPromptResponse

    settings = _settings(options)
    with user_errors(ApiError):
        check_text(options.prompt, "prompt", settings)
        check_text(options.negative_prompt, "negative_prompt", settings)
    engine = PromptOptimizerEngine(_resolved_model(settings), **settings.prompt.model_dump())
    body = OptimizedPromptResponse.of(engine.optimize(options.prompt, options.negative_prompt, options.namespace))
    if options.json:
        print(json.dumps(body.model_dump(mode="json"), ensure_ascii=False, indent=2))
    else:
        print(body.prompt)
        print(
            f"tokens: {body.original_tokens} -> {body.optimized_tokens - body.template_tokens} "
            f"({body.saved_fraction:.0%} saved), + {body.template_tokens} of the namespace template, "
            f"shared prefix {body.prefix_tokens}",
            file=sys.stderr,
        )
        for warning in body.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- the judge


def cmd_judge(options: argparse.Namespace) -> int:
    """The attributes the judge reads in each image and, with --prompt, the prompt's adherence."""
    from PIL import Image, UnidentifiedImageError

    from deployments.models.portrait.judge import Judge

    with user_errors(OSError, UnidentifiedImageError):
        images = [Image.open(path).convert("RGB") for path in options.images]
    asked = _prompt_expectations(options) if options.prompt is not None else None
    with user_errors(OSError, ValueError):
        judge = Judge.load(Path(options.weights)) if options.weights else Judge.packaged()
    reports = [_judge_report(path, reading, asked) for path, reading in zip(options.images, judge.read(images))]
    if options.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, ensure_ascii=False, indent=2))
    else:
        for report in reports:
            print(_judge_line(report))
    return 0


def _prompt_expectations(options: argparse.Namespace) -> PromptExpectations:
    """What --prompt asks that a portrait can show, as the prompt optimizer's parser reads it."""
    from deployments.models.portrait.adherence import expectations
    from deployments.prompt.optimizer import PromptOptimizerEngine

    settings = _settings(options)
    engine = PromptOptimizerEngine(_resolved_model(settings), **settings.prompt.model_dump())
    return expectations(engine.optimize(options.prompt).attributes, options.prompt)


def _judge_report(path: str, reading: Reading, asked: PromptExpectations | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "image": path,
        "attributes": reading.values,
        "accessories": sorted(reading.accessories),
        "confidence": reading.confidence,
    }
    if asked is not None:
        report |= {
            "adherence": asked.adherence(reading),
            "missed": asked.misses(reading),
            "not_drawable": list(asked.not_drawable),
        }
    return report


def _judge_line(report: dict[str, Any]) -> str:
    seen = ", ".join([*report["attributes"].values(), *report["accessories"]])
    line = f"{report['image']}: {seen}"
    if report.get("adherence") is not None:
        line += f"\n  adherence {report['adherence']:.0%}"
        if report["missed"]:
            line += f" (missed: {', '.join(report['missed'])})"
    return line


def cmd_train_judge(options: argparse.Namespace) -> int:
    """Train the judge on renders (resuming from --work's checkpoint), save it, report accuracy."""
    from deployments.models.portrait.judge_training import (
        JudgeTrainingConfig,
        evaluation_set,
        judge_accuracy,
        train_judge,
    )

    given = {name: getattr(options, name) for name in ("steps", "detail_steps", "expression_steps")}
    steps = {name: value for name, value in given.items() if value is not None}  # absent: the recipe's
    config = JudgeTrainingConfig(**steps, seed=options.seed, threads=options.threads)
    judge = train_judge(config, Path(options.work))
    judge.save(Path(options.output))
    attributes, seeds = evaluation_set(options.eval_images)
    accuracy = judge_accuracy(judge, attributes, seeds)
    print(json.dumps({"weights": options.output, "accuracy": {k: round(v, 4) for k, v in accuracy.items()}}, indent=2))
    return 0


def cmd_train_model(options: argparse.Namespace) -> int:
    """Train the portrait model (resuming from --work's checkpoints) into a diffusers folder."""
    from deployments.models.portrait.model_training import PortraitTrainingConfig, train_portrait_model

    names = ("vae_steps", "diffusion_steps", "adapter_steps", "pool_size", "seed", "threads")
    chosen = {name: getattr(options, name) for name in names}
    config = PortraitTrainingConfig(**{name: value for name, value in chosen.items() if value is not None})
    print(train_portrait_model(config, Path(options.work), Path(options.output)))
    return 0


# --------------------------------------------------------------------------- models


def cmd_build_model(options: argparse.Namespace) -> int:
    from deployments.models import builder, loading

    target = Path(options.output) if options.output else loading.preset_model_dir(options.preset)
    if options.output or options.force or not (target / "model_index.json").is_file():
        builder.build_model(options.preset, target)
    print(target)
    return 0


def cmd_prune_unet(options: argparse.Namespace) -> int:
    from deployments.denoiser.pruning import save_pruned_variant
    from deployments.models import loading

    if not 0.0 < options.fraction < 1.0:
        raise CliError("--fraction must be between 0 and 1 (exclusive)")
    source = loading.resolve_model(options.model)
    target = (
        Path(options.output)
        if options.output
        else source.with_name(f"{source.name}-pruned{round(options.fraction * 100)}")
    )
    summary = save_pruned_variant(source, target, options.fraction)
    print(
        f"{target}  (UNet parameters {summary['parameters_before']:,} -> {summary['parameters_after']:,}, "
        f"-{summary['params_reduction']:.0%}); serve it with --model {target}"
    )
    return 0


def cmd_ab_test(options: argparse.Namespace) -> int:
    """Quality guard: render the prompts x seeds with a baseline and a candidate variant in-process;
    exit 1 when the mean PSNR falls under --min-psnr or adherence drops more than 2 points."""
    from tqdm import tqdm

    from deployments.denoiser.backends import BackendUnavailable
    from deployments.models import loading
    from serve_app.flow.quality import VariantSpec, run_ab_test

    settings = _settings(options)
    with user_errors(ValueError):  # a spec naming an unknown key or value
        baseline, candidate = VariantSpec.parse(options.baseline), VariantSpec.parse(options.candidate)
    requests = _ab_test_requests(options, settings)
    prompts, size = [r.prompt for r in requests], (requests[0].width, requests[0].height)
    bar = tqdm(total=2 * len(prompts) * options.seeds, desc="rendering", unit="image")
    try:
        with user_errors(loading.ModelNotFoundError, BackendUnavailable):
            result = run_ab_test(
                baseline,
                candidate,
                prompts,
                options.seeds,
                settings,
                size=size,
                seed_base=options.seed_base,
                min_psnr_db=options.min_psnr,
                on_image=bar.update,
            )
    finally:
        bar.close()
    _print_ab_result(result, size)
    if options.json:
        Path(options.json).parent.mkdir(parents=True, exist_ok=True)
        Path(options.json).write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    return 0 if result.passed else 1


def _ab_test_requests(options: argparse.Namespace, settings: AppSettings) -> list[ImageRequest]:
    """The prompts file's prompts, through the API's own checks (text, size limits, multiples of 8)."""
    from serve_app.flow.quality import read_prompts
    from serve_app.http.errors import ApiError
    from serve_app.http.image_request import to_image_request
    from serve_app.http.schemas import ImageGenerationBody

    if options.seeds < 1:
        raise CliError(f"--seeds must be at least 1, got {options.seeds}")
    with user_errors(ApiError, ValueError):  # ValueError: the prompts file, pydantic's ValidationError
        return [
            to_image_request(ImageGenerationBody(prompt=prompt, size=options.size, seed=0), settings)
            for prompt in read_prompts(options.prompts)
        ]


def _print_ab_result(result: ABResult, size: tuple[int, int]) -> None:
    print(f"baseline:  {result.baseline}\ncandidate: {result.candidate}\nsize: {size[0]}x{size[1]}\n")
    print(f"{'prompt':<44} {'seed':>5} {'steps b/c':>9} {'PSNR dB':>8} {'SSIM':>7} {'adherence b/c':>13}")
    for pair in result.pairs:
        steps = f"{pair.baseline_steps}/{pair.candidate_steps}"
        adherence = f"{_percent(pair.baseline_adherence)}/{_percent(pair.candidate_adherence)}"
        print(
            f"{textwrap.shorten(pair.prompt, 44, placeholder='...'):<44} {pair.seed:>5} {steps:>9} "
            f"{pair.psnr_db:>8.2f} {pair.ssim:>7.4f} {adherence:>13}"
        )
    print(
        f"\nmean PSNR {result.mean_psnr_db:.2f} dB over the {result.differing} of {len(result.pairs)} images that "
        f"differ, mean SSIM {result.mean_ssim:.4f}; threshold {result.min_psnr_db:g} dB"
    )
    print(_adherence_line(result))
    frechet = (
        "n/a (fewer than 2 images a side)" if result.frechet_distance is None else f"{result.frechet_distance:.4f}"
    )
    print(f"Fréchet distance on judge features, baseline vs candidate images: {frechet}")
    print(_verdict_line(result))


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def _adherence_line(result: ABResult) -> str:
    drop = result.adherence_drop
    if drop is None:
        return "adherence: not judged (no prompt asks anything a portrait shows)"
    return (
        f"mean adherence {result.mean_baseline_adherence:.1%} baseline, {result.mean_candidate_adherence:.1%} "
        f"candidate: drop {drop * 100:.1f} points; allowed {result.max_adherence_drop * 100:g}"
    )


def _verdict_line(result: ABResult) -> str:
    """PASS, or which rules failed and FAIL (the last word stays the verdict)."""
    reasons = {
        "psnr": f"mean PSNR {result.mean_psnr_db:.2f} dB under {result.min_psnr_db:g} dB",
        "adherence": f"adherence dropped {(result.adherence_drop or 0) * 100:.1f} points, "
        f"more than {result.max_adherence_drop * 100:g}",
    }
    failed = [reasons[rule] for rule in result.failed_rules]
    return f"verdict: {'; '.join(failed)}: FAIL" if failed else "verdict: PASS"


# --------------------------------------------------------------------------- operations


def cmd_status(options: argparse.Namespace) -> int:
    """Replicas per stage, queues, cache hit rate and latency of the running application."""
    import ray

    from serve_app.ops import status

    try:
        ray.init(address=options.address, logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as exc:
        raise CliError(f"no running Ray cluster to connect to ({exc}); start one with `fusionserve serve`") from None
    try:
        with user_errors(LookupError):
            report = status.collect(options.app)
    finally:
        ray.shutdown()  # disconnects this driver only
    print(json.dumps(report, indent=2) if options.json else status.render(report), end="\n" if options.json else "")
    return 0


def cmd_export_config(options: argparse.Namespace) -> int:
    """The config with a profile applied, for Ray's own `serve run` / `serve deploy`."""
    config = load_serve_config(options.config, options.profile)
    text = f"# generated by: fusionserve export-config --profile {options.profile}\n" + yaml.safe_dump(
        config, sort_keys=False, width=120
    )
    if options.output:
        Path(options.output).write_text(text)
        print(f"wrote {options.output}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_export_kuberay(options: argparse.Namespace) -> int:
    """configs/kuberay/rayservice.yaml from the config and a profile; --check: exit 1 when stale."""
    from serve_app.ops import kuberay

    config = load_serve_config(options.config, options.profile)
    with user_errors(ValueError):
        text = kuberay.export(config, profile=options.profile, image=options.image, model_path=options.model_path)
    if options.output == "-":
        if options.check:
            raise CliError("--check compares with a file: give -o PATH (or none: the committed one)")
        print(text, end="")
        return 0
    output = Path(options.output or kuberay.DEFAULT_MANIFEST)
    if options.check:
        return _check_manifest(output, text, options)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {output}", file=sys.stderr)
    return 0


def _check_manifest(path: Path, generated: str, options: argparse.Namespace) -> int:
    from serve_app.ops import kuberay

    committed = path.read_text() if path.is_file() else ""
    if committed == generated:
        print(f"{path} is up to date", file=sys.stderr)
        return 0
    print(
        f"{path} differs from what `fusionserve export-kuberay` generates from {options.config} and "
        f"profile {options.profile}; regenerate it:\n{kuberay.diff(committed, generated, str(path))}",
        file=sys.stderr,
    )
    return 1


# --------------------------------------------------------------------------- API keys


def cmd_keys_add(options: argparse.Namespace) -> int:
    """A new key: stored hashed in the file, printed once (alone on the last line)."""
    from serve_app.http.api_keys import KeyFileError, add_key

    with user_errors(KeyFileError):
        stored, key = add_key(Path(options.file), options.name, options.requests_per_minute, options.max_concurrent)
    limits = ", ".join(
        f"{name} {value}"
        for name, value in (
            ("requests_per_minute", stored.requests_per_minute),
            ("max_concurrent", stored.max_concurrent),
        )
        if value is not None
    )
    print(f"added key {stored.name!r} to {options.file}" + (f" ({limits})" if limits else " (the server's limits)"))
    print("It is shown only this once (the file keeps its hash); send it as `Authorization: Bearer KEY`:")
    print(key)
    return 0


def cmd_keys_list(options: argparse.Namespace) -> int:
    """Names, creation times and limits; no secret is stored, so none can be shown."""
    from serve_app.http.api_keys import KeyFileError, read_keys

    with user_errors(KeyFileError):
        keys = read_keys(Path(options.file)).keys
    if options.json:
        print(json.dumps([key.model_dump(mode="json", exclude={"sha256"}) for key in keys], indent=2))
        return 0
    rows = [["NAME", "CREATED", "REQUESTS/MIN", "MAX CONCURRENT"]]
    for key in keys:
        limits = [
            str(value) if value is not None else "default" for value in (key.requests_per_minute, key.max_concurrent)
        ]
        rows.append([key.name, key.created.isoformat(), *limits])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_keys_revoke(options: argparse.Namespace) -> int:
    from serve_app.http.api_keys import KeyFileError, revoke_key

    with user_errors(KeyFileError):
        revoke_key(Path(options.file), options.name)
    print(f"revoked key {options.name!r}: a running server refuses it from its next request on")
    return 0


# --------------------------------------------------------------------------- the parser


def _choices(literal: Any) -> list[str]:
    """The values of a Literal type (the settings' validators), as argparse choices."""
    return [str(value) for value in typing.get_args(literal)]


def _spec_keys() -> str:
    """The keys of an ab-test variant spec, with the values the spec's validator accepts."""
    from serve_app.flow.variant_spec import VariantSpec

    def values(annotation: Any) -> list[str]:
        if typing.get_origin(annotation) is typing.Literal:
            return _choices(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            return [value for arg in typing.get_args(annotation) for value in values(arg)]
        return ["0..1"] if annotation is float else []

    keys = []
    for name, field in VariantSpec.model_fields.items():
        accepted = values(field.annotation)
        keys.append(f"{name} ({'|'.join(accepted)})" if accepted else name)
    return ", ".join(keys)


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """Parent parsers for the options several commands share."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=DEFAULT_CONFIG, help="Ray Serve config file (default: %(default)s)")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--model", help="preset name (tiny, sd15) or path to a diffusers SD 1.x folder (default: the config's)"
    )
    return {"config": config, "model": model}


def _add_serve(commands: Any, shared: dict[str, argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve", parents=[shared["config"], shared["model"]], help="start Ray and the Serve application"
    )
    serve.add_argument(
        "--profile",
        help="deployment profile merged over the config: laptop (default), single-gpu, "
        "cluster (configs/profiles/), or a path",
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--api-keys-file",
        metavar="PATH",
        help="require `Authorization: Bearer KEY` with a key of this file (made by `fusionserve keys add`); "
        "default: the config's api_keys_file, else no authentication",
    )
    serve.set_defaults(run=cmd_serve)


def _image_options(default_size: str | None) -> argparse.ArgumentParser:
    """Options of `generate` and `edit` (the request fields, and where the output goes)."""
    from deployments.denoiser.solvers import SolverName
    from serve_app.config import QualityTier, StepPolicy

    command = argparse.ArgumentParser(add_help=False)
    command.add_argument("-o", "--output", default="out.png")
    command.add_argument("--seed", type=int)
    command.add_argument(
        "--size",
        default=default_size,
        help="WIDTHxHEIGHT (default: %(default)s)"
        if default_size
        else "WIDTHxHEIGHT (default: the config's default_size, else the model's native size; "
        "edits: the image's, within the limits)",
    )
    command.add_argument("-n", type=int, default=1)
    command.add_argument("--steps", type=int, help="denoising steps (default: the step controller's choice)")
    command.add_argument("--quality", choices=_choices(QualityTier), help="the step range (default: the config's)")
    command.add_argument("--scheduler", choices=_choices(SolverName), help="the sampler (default: the model's own)")
    command.add_argument("--step-policy", choices=_choices(StepPolicy), help="default: the config's")
    command.add_argument("--deadline-ms", type=float, help="latency target for the slo policy")
    command.add_argument("--guidance-scale", type=float)
    command.add_argument("--negative-prompt", default="")
    command.add_argument("--no-optimize", action="store_true", help="use the prompt as written")
    return command


def _add_generate(commands: Any, shared: dict[str, argparse.ArgumentParser]) -> None:
    generate = commands.add_parser(
        "generate",
        parents=[shared["config"], shared["model"], _image_options(default_size=None)],
        help="generate an image in-process (no Ray)",
    )
    generate.add_argument("prompt")
    generate.set_defaults(run=cmd_generate)


def _add_edit(commands: Any, shared: dict[str, argparse.ArgumentParser]) -> None:
    edit = commands.add_parser(
        "edit",
        parents=[shared["config"], shared["model"], _image_options(default_size=None)],
        help="edit an image in-process (no Ray): img2img, inpainting, reference face",
    )
    edit.add_argument("prompt", help="the instruction")
    edit.add_argument("--image", required=True, help="the target image B (PNG, JPEG, WebP)")
    edit.add_argument("--mask", help="where to repaint: white on black (L), or transparent pixels (RGBA)")
    edit.add_argument("--reference", help="the source face A (needs a model with an image-prompt adapter)")
    edit.add_argument(
        "--reference-scale",
        type=float,
        help="the reference face's weight, 0-2 (default 1.5 with --mask, else 1.0; 0 ignores it)",
    )
    edit.add_argument("--strength", type=float, help="share of the steps run, (0, 1] (default 0.8; 1.0 with --mask)")
    edit.add_argument("--blend-only", action="store_true", help="do not paste the target back outside the mask")
    edit.set_defaults(run=cmd_edit)


def _add_optimize(commands: Any, shared: dict[str, argparse.ArgumentParser]) -> None:
    optimize = commands.add_parser(
        "optimize",
        parents=[shared["config"], shared["model"]],
        help="show what the prompt optimizer makes of a prompt (no Ray)",
    )
    optimize.add_argument("prompt")
    optimize.add_argument("--json", action="store_true", help="print the /v1/prompts/optimize JSON body")
    optimize.add_argument("--namespace", default="default", help="cache namespace (its template goes first)")
    optimize.add_argument("--negative-prompt", default="")
    optimize.set_defaults(run=cmd_optimize)


def _add_status(commands: Any) -> None:
    status = commands.add_parser("status", help="replicas, queues, cache hit rate of the running application")
    status.add_argument("--address", default="auto", help="Ray cluster to connect to (default: the local one)")
    status.add_argument("--app", default="fusionserve", help="Serve application name")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_status)


def _add_export_config(commands: Any, shared: dict[str, argparse.ArgumentParser]) -> None:
    export = commands.add_parser(
        "export-config",
        parents=[shared["config"]],
        help="write the config with a profile applied (for serve deploy)",
    )
    export.add_argument("--profile", required=True, help="laptop, single-gpu, cluster, or a path")
    export.add_argument("-o", "--output", help="file to write (default: stdout)")
    export.set_defaults(run=cmd_export_config)


def _add_export_kuberay(commands: Any, shared: dict[str, argparse.ArgumentParser]) -> None:
    from serve_app.ops import kuberay

    export = commands.add_parser(
        "export-kuberay",
        parents=[shared["config"]],
        help="write the KubeRay RayService manifest (serveConfigV2 from the config and a profile)",
    )
    export.add_argument(
        "--profile", default=kuberay.DEFAULT_PROFILE, help="profile merged over the config (default: %(default)s)"
    )
    export.add_argument(
        "-o",
        "--output",
        help=f"file to write, - for stdout (default: {kuberay.DEFAULT_MANIFEST}, under the current directory)",
    )
    export.add_argument(
        "--image",
        default=kuberay.DEFAULT_IMAGE,
        help="container image of every Ray pod (default: %(default)s, configs/kuberay/Dockerfile)",
    )
    export.add_argument(
        "--model-path",
        default=kuberay.DEFAULT_MODEL_PATH,
        help="model folder inside the pods, on the models volume (default: %(default)s)",
    )
    export.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 with a diff when the file differs from what would be generated",
    )
    export.set_defaults(run=cmd_export_kuberay)


def _add_build_model(commands: Any) -> None:
    build = commands.add_parser("build-model", help="build a model preset (tiny, sd15) and print its folder")
    build.add_argument("preset", nargs="?", default="tiny")
    build.add_argument("-o", "--output", help="folder to write (default: the model cache)")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(run=cmd_build_model)


def _add_prune_unet(commands: Any) -> None:
    prune = commands.add_parser("prune-unet", help="write a model variant with the UNet's inner channels pruned")
    prune.add_argument("--model", default="tiny", help="preset or model folder (default: %(default)s)")
    prune.add_argument("--fraction", type=float, default=0.3, help="share of prunable channels removed")
    prune.add_argument("-o", "--output", help="variant folder (default: next to the model, -prunedNN)")
    prune.set_defaults(run=cmd_prune_unet)


def _add_judge(commands: Any, shared: dict[str, argparse.ArgumentParser]) -> None:
    judge = commands.add_parser(
        "judge",
        parents=[shared["config"], shared["model"]],
        help="the portrait attributes an image shows and, with --prompt, its adherence (no Ray)",
    )
    judge.add_argument("images", nargs="+", metavar="IMAGE")
    judge.add_argument("--prompt", help="score the share of this prompt's drawable attributes the image shows")
    judge.add_argument("--json", action="store_true", help="one JSON object per image (one image: the object)")
    judge.add_argument("--weights", help="judge weights (default: the packaged judge)")
    judge.set_defaults(run=cmd_judge)


def _add_train_judge(commands: Any) -> None:
    train = commands.add_parser("train-judge", help="train the portrait judge on renders (resumes from --work)")
    train.add_argument(
        "--steps", type=int, help="the coarse network's steps of 64 renders (default: the recipe's, 8000)"
    )
    train.add_argument(
        "--detail-steps", type=int, help="then the detail network's, for earrings (default: the recipe's, 1500)"
    )
    train.add_argument(
        "--expression-steps", type=int, help="then the expression network's (default: the recipe's, 3000)"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=1, help="torch threads; one more process renders")
    train.add_argument("--work", default="judge-training", help="checkpoint and loss log folder")
    train.add_argument("-o", "--output", default="judge.safetensors", help="where the trained weights go")
    train.add_argument("--eval-images", type=int, default=1000, help="held-out renders to measure accuracy on")
    train.set_defaults(run=cmd_train_judge)


def _add_train_model(commands: Any) -> None:
    train = commands.add_parser("train-model", help="train the portrait model on renders (resumes from --work)")
    train.add_argument("preset", choices=["portrait"], help="the one model our code trains")
    # Defaults (None) are PortraitTrainingConfig's: importing it here would load torch for --help.
    train.add_argument("--vae-steps", type=int, help="VAE training steps")
    train.add_argument("--diffusion-steps", type=int, help="text encoder + UNet training steps")
    train.add_argument("--adapter-steps", type=int, help="image-prompt adapter training steps (0: no adapter)")
    train.add_argument("--pool-size", type=int, help="renders encoded once for the diffusion phase")
    train.add_argument("--seed", type=int)
    train.add_argument("--threads", type=int, help="torch threads of the trainer")
    train.add_argument("--work", default="portrait-training", help="checkpoints, loss logs, timings")
    train.add_argument("-o", "--output", default="portrait-model", help="the trained diffusers folder")
    train.set_defaults(run=cmd_train_model)


def _add_ab_test(commands: Any, shared: dict[str, argparse.ArgumentParser]) -> None:
    ab_test = commands.add_parser(
        "ab-test",
        parents=[shared["config"], shared["model"]],
        help="quality guard: PSNR/SSIM of a candidate variant against a baseline",
    )
    spec_help = f"variant spec key=value,...: {_spec_keys()}"
    ab_test.add_argument("--baseline", default="default", help=f"{spec_help} (default: %(default)s, torch fp32)")
    ab_test.add_argument("--candidate", required=True, help="variant spec, as --baseline")
    ab_test.add_argument("--prompts", required=True, help="text file, one prompt per line (# comments)")
    ab_test.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default: %(default)s)")
    ab_test.add_argument("--seed-base", type=int, default=0, help="first seed (default: %(default)s)")
    ab_test.add_argument("--size", default="128x128", help="WIDTHxHEIGHT (default: %(default)s)")
    ab_test.add_argument(
        "--min-psnr", type=float, help="mean PSNR to pass, dB (default: the config's quality_guard.min_psnr_db, 32)"
    )
    ab_test.add_argument("--json", help="also write the whole result to this file")
    ab_test.set_defaults(run=cmd_ab_test)


def _add_keys(commands: Any) -> None:
    keys = commands.add_parser("keys", help="API keys: add, list, revoke (the server re-reads the file)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    key_file = argparse.ArgumentParser(add_help=False)
    key_file.add_argument("--file", required=True, metavar="PATH", help="the key file (JSON; created by add)")

    add = actions.add_parser("add", parents=[key_file], help="make a key, print it once, store its hash")
    add.add_argument("--name", help="unique name, shown in metrics and limits (default: key-N)")
    add.add_argument("--requests-per-minute", type=int, help="this key's limit (default: the server's api_key_limits)")
    add.add_argument("--max-concurrent", type=int, help="this key's limit (default: the server's api_key_limits)")
    add.set_defaults(run=cmd_keys_add)

    listing = actions.add_parser("list", parents=[key_file], help="names, creation times, limits (no secrets)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_keys_list)

    revoke = actions.add_parser("revoke", parents=[key_file], help="remove a key; a running server refuses it")
    revoke.add_argument("name")
    revoke.set_defaults(run=cmd_keys_revoke)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="fusionserve", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    shared = _shared_options()
    _add_serve(commands, shared)
    _add_generate(commands, shared)
    _add_edit(commands, shared)
    _add_optimize(commands, shared)
    _add_status(commands)
    _add_export_config(commands, shared)
    _add_export_kuberay(commands, shared)
    _add_build_model(commands)
    _add_prune_unet(commands)
    _add_ab_test(commands, shared)
    _add_judge(commands, shared)
    _add_train_judge(commands)
    _add_train_model(commands)
    _add_keys(commands)
    return root


def main(argv: list[str] | None = None) -> int:
    options = parser().parse_args(argv)
    try:
        status: int = options.run(options)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.status
    return status


if __name__ == "__main__":
    sys.exit(main())
