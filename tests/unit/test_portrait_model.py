"""The trained portrait model: shipped in the package, loaded like any checkpoint, and drawing
its committed reference picture for a fixed prompt and seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from deployments.models import loading
from serve_app.flow.request import ImageRequest
from tests.conftest import png_pixels, run

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "portrait_reference.png"
REFERENCE_PROMPT = "smiling woman, age:70, wearing round glasses, short white hair, blue background"
REFERENCE_SEED, REFERENCE_STEPS = 7, 20
# The reference was drawn on this machine kind; another CPU's float rounding may move a few
# pixels by a level or two after 20 steps.
TOLERANCE = 4  # of 255, max per pixel


def test_the_portrait_model_ships_in_the_package_and_is_the_default(portrait_model_path):
    from serve_app.config import AppSettings

    assert portrait_model_path == loading.TRAINED_DIR / "portrait"
    assert loading.is_trained("portrait") and not loading.is_trained("tiny")
    assert loading.known_models()[0] == "portrait" and "tiny" in loading.known_models()
    assert AppSettings().model == loading.DEFAULT_MODEL == "portrait"
    assert loading.native_size(portrait_model_path) == 128
    weights = sum(path.stat().st_size for path in portrait_model_path.rglob("*.safetensors"))
    assert weights <= 40 * 2**20  # the budget for committed weights


def test_every_part_loads_with_from_pretrained(portrait_model_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(portrait_model_path / "unet")
    assert unet.config.addition_embed_type == "text" and unet.config.sample_size == 16
    vae = AutoencoderKL.from_pretrained(portrait_model_path / "vae")
    assert vae.config.scaling_factor != 1.0  # set from the trained encoder's latent spread
    assert CLIPTextModel.from_pretrained(portrait_model_path / "text_encoder").config.hidden_size == 128


def test_a_fixed_prompt_and_seed_draw_the_committed_reference(portrait_model_path):
    """Regenerate the reference (after retraining): `fusionserve generate "<REFERENCE_PROMPT>"
    --seed 7 --steps 20 --no-optimize -o tests/data/portrait_reference.png`."""
    from serve_app.config import AppSettings
    from serve_app.flow.pipeline import local_pipeline_for

    pipe = local_pipeline_for(portrait_model_path, AppSettings(model="portrait"))
    request = ImageRequest(
        prompt=REFERENCE_PROMPT,
        negative_prompt="",
        width=128,
        height=128,
        n=1,
        seed=REFERENCE_SEED,
        guidance_scale=7.5,
        num_inference_steps=REFERENCE_STEPS,
        optimize_prompt=False,
    )
    drawn = png_pixels(run(pipe.generate(request)).images_png[0]).astype(int)
    reference = np.asarray(Image.open(REFERENCE).convert("RGB")).astype(int)
    assert drawn.shape == reference.shape == (128, 128, 3)
    assert np.abs(drawn - reference).max() <= TOLERANCE
