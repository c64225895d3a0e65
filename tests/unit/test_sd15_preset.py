"""The `sd15` preset is the real Stable Diffusion 1.5 architecture (random weights)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from deployments.models import builder
from serve_app.flow.request import ImageRequest
from tests.conftest import max_pixel_diff, run

# Parameter counts of the published runwayml/stable-diffusion-v1-5 components.
SD15_PARAMETERS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_sd15_preset_has_the_published_parameter_counts():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = builder.load_preset("sd15")
    with init_empty_weights():  # meta tensors: no memory, no time
        parts = {
            "unet": UNet2DConditionModel(**preset["unet"]),
            "vae": AutoencoderKL(**preset["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=49408, **preset["text_encoder"])),
        }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    assert counts == SD15_PARAMETERS


@pytest.mark.slow
def test_sd15_builds_loads_and_matches_diffusers(tmp_path):
    """Build the 4.3 GB folder, run it through our stages and through diffusers."""
    if shutil.disk_usage(tmp_path).free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free disk for the sd15 folder")
    from diffusers import StableDiffusionPipeline

    from serve_app.flow.pipeline import local_pipeline_for

    path = builder.build_model("sd15", tmp_path / "sd15")
    try:
        request = ImageRequest(
            prompt="portrait of a smiling man",
            negative_prompt="",
            width=64,
            height=64,
            n=1,
            seed=3,
            guidance_scale=7.5,
            num_inference_steps=2,
            optimize_prompt=False,
        )
        ours = run(local_pipeline_for(path).generate(request)).images_png[0]
        reference = StableDiffusionPipeline.from_pretrained(str(path))
        reference.set_progress_bar_config(disable=True)
        image = reference(
            "portrait of a smiling man",
            width=64,
            height=64,
            num_inference_steps=2,
            generator=torch.Generator("cpu").manual_seed(3),
        ).images[0]
        assert max_pixel_diff(ours, np.asarray(image)) <= 1
    finally:
        shutil.rmtree(path, ignore_errors=True)
