"""Portrait model training: a run cut off and resumed ends with the same weights as one that
was not; held-out combinations never reach training."""

from __future__ import annotations

import random

import pytest
import torch

from deployments.models.portrait.held_out import held_out_combinations, is_held_out, training_attributes
from deployments.models.portrait.model_training import (
    PortraitTrainingConfig,
    build_latent_pool,
    load_components,
    train_diffusion,
    train_vae,
)

CONFIG = PortraitTrainingConfig(
    vae_steps=4,
    vae_batch=2,
    diffusion_steps=4,
    diffusion_batch=2,
    checkpoint_every=2,
    workers=0,
    threads=1,
    pool_size=6,
    pool_chunk=4,
    diffusion_long_steps=0,
    diffusion_face_steps=0,
    diffusion_feature_steps=0,
    adapter_steps=0,
)


@pytest.fixture(scope="module")
def portrait_random_weights(tmp_path_factory):
    from deployments.models.builder import build_model

    return build_model("portrait-init", tmp_path_factory.mktemp("portrait") / "model")


def weights(phase) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name, m in phase.modules.items() for k, v in m.state_dict().items()}


def train_both(model_dir, work, *, cut_after: int | None):
    parts = load_components(model_dir)
    if cut_after is not None:  # a run cut off mid-phase, then started again from the checkpoint
        train_vae(parts, CONFIG, work, stop_after=cut_after, progress=False)
        parts = load_components(model_dir)
    vae = train_vae(parts, CONFIG, work, progress=False)
    if cut_after is not None:  # a pool build cut off after its first chunk
        build_latent_pool(parts.vae, CONFIG, work, progress=False)
        (work / "latent_pool" / "chunk_0001.pt").unlink()
    pool = build_latent_pool(parts.vae, CONFIG, work, progress=False)
    if cut_after is not None:
        train_diffusion(parts, pool, CONFIG, work, stop_after=cut_after + 1, progress=False)
        parts = load_components(model_dir)
        parts.vae.load_state_dict(vae.modules["vae"].state_dict())
    return vae, pool, train_diffusion(parts, pool, CONFIG, work, progress=False)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(portrait_random_weights, tmp_path):
    whole_vae, whole_pool, whole = train_both(portrait_random_weights, tmp_path / "whole", cut_after=None)
    cut_vae, cut_pool, cut = train_both(portrait_random_weights, tmp_path / "cut", cut_after=1)
    assert len(cut_pool.attributes) == CONFIG.pool_size and cut_pool.attributes == whole_pool.attributes
    assert torch.equal(cut_pool.mean, whole_pool.mean) and torch.equal(cut_pool.std, whole_pool.std)
    assert cut.step == whole.step == CONFIG.diffusion_steps
    for before, after in ((whole_vae, cut_vae), (whole, cut)):
        a, b = weights(before), weights(after)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    untrained = load_components(portrait_random_weights).unet.state_dict()
    assert any(not torch.equal(untrained[k], whole.modules["unet"].state_dict()[k]) for k in untrained)


def test_held_out_combinations_are_fixed_and_never_sampled_for_training():
    held_out = held_out_combinations()
    assert len(held_out) == len(set(held_out)) == 300
    rng = random.Random(5)
    sampled = [training_attributes(rng) for _ in range(2000)]
    assert not any(is_held_out(a) for a in sampled)
    assert all(is_held_out(a) for a in held_out[:20])


def test_the_whole_recipe_writes_a_loadable_model_with_its_previewer_and_adapter(portrait_random_weights, tmp_path):
    """Both stage pairs, the previewer and the adapter, a step or two each, from the preset's
    random weights."""
    import dataclasses
    import shutil

    from deployments.models.portrait.model_training import train_portrait_model
    from deployments.vae.previewer import PREVIEWER_FOLDER, LatentPreviewer

    config = dataclasses.replace(
        CONFIG,
        vae_refine_steps=1,
        diffusion_refine_steps=1,
        diffusion_long_steps=1,
        diffusion_face_steps=1,
        diffusion_feature_steps=1,
        previewer_steps=2,
        previewer_targets=4,
        adapter_steps=1,
        adapter_batch=2,
    )
    work = tmp_path / "work"
    shutil.copytree(portrait_random_weights, work / "init")  # the recipe builds it when missing
    output = train_portrait_model(config, work, tmp_path / "model", progress=False)
    stages = ("vae", "vae_refine", "diffusion", "diffusion_refine", "diffusion_long", "diffusion_face")
    stages += ("diffusion_features",)
    for stage in (*stages, "previewer", "adapter"):
        assert (work / f"{stage}_checkpoint.pt").exists(), stage
    assert (work / "latent_pool_refined").is_dir()
    assert len(list((work / "feature_cells").glob("chunk_*.pt"))) == 2  # pool_size 6 in chunks of 4
    parts = load_components(output)
    assert parts.vae.config.scaling_factor > 0
    previewer = LatentPreviewer.load(output / PREVIEWER_FOLDER)
    assert previewer(torch.zeros(1, 4, 16, 16)).shape == (1, 3, 128, 128)
    from deployments.models.loading import has_image_prompt_adapter

    assert has_image_prompt_adapter(output)


def test_the_face_stage_weighs_the_latent_cells_of_the_face_box_up():
    from deployments.models.portrait.judge import FACE_BOX
    from deployments.models.portrait.model_training import latent_face_weight

    weight = latent_face_weight(2.0)
    assert weight.shape == (1, 1, 16, 16)
    left, top, right, bottom = FACE_BOX
    for row in range(16):
        for column in range(16):
            overlaps = column * 8 < right and (column + 1) * 8 > left and row * 8 < bottom and (row + 1) * 8 > top
            assert weight[0, 0, row, column] == (3.0 if overlaps else 1.0), (row, column)
    assert torch.equal(latent_face_weight(0.0), torch.ones(1, 1, 16, 16))


def test_the_feature_stage_weighs_the_cells_where_glasses_and_the_mouth_are_drawn():
    """The fine-feature region holds every pixel that sunglasses or another expression change,
    and not the background; its share per latent cell is what the feature stage weighs up."""
    import dataclasses

    import numpy as np

    from deployments.models.portrait.attributes import PortraitAttributes
    from deployments.models.portrait.regions import fine_feature_region
    from deployments.models.portrait.renderer import render_portrait

    face = PortraitAttributes(identity="woman", expression="neutral", glasses="no glasses")
    region = np.asarray(fine_feature_region(face, 11)) > 0
    plain = np.asarray(render_portrait(face, 11), np.int32)
    for change in ({"glasses": "wearing sunglasses"}, {"expression": "laughing expression"}):
        changed = np.abs(np.asarray(render_portrait(dataclasses.replace(face, **change), 11), np.int32) - plain)
        drawn = changed.sum(-1) > 24
        assert drawn.sum() > 20 and region[drawn].all(), change
    assert not region[:16].any() and not region[-16:].any()  # the top of the picture, the shoulders
    assert 0.01 < region.mean() < 0.15  # a few features, not the face


def test_a_masks_share_per_latent_cell_counts_the_cells_pixels():
    """One 8x8 block whole -> 1 there, half of another -> 0.5, the rest 0: what the feature stage
    and word_binding's local classifier weigh each latent cell by."""
    import numpy as np
    from PIL import Image

    from deployments.models.portrait.regions import latent_cell_shares

    mask = np.zeros((128, 128), np.uint8)
    mask[8:16, 16:24] = 255
    mask[40:44, 0:8] = 255
    shares = latent_cell_shares(Image.fromarray(mask, "L"))
    assert shares.shape == (16, 16)
    assert shares[1, 2] == 1.0 and shares[5, 0] == 0.5
    assert shares.sum() == 1.5


def test_full_captions_say_what_the_caption_heads_are_asked():
    """The caption heads learn only what a caption says: the structured form never names the
    face shape or eye colour, and a headscarf hides the hair; the rest is said or implied."""
    from deployments.models.portrait.caption_heads import HEAD_VALUES, CaptionHeads, named_captions

    captions = named_captions(random.Random(3), 40)
    for i, named in enumerate(captions):
        unsaid = set(HEAD_VALUES) - named.says
        if i % 2 == 0:  # structured
            assert {"face_shape", "eye_color"} <= unsaid
        else:
            assert f"{named.attributes.eye_color} eyes" in named.text
        if named.attributes.expression != "neutral" and i % 2 == 0:
            assert named.attributes.expression in named.text
        assert ("hair_color" in unsaid) == ("headscarf" in named.attributes.accessories)
    heads = CaptionHeads(8)
    pooled = torch.zeros(len(captions), 8, requires_grad=True)
    loss = heads.loss(pooled, captions)
    loss.backward()
    # untrained heads on a blank state: about log(classes) per head, and a gradient to the text
    assert 0.5 < float(loss) < 3.0 and pooled.grad is not None and pooled.grad.abs().sum() > 0
