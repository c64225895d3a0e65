"""The portrait model's image-prompt adapter training: references show the target's face and
nothing else of it, captions leave its traits to the reference, a run cut off and resumed ends
with the weights of an uninterrupted one, and the result loads with diffusers' load_ip_adapter."""

from __future__ import annotations

import random

import pytest
import torch

from deployments.models.portrait.adapter_training import (
    IDENTITY_TRAITS,
    AdapterTrainingConfig,
    adapter_caption,
    reference_attributes,
    train_adapter,
)
from deployments.models.portrait.held_out import training_attributes
from deployments.models.portrait.model_training import LatentPool

CONFIG = AdapterTrainingConfig(steps=3, batch=2, checkpoint_every=1, workers=0, threads=1)


@pytest.fixture(scope="module")
def portrait_random_weights(tmp_path_factory):
    from deployments.models.builder import build_model

    return build_model("portrait-init", tmp_path_factory.mktemp("portrait") / "model")


@pytest.fixture(scope="module")
def pool() -> LatentPool:
    rng = random.Random(3)
    generator = torch.Generator().manual_seed(3)
    return LatentPool(
        torch.randn(6, 4, 16, 16, generator=generator),
        torch.full((6, 4, 16, 16), 0.1),
        [training_attributes(rng) for _ in range(6)],
    )


def test_a_reference_keeps_the_face_and_draws_the_rest_afresh():
    rng = random.Random(0)
    for _ in range(200):
        target = training_attributes(rng)
        reference = reference_attributes(target, rng, restyled=False)
        assert all(getattr(reference, t) == getattr(target, t) for t in IDENTITY_TRAITS)
        assert "headscarf" not in reference.accessories and reference.glasses != "wearing sunglasses"
        restyled = reference_attributes(target, rng, restyled=True)
        assert all(getattr(restyled, t) == getattr(target, t) for t in IDENTITY_TRAITS[:3])
    others = [reference_attributes(target, random.Random(k), restyled=False) for k in range(50)]
    assert len({(o.expression, o.background, o.view) for o in others}) > 10  # the rest varies


def test_captions_leave_the_face_to_the_reference_or_name_the_targets_hair_when_restyled():
    from deployments.models.portrait.captions import hair_phrase

    rng = random.Random(1)
    target = training_attributes(random.Random(9))
    while "headscarf" in target.accessories:
        target = training_attributes(rng)
    restyled = [adapter_caption(target, rng, restyled=True) for _ in range(200)]
    assert all(hair_phrase(target) in c for c in restyled if c)
    assert not any(target.ethnicity in c for c in restyled)
    plain = [adapter_caption(target, rng, restyled=False) for _ in range(400)]
    without_face = [c for c in plain if c and target.ethnicity not in c and hair_phrase(target) not in c]
    assert 0.6 < len(without_face) / len(plain) < 0.9  # ~70% leave the traits out, 10% are empty
    assert plain.count("") > 0


def test_a_resumed_adapter_run_ends_with_the_weights_of_an_uninterrupted_one(portrait_random_weights, pool, tmp_path):
    from deployments.models.portrait.adapter_training import adapter_state_dict

    def run(work, cut: bool):
        if cut:
            train_adapter(
                portrait_random_weights, pool, CONFIG, work, tmp_path / "unused", stop_after=1, progress=False
            )
        output = tmp_path / f"out-{work.name}"
        phase = train_adapter(portrait_random_weights, pool, CONFIG, work, output, progress=False)
        return phase, output

    whole, whole_out = run(tmp_path / "whole", cut=False)
    cut, _ = run(tmp_path / "cut", cut=True)
    assert whole.step == cut.step == CONFIG.steps
    a, b = whole.modules["adapter"].state_dict(), cut.modules["adapter"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "unused").exists()  # nothing is written before the phase completes
    from safetensors.torch import load_file

    from deployments.models.loading import IP_ADAPTER_FILE

    saved = load_file(str(whole_out / IP_ADAPTER_FILE))
    trained = adapter_state_dict(whole.modules["adapter"])  # type: ignore[arg-type]
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def test_the_trained_adapter_loads_with_diffusers_and_changes_the_picture(portrait_random_weights, pool, tmp_path):
    import shutil

    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from deployments.models.loading import IP_ADAPTER_FILE, has_image_prompt_adapter

    model = tmp_path / "model"
    shutil.copytree(portrait_random_weights, model)
    shutil.rmtree(model / "image_encoder")  # the preset's random tower: the trained one replaces it
    train_adapter(model, pool, CONFIG, tmp_path / "work", model, progress=False)
    assert has_image_prompt_adapter(model)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.load_ip_adapter(
        str(model), subfolder=str(IP_ADAPTER_FILE.parent), weight_name=IP_ADAPTER_FILE.name, image_encoder_folder=None
    )
    face = Image.new("RGB", (128, 128), (200, 150, 120))

    def draw(scale: float):
        pipe.set_ip_adapter_scale(scale)
        return pipe(
            "a woman",
            ip_adapter_image=face,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    assert not (draw(1.0) == draw(0.0)).all()
