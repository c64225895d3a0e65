"""The `fusionserve` command: serve, generate in-process, build model presets."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import yaml

DEFAULT_CONFIG = "serve_config.yaml"
PROJECT_CONFIG = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG


def load_serve_config(path: str | os.PathLike, profile: str | None = None) -> dict:
    """serve_config.yaml's content, with a named profile (configs/profiles/) applied."""
    config = _read_serve_config(path)
    if profile:
        from serve_app.ops.profiles import apply_profile, load_profile

        try:
            config = apply_profile(config, load_profile(profile))
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
    return config


def _read_serve_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if str(path) == DEFAULT_CONFIG and not path.is_file() and PROJECT_CONFIG.is_file():
        path = PROJECT_CONFIG  # run from another directory: the project's own config
    if not path.is_file():
        raise SystemExit(f"config file {path} not found (pass --config PATH)")
    config = yaml.safe_load(path.read_text()) or {}
    if not config.get("applications"):
        raise SystemExit(f"{path} has no `applications:` entry")
    return config


def split_app_config(config: dict, model: str | None = None):
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


def cmd_serve(options: argparse.Namespace) -> int:
    from serve_app.config import apply_ray_environment

    apply_ray_environment()
    import ray
    from ray import serve

    from deployments.models import loading
    from serve_app.app import build_application

    config = load_serve_config(options.config, options.profile)
    settings, deployment_options, application = split_app_config(config, options.model)
    try:
        loading.resolve_model(settings.model)  # fail (or build the preset) before Ray starts
    except loading.ModelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    http_options = dict(config.get("http_options") or {})
    if options.host:
        http_options["host"] = options.host
    if options.port:
        http_options["port"] = options.port

    profile = f", profile {options.profile}" if options.profile else ""
    print(f"fusionserve: model {settings.model!r}, config {options.config}{profile}", flush=True)
    joined_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if joined_cluster:  # an existing cluster (e.g. KubeRay): join it as it is
        context = ray.init(logging_level="WARNING")
    else:
        context = ray.init(dashboard_host="127.0.0.1", include_dashboard=True, logging_level="WARNING")
    serve.start(http_options=http_options, proxy_location=config.get("proxy_location", "HeadOnly"))
    serve.run(
        build_application(settings, deployment_options),
        name=application.get("name", "fusionserve"),
        route_prefix=application.get("route_prefix", "/"),
    )
    host, port = http_options.get("host", "127.0.0.1"), http_options.get("port", 8000)
    dashboard = context.dashboard_url or ""
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

    stop = False

    def request_stop(*_):
        nonlocal stop
        stop = True

    # Explicit handlers: a shell may start us with SIGINT ignored, and Ctrl-C must work.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    while not stop:
        time.sleep(0.2)
    print("\nstopping: shutting down Serve and Ray...", flush=True)
    try:
        # On a Ray instance of our own, ray.shutdown() stops every process at once; Serve's
        # graceful shutdown would wait ~30 s for the direct-ingress replica to drain.
        if joined_cluster:
            serve.shutdown()
    finally:
        ray.shutdown()
    print("stopped.", flush=True)
    return 0


def _request_options(options: argparse.Namespace) -> dict:
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
    )


def cmd_generate(options: argparse.Namespace) -> int:
    # The server's settings (threads, limits, prompt templates), so images match it byte for byte.
    from deployments.models import loading
    from serve_app.http.routes import ImageGenerationBody, check_generation_supported, to_image_request

    settings, _, _ = split_app_config(load_serve_config(options.config), options.model)

    def request():
        check_generation_supported(loading.features(loading.resolve_model(settings.model)))
        return to_image_request(ImageGenerationBody(**_request_options(options)), settings)

    return _render(options, settings, request)


def cmd_edit(options: argparse.Namespace) -> int:
    """An edit in-process, through the same checks as `/v1/images/edits`."""
    from deployments.models import loading
    from serve_app.http.routes import ImageEditForm, decoded_edit_inputs, to_image_request

    settings, _, _ = split_app_config(load_serve_config(options.config), options.model)
    files = {}
    for field, path in (("image", options.image), ("mask", options.mask), ("reference_image", options.reference)):
        if path is not None:
            try:
                files[field] = Path(path).read_bytes()
            except OSError as exc:
                print(f"error: {field}: {exc}", file=sys.stderr)
                return 2

    def request():
        form = ImageEditForm(
            **_request_options(options),
            strength=options.strength,
            keep_unmasked=not options.blend_only,
            reference_scale=options.reference_scale,
        )
        features = loading.features(loading.resolve_model(settings.model))
        return to_image_request(form, settings, **decoded_edit_inputs(files, form, settings, features))

    return _render(options, settings, request)


def _render(options: argparse.Namespace, settings, make_request) -> int:
    """Check the request as the server would, run it in-process with a progress bar, write the PNGs."""
    from tqdm import tqdm

    from deployments.models import loading
    from serve_app.flow.pipeline import local_pipeline_for
    from serve_app.http.routes import ApiError

    try:
        request = make_request()
    except ApiError as exc:
        print(f"error: {exc.param}: {exc.message}", file=sys.stderr)
        return 2
    except loading.ModelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic's ValidationError
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        model_path = loading.resolve_model(settings.model)
    except loading.ModelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    ran = result.usage["denoising_steps"]
    print(
        f"prompt: {result.prompt.prompt!r} ({result.prompt.prompt_tokens} tokens), seed {request.seed}, "
        f"{steps} steps ({result.steps.reason})"
        + (f", {ran} run at strength {request.strength}" if request.is_edit else "")
    )
    return 0


def cmd_optimize(options: argparse.Namespace) -> int:
    """What the prompt optimizer makes of a prompt (the /v1/prompts/optimize body), no Ray."""
    import json

    from deployments.models import loading
    from deployments.prompt.optimizer import PromptOptimizerEngine
    from serve_app.http.routes import ApiError, check_text, optimized_prompt_body

    settings, _, _ = split_app_config(load_serve_config(options.config), options.model)
    try:
        check_text(options.prompt, "prompt", settings)
        check_text(options.negative_prompt, "negative_prompt", settings)
        engine = PromptOptimizerEngine(loading.resolve_model(settings.model), **settings.prompt.model_dump())
    except (ApiError, loading.ModelNotFoundError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    body = optimized_prompt_body(engine.optimize(options.prompt, options.negative_prompt, options.namespace))
    if options.json:
        print(json.dumps(body, ensure_ascii=False, indent=2))
    else:
        print(body["prompt"])
        print(
            f"tokens: {body['original_tokens']} -> {body['optimized_tokens']} "
            f"({body['saved_fraction']:.0%} saved), shared prefix {body['prefix_tokens']}",
            file=sys.stderr,
        )
        for warning in body["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


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
        print("error: --fraction must be between 0 and 1 (exclusive)", file=sys.stderr)
        return 2
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
    exit 1 when the mean PSNR falls under --min-psnr."""
    import json
    import textwrap

    from tqdm import tqdm

    from deployments.denoiser.backends import BackendUnavailable
    from deployments.models import loading
    from serve_app.flow.quality import VariantSpec, read_prompts, run_ab_test
    from serve_app.http.routes import ApiError, ImageGenerationBody, to_image_request

    settings, _, _ = split_app_config(load_serve_config(options.config), options.model)
    try:
        baseline, candidate = VariantSpec.parse(options.baseline), VariantSpec.parse(options.candidate)
        if options.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {options.seeds}")
        # the API's own checks (text, size limits, multiples of 8) on every prompt
        requests = [
            to_image_request(ImageGenerationBody(prompt=prompt, size=options.size, seed=0), settings)
            for prompt in read_prompts(options.prompts)
        ]
    except ApiError as exc:
        print(f"error: {exc.param}: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:  # spec, prompts file, pydantic's ValidationError
        print(f"error: {exc}", file=sys.stderr)
        return 2

    prompts, size = [r.prompt for r in requests], (requests[0].width, requests[0].height)
    bar = tqdm(total=2 * len(prompts) * options.seeds, desc="rendering", unit="image")
    try:
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
    except (loading.ModelNotFoundError, BackendUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()

    print(f"baseline:  {result.baseline}\ncandidate: {result.candidate}\nsize: {size[0]}x{size[1]}\n")
    print(f"{'prompt':<44} {'seed':>5} {'steps b/c':>9} {'PSNR dB':>8} {'SSIM':>7}")
    for pair in result.pairs:
        steps = f"{pair.baseline_steps}/{pair.candidate_steps}"
        print(
            f"{textwrap.shorten(pair.prompt, 44, placeholder='...'):<44} {pair.seed:>5} {steps:>9} "
            f"{pair.psnr_db:>8.2f} {pair.ssim:>7.4f}"
        )
    verdict = "PASS" if result.passed else "FAIL"
    print(
        f"\nmean PSNR {result.mean_psnr_db:.2f} dB over the {result.differing} of {len(result.pairs)} images that "
        f"differ, mean SSIM {result.mean_ssim:.4f}; threshold {result.min_psnr_db:g} dB: {verdict}"
    )
    if options.json:
        Path(options.json).parent.mkdir(parents=True, exist_ok=True)
        Path(options.json).write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    return 0 if result.passed else 1


def cmd_status(options: argparse.Namespace) -> int:
    """Replicas per stage, queues, cache hit rate and latency of the running application."""
    import json

    import ray

    from serve_app.ops import status

    try:
        ray.init(address=options.address, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as exc:
        print(
            f"error: no running Ray cluster to connect to ({exc}); start one with `fusionserve serve`", file=sys.stderr
        )
        return 2
    try:
        report = status.collect(options.app)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()  # disconnects this driver only
    print(json.dumps(report, indent=2) if options.json else status.render(report), end="" if not options.json else "\n")
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
    try:
        text = kuberay.export(config, profile=options.profile, image=options.image, model_path=options.model_path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if options.check and options.output == "-":
        print("error: --check compares with a file: give -o PATH (or none: the committed one)", file=sys.stderr)
        return 2
    output = Path(options.output) if options.output else kuberay.DEFAULT_MANIFEST
    shown = options.output or str(output.relative_to(kuberay.PROJECT_DIR))
    if options.check:
        committed = output.read_text() if output.is_file() else ""
        if committed == text:
            print(f"{shown} is up to date", file=sys.stderr)
            return 0
        changes = kuberay.diff(committed, text, shown)
        print(
            f"{shown} differs from what `fusionserve export-kuberay` generates from {options.config} and "
            f"profile {options.profile}; regenerate it:\n{changes}",
            file=sys.stderr,
        )
        return 1
    if options.output == "-":
        print(text, end="")
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {shown}", file=sys.stderr)
    return 0


def _image_options(command: argparse.ArgumentParser, default_size: str | None) -> None:
    """Options of `generate` and `edit` (the request fields, and where the output goes)."""
    command.add_argument("-o", "--output", default="out.png")
    command.add_argument("--model", help="preset or model folder (default: the config's, tiny)")
    command.add_argument("--config", default=DEFAULT_CONFIG, help="settings to use (default: %(default)s)")
    command.add_argument("--seed", type=int)
    command.add_argument(
        "--size",
        default=default_size,
        help="WIDTHxHEIGHT (default: %(default)s)"
        if default_size
        else "WIDTHxHEIGHT (default: the image's, within the limits)",
    )
    command.add_argument("-n", type=int, default=1)
    command.add_argument("--steps", type=int, help="denoising steps (default: the step controller's choice)")
    command.add_argument(
        "--quality", choices=["fast", "balanced", "best"], help="the step range (default: the config's)"
    )
    command.add_argument("--step-policy", choices=["fixed", "complexity", "slo"], help="default: the config's")
    command.add_argument("--deadline-ms", type=float, help="latency target for the slo policy")
    command.add_argument("--guidance-scale", type=float)
    command.add_argument("--negative-prompt", default="")
    command.add_argument("--no-optimize", action="store_true", help="use the prompt as written")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="fusionserve", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start Ray and the Serve application")
    serve.add_argument("--model", help="preset name (tiny, sd15) or path to a diffusers SD 1.x folder")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help="Ray Serve config file (default: %(default)s)")
    serve.add_argument(
        "--profile",
        help="deployment profile merged over the config: laptop (default), single-gpu, "
        "cluster (configs/profiles/), or a path",
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(run=cmd_serve)

    generate = commands.add_parser("generate", help="generate an image in-process (no Ray)")
    generate.add_argument("prompt")
    _image_options(generate, default_size="512x512")
    generate.set_defaults(run=cmd_generate)

    edit = commands.add_parser("edit", help="edit an image in-process (no Ray): img2img, inpainting, reference face")
    edit.add_argument("prompt", help="the instruction")
    edit.add_argument("--image", required=True, help="the target image B (PNG, JPEG, WebP)")
    edit.add_argument("--mask", help="where to repaint: white on black (L), or transparent pixels (RGBA)")
    edit.add_argument("--reference", help="the source face A (needs a model with an image-prompt adapter)")
    edit.add_argument(
        "--reference-scale",
        type=float,
        default=1.0,
        help="how strongly the reference face conditions the image, 0-2 (default: %(default)s)",
    )
    edit.add_argument("--strength", type=float, help="share of the steps run, (0, 1] (default 0.8; 1.0 with --mask)")
    edit.add_argument("--blend-only", action="store_true", help="do not paste the target back outside the mask")
    _image_options(edit, default_size=None)
    edit.set_defaults(run=cmd_edit)

    optimize = commands.add_parser("optimize", help="show what the prompt optimizer makes of a prompt (no Ray)")
    optimize.add_argument("prompt")
    optimize.add_argument("--json", action="store_true", help="print the /v1/prompts/optimize JSON body")
    optimize.add_argument("--namespace", default="default", help="cache namespace (its template goes first)")
    optimize.add_argument("--negative-prompt", default="")
    optimize.add_argument("--model", help="model whose tokenizer counts tokens (default: the config's)")
    optimize.add_argument("--config", default=DEFAULT_CONFIG)
    optimize.set_defaults(run=cmd_optimize)

    status_cmd = commands.add_parser("status", help="replicas, queues, cache hit rate of the running application")
    status_cmd.add_argument("--address", default="auto", help="Ray cluster to connect to (default: the local one)")
    status_cmd.add_argument("--app", default="fusionserve", help="Serve application name")
    status_cmd.add_argument("--json", action="store_true")
    status_cmd.set_defaults(run=cmd_status)

    export = commands.add_parser("export-config", help="write the config with a profile applied (for serve deploy)")
    export.add_argument("--profile", required=True, help="laptop, single-gpu, cluster, or a path")
    export.add_argument("--config", default=DEFAULT_CONFIG)
    export.add_argument("-o", "--output", help="file to write (default: stdout)")
    export.set_defaults(run=cmd_export_config)

    kuberay = commands.add_parser(
        "export-kuberay", help="write the KubeRay RayService manifest (serveConfigV2 from the config and a profile)"
    )
    kuberay.add_argument("--config", default=DEFAULT_CONFIG)
    kuberay.add_argument("--profile", default="cluster", help="profile merged over the config (default: %(default)s)")
    kuberay.add_argument(
        "-o", "--output", help="file to write, - for stdout (default: configs/kuberay/rayservice.yaml)"
    )
    kuberay.add_argument(
        "--image",
        default="fusionserve:0.1.0",
        help="container image of every Ray pod (default: %(default)s, configs/kuberay/Dockerfile)",
    )
    kuberay.add_argument(
        "--model-path",
        default="/models/sd15",
        help="model folder inside the pods, on the models volume (default: %(default)s)",
    )
    kuberay.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 with a diff when the file differs from what would be generated",
    )
    kuberay.set_defaults(run=cmd_export_kuberay)

    build = commands.add_parser("build-model", help="build a model preset (tiny, sd15) and print its folder")
    build.add_argument("preset", nargs="?", default="tiny")
    build.add_argument("-o", "--output", help="folder to write (default: the model cache)")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(run=cmd_build_model)

    prune = commands.add_parser("prune-unet", help="write a model variant with the UNet's inner channels pruned")
    prune.add_argument("--model", default="tiny", help="preset or model folder (default: %(default)s)")
    prune.add_argument("--fraction", type=float, default=0.3, help="share of prunable channels removed")
    prune.add_argument("-o", "--output", help="variant folder (default: next to the model, -prunedNN)")
    prune.set_defaults(run=cmd_prune_unet)

    ab_test = commands.add_parser("ab-test", help="quality guard: PSNR/SSIM of a candidate variant against a baseline")
    spec_help = (
        "variant spec key=value,...: backend (torch|onnxruntime|tensorrt), precision (fp32|bf16|fp16|int8), "
        "model, steps, policy (fixed|complexity|slo), encoder_cache (on|off), early_stop (0..1|off)"
    )
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
    ab_test.add_argument("--model", help="model of variants that name none (default: the config's)")
    ab_test.add_argument("--config", default=DEFAULT_CONFIG, help="settings to use (default: %(default)s)")
    ab_test.set_defaults(run=cmd_ab_test)
    return root


def main(argv: list[str] | None = None) -> int:
    options = parser().parse_args(argv)
    return options.run(options)


if __name__ == "__main__":
    sys.exit(main())
