"""Face fusion served: the official `openai` client's images.edit against the portrait model
(its trained adapter; deployed at /portrait) with a reference face and a mask gives the image
the in-process pipeline gives; the defaults the usage reports are the documented ones."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from deployments.models.portrait.regions import head_region
from deployments.models.portrait.renderer import render_portrait
from serve_app.flow.request import edit_defaults
from tests.conftest import max_pixel_diff, png_bytes, run
from tests.unit.test_face_fusion import SOURCE, SOURCE_SEED, TARGET, TARGET_SEED, edit

pytestmark = pytest.mark.slow


def test_a_served_fusion_equals_the_in_process_one(portrait_url, portrait_model_path):
    from serve_app.flow.pipeline import local_pipeline_for
    from serve_app.ops.cli import load_serve_config, split_app_config

    source, target = render_portrait(SOURCE, SOURCE_SEED), render_portrait(TARGET, TARGET_SEED)
    mask = head_region(TARGET, TARGET_SEED, face=SOURCE)
    client = openai.OpenAI(base_url=f"{portrait_url}/v1", api_key="x", max_retries=0, timeout=180)
    response = client.images.edit(
        image=("b.png", png_bytes(target), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt="woman, smiling expression",
        extra_body={
            "seed": 4,
            "num_inference_steps": 12,
            "reference_image": base64.b64encode(png_bytes(source)).decode(),
        },
    )
    served = base64.b64decode(response.data[0].b64_json)
    usage = response.usage.model_extra
    defaults = edit_defaults(masked=True)
    assert usage["strength"] == defaults.strength and usage["reference_image_cached"] is False
    settings, _, _ = split_app_config(load_serve_config("serve_config.yaml"), model="portrait")
    pipe = local_pipeline_for(portrait_model_path, settings)
    ours = run(
        pipe.generate(edit("woman, smiling expression", target, seed=4, steps=12, mask=mask, reference_image=source))
    )
    assert Image.open(io.BytesIO(served)).size == target.size
    assert max_pixel_diff(served, ours.images_png[0]) <= 1
