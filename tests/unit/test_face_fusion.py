"""Face fusion on the portrait model with its trained image-prompt adapter, in-process with
the served settings (ONNX Runtime production UNet; the adapter on torch): a fixed pair's
fusion shows the reference face's traits (read by the judge) where the plain edit does not; a
masked hair-colour edit changes the hair and leaves every other pixel; at
reference_scale 0 the reference is ignored (the plain edit, byte for byte); with a reference
the pipeline equals diffusers' IP-Adapter pipelines on the same folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.models.portrait.attributes import PortraitAttributes
from deployments.models.portrait.regions import hair_region, head_region
from deployments.models.portrait.renderer import render_portrait
from serve_app.flow.request import ImageRequest, edit_defaults
from tests.conftest import max_pixel_diff, png_pixels, run

# A fixed pair from the face-fusion benchmark's tuning split (not held out): A, an old White
# person with a blonde afro; B, a young Black person with short blonde hair. On this pair and
# seed the fusion shows A's skin tone and hair colour and the plain edit neither (the rates over
# many pairs are the benchmark's: this is a regression check of one example, not the measure;
# re-picked, the first such pair of the split, when the UNet changed).
SOURCE = PortraitAttributes(
    identity="person",
    ethnicity="White",
    age="old",
    expression="angry expression",
    glasses="wearing square glasses",
    hair_color="blonde",
    hair_style="afro",
    facial_hair="clean shaven",
    view="side profile",
    lighting="studio lighting",
    background="orange background",
    face_shape="round",
    eye_color="green",
)
TARGET = PortraitAttributes(
    identity="person",
    ethnicity="Black",
    age="young",
    expression="neutral",
    glasses="no glasses",
    hair_color="blonde",
    hair_style="short",
    facial_hair="clean shaven",
    view="front view",
    lighting="studio lighting",
    background="black background",
    face_shape="oval",
    eye_color="blue",
)
SOURCE_SEED, TARGET_SEED = 50005, 50090
PROMPT = "person, serious expression"
# A target for a masked hair-colour edit (the benchmark's tuning split too): a boy's brown bob.
HAIR_TARGET = PortraitAttributes(
    identity="boy",
    ethnicity="Hispanic",
    age="child",
    expression="laughing expression",
    glasses="wearing round glasses",
    hair_color="brown",
    hair_style="bob",
    view="three quarter view",
    background="white background",
    face_shape="round",
    eye_color="gray",
)
HAIR_TARGET_SEED = 50072


@pytest.fixture(scope="module")
def fusion_pipe(portrait_model_path):
    from serve_app.flow.pipeline import local_pipeline_for
    from serve_app.ops.cli import load_serve_config, split_app_config

    settings, _, _ = split_app_config(load_serve_config("serve_config.yaml"), model="portrait")
    return local_pipeline_for(portrait_model_path, settings)


@pytest.fixture(scope="module")
def judge():
    from deployments.models.portrait.judge import Judge

    return Judge.packaged()


def edit(prompt: str, target, *, seed: int = 0, steps: int | None = None, **fields) -> ImageRequest:
    masked = fields.get("mask") is not None
    defaults = edit_defaults(masked=masked)
    fields.setdefault("strength", defaults.strength)
    fields.setdefault("reference_scale", defaults.reference_scale)
    return ImageRequest(
        prompt=prompt,
        negative_prompt="",
        width=target.width,
        height=target.height,
        n=1,
        seed=seed,
        guidance_scale=7.5,
        num_inference_steps=steps,
        image=target,
        **fields,
    )


def fixed_pair():
    """The fixed pair's renders, A (the reference) and B (the target), and the mask over B's head
    that a fusion redraws."""
    source, target = render_portrait(SOURCE, SOURCE_SEED), render_portrait(TARGET, TARGET_SEED)
    return source, target, head_region(TARGET, TARGET_SEED, face=SOURCE)


def image_of(result):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(result.images_png[0])).convert("RGB")


def test_a_fusion_shows_the_reference_faces_traits(fusion_pipe, judge):
    source, target, mask = fixed_pair()
    fused = run(fusion_pipe.generate(edit(PROMPT, target, mask=mask, reference_image=source)))
    plain = run(fusion_pipe.generate(edit(PROMPT, target, mask=mask)))
    fused_reading, plain_reading = judge.read([image_of(fused), image_of(plain)])
    traits = ("ethnicity", "hair_color")
    assert [fused_reading.values[t] for t in traits] == [getattr(SOURCE, t) for t in traits], fused_reading
    assert all(plain_reading.values[t] != getattr(SOURCE, t) for t in traits), plain_reading
    keep = np.asarray(mask) == 0
    assert np.abs(png_pixels(fused.images_png[0]).astype(int) - np.asarray(target, int))[keep].max() == 0


def test_a_masked_hair_colour_edit_changes_the_hair_and_keeps_every_other_pixel(fusion_pipe, judge):
    target = render_portrait(HAIR_TARGET, HAIR_TARGET_SEED)
    mask = hair_region(HAIR_TARGET, HAIR_TARGET_SEED)
    result = run(fusion_pipe.generate(edit("boy, bob red hair", target, mask=mask, seed=3)))
    assert judge.read([target])[0].values["hair_color"] == "brown"
    assert judge.read([image_of(result)])[0].values["hair_color"] == "red"
    keep = np.asarray(mask) == 0
    changed = np.abs(png_pixels(result.images_png[0]).astype(int) - np.asarray(target, int)).max(-1)
    assert changed[keep].max() == 0 and changed[~keep].max() > 32


def test_reference_scale_zero_is_the_plain_edit(fusion_pipe):
    source, target, _ = fixed_pair()
    plain = run(fusion_pipe.generate(edit(PROMPT, target, steps=10)))
    ignored = run(fusion_pipe.generate(edit(PROMPT, target, steps=10, reference_image=source, reference_scale=0.0)))
    used = run(fusion_pipe.generate(edit(PROMPT, target, steps=10, reference_image=source)))
    assert ignored.images_png == plain.images_png
    assert ignored.usage.reference_image_cached is None  # not even encoded
    assert max_pixel_diff(used.images_png[0], plain.images_png[0]) > 8


def test_a_reference_edit_runs_with_feature_caching(fusion_pipe):
    """The portrait UNet's outer level has no cross-attention, so its cached steps' ONNX graph
    has no adapter inputs: a reference row's cached step runs without them (it failed the whole
    batch, as the step controller picks caching under load); the whole steps still carry A."""
    source, target, mask = fixed_pair()

    def cached(scale: float):
        return run(
            fusion_pipe.generate(
                edit(
                    PROMPT,
                    target,
                    seed=5,
                    steps=10,
                    mask=mask,
                    reference_image=source,
                    reference_scale=scale,
                    scheduler="ddim",
                    cache_interval=2,
                )
            )
        )

    fused, plain = cached(1.5), cached(0.0)
    assert fused.usage.cache_interval == 2
    assert max_pixel_diff(fused.images_png[0], plain.images_png[0]) > 10


@pytest.mark.parametrize("masked", [False, True])
def test_the_portrait_adapter_matches_diffusers_ip_adapter(fusion_pipe, portrait_model_path, masked):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    from tests.unit.test_edit_parity import with_adapter

    source, target, head = fixed_pair()
    mask = head if masked else None
    kind = StableDiffusionInpaintPipeline if masked else StableDiffusionImg2ImgPipeline
    pipe = with_adapter(
        kind.from_pretrained(str(portrait_model_path), dtype=torch.float32, safety_checker=None), portrait_model_path
    )
    pipe.set_progress_bar_config(disable=True)
    strength = 1.0 if masked else 0.8
    request = edit(
        PROMPT,
        target,
        seed=5,
        steps=10,
        mask=mask,
        reference_image=source,
        strength=strength,
        optimize_prompt=False,
        scheduler=None,
        cache_interval=1,
    )
    ours = run(fusion_pipe.generate(request))
    pipe.set_ip_adapter_scale(request.reference_scale)  # the edit's default: 1.5 with a mask
    extra = {"mask_image": mask} if masked else {}
    theirs = pipe(
        request.prompt,
        image=target,
        ip_adapter_image=source,
        strength=strength,
        num_inference_steps=10,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        **extra,
    ).images[0]
    if masked:  # diffusers' apply_overlay, as the served edit does by default
        theirs = pipe.image_processor.apply_overlay(mask, target, theirs)
    assert max_pixel_diff(ours.images_png[0], np.asarray(theirs)) <= 1
