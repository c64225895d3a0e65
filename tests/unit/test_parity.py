"""Our staged pipeline must produce diffusers' StableDiffusionPipeline images.

Same model folder, prompt, seed, scheduler and steps -> max pixel difference <= 1/255
(measured: 0, the loops are the same arithmetic). The prompt optimizer is switched off:
diffusers gets the prompt as written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.flow.request import ImageRequest
from tests.conftest import max_pixel_diff, run


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_model_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = [
    # prompt, negative, width, height, seed, steps, guidance
    ("portrait of an Asian man, age:35, smiling expression, wearing glasses", "", 64, 64, 7, 20, 7.5),
    ("a woman with red hair", "blurry, deformed eyes", 96, 64, 123, 12, 5.0),
    ("close-up portrait", "", 64, 80, 0, 8, 1.0),  # guidance <= 1: no unconditional half
]


def assert_matches_diffusers(ours_pipe, diffusers_pipe, prompt, negative, width, height, seed, steps, guidance):
    """Our staged pipeline and diffusers' draw the same image within 1/255."""
    request = ImageRequest(
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        n=1,
        seed=seed,
        guidance_scale=guidance,
        num_inference_steps=steps,
        optimize_prompt=False,
    )
    ours = run(ours_pipe.generate(request)).images_png[0]
    reference = diffusers_pipe(
        prompt,
        negative_prompt=negative or None,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    assert max_pixel_diff(ours, np.asarray(reference)) <= 1


@pytest.mark.parametrize("prompt,negative,width,height,seed,steps,guidance", CASES)
def test_matches_stable_diffusion_pipeline(
    local_pipe, diffusers_pipe, prompt, negative, width, height, seed, steps, guidance
):
    assert_matches_diffusers(local_pipe, diffusers_pipe, prompt, negative, width, height, seed, steps, guidance)


@pytest.fixture(scope="module")
def portrait_pipes(portrait_model_path):
    """The trained portrait model in our staged pipeline and in diffusers."""
    from diffusers import StableDiffusionPipeline

    from serve_app.config import AppSettings
    from serve_app.flow.pipeline import local_pipeline_for

    path = portrait_model_path
    reference = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    return local_pipeline_for(path, AppSettings(model="portrait")), reference


@pytest.mark.parametrize("prompt,negative,width,height,seed,steps,guidance", [CASES[0], CASES[1]])
def test_the_portrait_model_matches_stable_diffusion_pipeline(
    portrait_pipes, prompt, negative, width, height, seed, steps, guidance
):
    ours_pipe, diffusers_portrait = portrait_pipes
    assert_matches_diffusers(
        ours_pipe, diffusers_portrait, prompt, negative, width * 2, height * 2, seed, steps, guidance
    )
