"""The `fusionserve` command in-process, and serve_config.yaml as Ray reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_app.config import AppSettings
from serve_app.flow.request import ImageRequest
from serve_app.ops import cli
from tests.conftest import max_pixel_diff, png_pixels, run


def test_generate_writes_the_pipeline_image(tmp_path, local_pipe, capsys):
    out = tmp_path / "out.png"
    status = cli.main(
        ["generate", "portrait of a smiling man", "--model", "tiny", "-o", str(out), "--seed", "7", "--size", "64x64"]
        + ["--steps", "6"]
    )
    assert status == 0
    request = ImageRequest(
        prompt="portrait of a smiling man",
        negative_prompt="",
        width=64,
        height=64,
        n=1,
        seed=7,
        guidance_scale=7.5,
        num_inference_steps=6,
    )
    assert out.read_bytes() == run(local_pipe.generate(request)).images_png[0]
    captured = capsys.readouterr()
    assert "denoising" in captured.err  # the tqdm progress bar
    assert "6/6" in captured.err


def test_generate_n_writes_numbered_files(tmp_path):
    out = tmp_path / "img.png"
    assert (
        cli.main(["generate", "portrait", "-o", str(out), "--seed", "1", "--size", "64x64", "--steps", "2", "-n", "2"])
        == 0
    )
    first, second = tmp_path / "img-0.png", tmp_path / "img-1.png"
    assert png_pixels(first.read_bytes()).shape == (64, 64, 3)
    assert max_pixel_diff(first.read_bytes(), second.read_bytes()) > 0


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["generate", "   ", "--size", "64x64"], "prompt"),
        (["generate", "portrait", "--size", "65x64"], "multiples of 8"),
        (["generate", "portrait", "--steps", "0"], "num_inference_steps"),
    ],
)
def test_generate_rejects_bad_input(argv, fragment, capsys, tmp_path):
    assert cli.main([*argv, "-o", str(tmp_path / "x.png")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_edit_writes_the_pipeline_image(tmp_path, local_pipe, capsys):

    from serve_app.flow.request import edit_defaults
    from tests.unit.test_edit_parity import box_mask, portrait

    target, face, mask = portrait(64, 64, seed=1), portrait(64, 64, seed=2), box_mask(64, 64)
    for name, image in (("b.png", target), ("a.png", face), ("m.png", mask)):
        image.save(tmp_path / name)
    out = tmp_path / "out.png"
    status = cli.main(
        [
            "edit",
            "portrait of a smiling man",
            "--model",
            "tiny",  # local_pipe's model, which has an image-prompt adapter
            "--image",
            str(tmp_path / "b.png"),
            "--mask",
            str(tmp_path / "m.png"),
            "--reference",
            str(tmp_path / "a.png"),
            "--strength",
            "0.5",
            "-o",
            str(out),
            "--seed",
            "3",
            "--steps",
            "10",
        ]
    )
    assert status == 0
    request = ImageRequest(
        prompt="portrait of a smiling man",
        negative_prompt="",
        width=64,
        height=64,
        n=1,
        seed=3,
        guidance_scale=7.5,
        num_inference_steps=10,
        image=target,
        mask=mask,
        reference_image=face,
        strength=0.5,
        reference_scale=edit_defaults(masked=True).reference_scale,  # the CLI's default with --mask
    )
    assert out.read_bytes() == run(local_pipe.generate(request)).images_png[0]
    captured = capsys.readouterr()
    assert "5/5" in captured.err  # the progress bar counts the steps an edit runs
    assert "5 run at strength 0.5" in captured.out


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--image", "{bad}"], "image: image is not a PNG, JPEG or WebP image"),
        (["--image", "{missing}"], "image: [Errno 2]"),
        (["--image", "{good}", "--mask", "{bad}"], "mask: mask is not a PNG"),
        (["--image", "{good}", "--strength", "1.5"], "strength"),
    ],
)
def test_edit_rejects_bad_input(argv, fragment, capsys, tmp_path):
    from tests.unit.test_edit_parity import portrait

    (tmp_path / "bad.png").write_bytes(b"not an image")
    portrait(64, 64).save(tmp_path / "good.png")
    paths = {"bad": tmp_path / "bad.png", "good": tmp_path / "good.png", "missing": tmp_path / "missing.png"}
    argv = [arg.format(**paths) for arg in argv]
    assert cli.main(["edit", "portrait", *argv, "-o", str(tmp_path / "x.png")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_build_model_prints_the_cached_folder(tiny_model_path, capsys):
    assert cli.main(["build-model", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_model_path)


def test_serve_config_is_a_valid_ray_serve_config():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(Path("serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    names = {d["name"] for d in config["applications"][0]["deployments"]}
    assert names == {"Ingress", "PromptOptimizer", "TextEncoder", "Denoiser", "VaeCodec"}
    for deployment in config["applications"][0]["deployments"]:
        assert "ray_actor_options" in deployment and "max_ongoing_requests" in deployment
        if deployment["name"] != "Ingress":
            assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(deployment["autoscaling_config"])
    total_cpus = sum(
        d["ray_actor_options"]["num_cpus"] * d["autoscaling_config"]["min_replicas"]
        if "autoscaling_config" in d
        else d["ray_actor_options"]["num_cpus"]
        for d in config["applications"][0]["deployments"]
    )
    assert total_cpus <= 2  # the laptop profile must schedule on 2 cores


def test_build_app_works_as_rays_application_builder(tiny_model_path):
    """`serve run serve_config.yaml` calls build_app(args) through this Ray helper."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from serve_app.app import build_app

    config = yaml.safe_load(Path("serve_config.yaml").read_text())
    app = call_user_app_builder_with_args_if_necessary(build_app, config["applications"][0]["args"])
    assert isinstance(app, Application)
    with pytest.raises(Exception, match="max_images"):
        call_user_app_builder_with_args_if_necessary(build_app, {"limits": {"max_images": 0}})


def test_split_app_config_applies_the_model_override():
    settings, options, application = cli.split_app_config(cli.load_serve_config("serve_config.yaml"), model="sd15")
    assert isinstance(settings, AppSettings) and settings.model == "sd15"
    assert options["Denoiser"]["ray_actor_options"]["num_cpus"] > 0
    assert application["name"] == "fusionserve"


def test_unknown_deployment_in_config_is_refused(tiny_model_path):
    from serve_app.app import build_application

    with pytest.raises(ValueError, match="unknown deployments"):
        build_application(AppSettings(), {"Denoyser": {"num_replicas": 2}})


def test_stage_threads_override_num_threads():
    settings = AppSettings(num_threads=2, stage_threads={"VaeCodec": 1})
    assert settings.threads_for("VaeCodec") == 1
    assert settings.threads_for("Denoiser") == 2
    with pytest.raises(ValueError, match="stage_threads"):
        AppSettings(stage_threads={"Vae": 1})
    with pytest.raises(ValueError, match="stage_threads"):
        AppSettings(stage_threads={"VaeCodec": 0})


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_a_model_path_that_is_not_a_model_folder_is_a_clear_error(command, tmp_path, capsys):
    argv = (
        ["serve", "--model", str(tmp_path)]
        if command == "serve"
        else ["generate", "portrait", "--model", str(tmp_path), "-o", str(tmp_path / "x.png")]
    )
    assert cli.main(argv) == 2
    assert "not a diffusers model folder" in capsys.readouterr().err


def test_the_default_config_is_the_packaged_one_outside_a_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no serve_config.yaml here
    assert cli.load_serve_config(cli.DEFAULT_CONFIG) == yaml.safe_load(cli.packaged_config().read_text())
    with pytest.raises(cli.CliError, match="config file other.yaml not found") as error:
        cli.load_serve_config("other.yaml")
    assert error.value.status == 1  # a config error exits 1, as it always has; bad input exits 2
    assert cli.main(["optimize", "portrait", "--config", "other.yaml"]) == 1
    assert capsys.readouterr().err == "error: config file other.yaml not found (pass --config PATH)\n"


def test_request_choices_are_the_validators_values():
    from typing import get_args

    from serve_app.config import QualityTier, StepPolicy

    commands = cli.parser()._subparsers._group_actions[0].choices
    for command in ("generate", "edit"):
        actions = {action.dest: action for action in commands[command]._actions}
        assert actions["quality"].choices == list(get_args(QualityTier))
        assert actions["step_policy"].choices == list(get_args(StepPolicy))
