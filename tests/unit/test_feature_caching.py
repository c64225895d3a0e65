"""Feature caching across steps (DeepCache): a cached step reuses the deep features of the
job's last full step and reruns only the UNet's outer levels; per job, inside the step loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from deployments.denoiser.deep_cache import DeepCacheUNet, max_branch_id
from deployments.denoiser.engine import DenoiseJob, UNetVariant
from deployments.models import loading
from deployments.vae.codec import VaeCodecEngine
from tests.unit.test_step_batching import WAIT_S, assert_same_images, denoise, engine_for, job, together


@pytest.fixture(scope="module")
def vae(tiny_model_path):
    return VaeCodecEngine(tiny_model_path, num_threads=2)


def unet_inputs(unet, rows: int = 4, side: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, unet.config.in_channels, side, side, generator=generator)
    context = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.full((rows,), 601), context


@pytest.mark.parametrize("model", ["tiny", "portrait"])
def test_a_shallow_step_on_its_own_features_is_the_full_step(model):
    """Fed the features its full forward kept, the shallow path must give the UNet's output
    bit for bit: it runs the same outer levels on the same inputs (the portrait UNet has three
    levels, a text-time embedding and no attention at the outer level; the tiny one two)."""
    unet = loading.load_unet(loading.resolve_model(model))
    cached = DeepCacheUNet(unet)
    sample, timesteps, context = unet_inputs(unet, side=16)
    branches = range(max_branch_id(unet.config) + 1)
    with torch.inference_mode():
        expected = unet(sample, timesteps, encoder_hidden_states=context, return_dict=False)[0]
        noise, features = cached.full(sample, timesteps, context, branches)
        assert torch.equal(noise, expected)  # the hooks only read
        for branch_id in branches:
            assert torch.equal(cached.shallow(sample, timesteps, context, features[branch_id], branch_id), expected)
        # and a later step's shallow forward is an approximation, not a copy of the kept output
        later = cached.shallow(sample * 0.95, timesteps - 40, context, features[0], 0)
        assert not torch.equal(later, expected)


def test_the_adapter_unet_caches_features_too(tiny_model_path):
    """The image-prompt adapter's projection runs on a cached step as on a full one."""
    from deployments.denoiser.backends import AdapterUNet

    adapter = AdapterUNet(tiny_model_path)
    sample, timesteps, context = unet_inputs(adapter.unet)
    embed_dim = adapter.unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features
    image_embeds = torch.randn(4, 1, embed_dim, generator=torch.Generator().manual_seed(3))
    cache = adapter.feature_cache(0.7)
    with torch.inference_mode():
        expected = adapter(sample, timesteps, context, image_embeds, 0.7)
        noise, features = cache.full(sample, timesteps, context, [0], image_embeds)
        shallow = cache.shallow(sample, timesteps, context, features[0], 0, image_embeds)
        without_reference = cache.shallow(sample, timesteps, context, features[0], 0, torch.zeros_like(image_embeds))
    assert torch.equal(noise, expected) and torch.equal(shallow, expected)
    assert not torch.equal(without_reference, expected)  # the reference reaches the outer level's attention


def test_on_onnx_runtime_reference_rows_cache_on_the_production_graph(tiny_model_path):
    """The adapter's rows on ONNX Runtime: whole and shallow steps through the production
    session and the shallow graph at the row's scale, as the torch adapter computes them."""
    from deployments.denoiser.backends import AdapterUNet
    from deployments.denoiser.engine import DenoiserEngine

    engine = DenoiserEngine(tiny_model_path, 1, {"backends": [{"backend": "onnxruntime", "precision": "fp32"}]})
    onnx = engine.feature_cache_for(UNetVariant.ip_adapter(0.7))
    torch_adapter = AdapterUNet(tiny_model_path)
    in_torch = torch_adapter.feature_cache(0.7)
    sample, timesteps, context = unet_inputs(torch_adapter.unet)
    embed_dim = torch_adapter.unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features
    image_embeds = torch.randn(4, 1, embed_dim, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        noise, features = onnx.full(sample, timesteps, context, [0], image_embeds)
        expected_noise, expected_features = in_torch.full(sample, timesteps, context, [0], image_embeds)
        later = (sample * 0.9, timesteps - 50, context)
        shallow = onnx.shallow(*later, features[0], 0, image_embeds)
        expected_shallow = in_torch.shallow(*later, expected_features[0], 0, image_embeds)
    assert (noise - expected_noise).abs().max().item() < 1e-4
    assert (features[0] - expected_features[0]).abs().max().item() < 1e-4
    assert (shallow - expected_shallow).abs().max().item() < 1e-4
    plain = engine.feature_cache_for(UNetVariant.production())
    assert not torch.allclose(plain.shallow(*later, features[0], 0), shallow, atol=1e-3)  # scale 0: no reference


def cached(target: DenoiseJob, interval: int, branch_id: int = 0) -> DenoiseJob:
    return dataclasses.replace(target, cache_interval=interval, cache_branch_id=branch_id)


def test_a_cached_job_runs_shallow_steps_between_full_ones(tiny_model_path):
    """9 steps at interval 3: full at steps 0, 3, 6; the other 6 shallow. The image stays near
    the uncached one (the deep features change slowly), yet is not it."""
    engine = engine_for(tiny_model_path, max_batch_size=8)
    uncached = denoise(engine, job(1, steps=9))
    assert engine.load().cached_image_steps == 0
    got = denoise(engine, cached(job(1, steps=9), 3))
    assert engine.load().cached_image_steps == 6
    assert not torch.equal(got, uncached)
    relative = float((got - uncached).norm() / uncached.norm())
    assert relative < 0.2, relative


def test_interval_one_is_the_uncached_job(tiny_model_path):
    engine = engine_for(tiny_model_path, max_batch_size=8)
    assert torch.equal(denoise(engine, cached(job(2, steps=6), 1)), denoise(engine, job(2, steps=6)))
    assert engine.load().cached_image_steps == 0


def test_a_cached_job_renders_the_same_image_in_any_batch(tiny_model_path, vae):
    """Jobs at different phases, intervals, samplers and guidance share the loop: rows on a full step go
    through one forward, rows on a cached step through a shallow one; each job's image is the
    one it renders alone."""
    jobs = [
        cached(job(3, steps=9), 3),
        cached(job(4, steps=7, scheduler="dpmpp_2m", images=2), 2),
        job(5, steps=8, scheduler="unipc"),
        cached(job(6, steps=10, guidance=1.0), 4),
    ]
    engine = engine_for(tiny_model_path, max_batch_size=8)
    batched = together(engine, jobs)
    assert engine.load().cached_image_steps == 6 + 2 * 3 + 0 + 7
    lone = engine_for(tiny_model_path, max_batch_size=1)
    for got, single in zip(batched, [denoise(lone, j) for j in jobs]):
        assert (got - single).abs().max().item() < 1e-3
        assert_same_images(vae, got, single)


def test_an_edit_caches_features_from_its_first_step(tiny_model_path, vae):
    """img2img at strength 0.5 runs the last 5 of 10 steps: full, shallow, full, shallow, full."""
    engine = engine_for(tiny_model_path, max_batch_size=8)
    start = vae.encode_image(Image.fromarray(vae.decode_pixels(denoise(engine, job(7, steps=4)))[0]), 64, 64)
    edit = dataclasses.replace(job(8, steps=10), init_image=start.image, strength=0.5)
    plain = denoise(engine, edit)
    steps_before = engine.load().cached_image_steps
    got = denoise(engine, cached(edit, 2))
    assert engine.load().cached_image_steps - steps_before == 2
    assert float((got - plain).norm() / plain.norm()) < 0.2


def test_bad_cache_settings_are_refused_with_what_to_fix(tiny_model_path):
    engine = engine_for(tiny_model_path)
    with pytest.raises(ValueError, match="cache_interval must be between 1"):
        engine.submit(cached(job(9), 0))
    with pytest.raises(ValueError, match=r"cache_branch_id must be in \[0, 0\]"):
        engine.submit(cached(job(9), 2, branch_id=1))


def test_onnx_runtime_caches_features_with_one_more_graph(tiny_model_path):
    """fp32 ONNX Runtime's production graph returns the deep features too; the shallow path is
    one more graph (exported at the first cached job): a cached job there matches torch's."""
    onnx = engine_for(tiny_model_path, backends=[{"backend": "onnxruntime", "precision": "fp32"}])
    torch_engine = engine_for(tiny_model_path)
    target = cached(job(11, steps=6), 3)
    got = denoise(onnx, target)
    assert onnx.load().cached_image_steps == 4
    assert (got - denoise(torch_engine, target)).abs().max().item() < 1e-3
    with pytest.raises(ValueError, match="cache_branch_id"):  # deeper than the tiny UNet
        onnx.submit(cached(job(11), 2, branch_id=1))


def test_a_backend_without_feature_caching_runs_every_step_whole(tiny_model_path):
    """ONNX Runtime int8's quantized graph is the whole UNet: a job that asks for caching runs
    uncached there and gets the uncached image."""
    engine = engine_for(tiny_model_path, backends=[{"backend": "onnxruntime", "precision": "int8"}])
    assert engine.feature_cache_for(UNetVariant.production()) is None
    got = engine.submit(cached(job(10, steps=6), 3)).result(timeout=WAIT_S)
    assert engine.load().cached_image_steps == 0
    assert torch.equal(got, denoise(engine, job(10, steps=6)))


def test_a_cancelled_job_frees_its_cached_features(tiny_model_path):
    """The kept features live in the job: once it leaves the batch they are gone (no cache
    outlives its request)."""
    import gc
    import threading
    import time
    import weakref

    from deployments.denoiser.engine import JobCancelled

    engine = engine_for(tiny_model_path, max_batch_size=8)
    cancelled, kept = threading.Event(), []

    def on_step(done, total):  # on the step loop's thread, between two steps
        if done == 2:
            (ticket,) = engine.batcher._active
            kept.append(weakref.ref(ticket.job.deep_features))
            cancelled.set()

    future = engine.submit(cached(job(12, steps=9), 3), on_step=on_step, cancelled=cancelled)
    with pytest.raises(JobCancelled):
        future.result(timeout=WAIT_S)
    assert len(kept) == 1
    # the loop thread settles the future from inside its cancellation sweep, which still holds
    # the ticket until it returns: wait (bounded) for it to let go
    deadline = time.monotonic() + WAIT_S
    while kept[0]() is not None:
        assert time.monotonic() < deadline, "the cancelled job's features are still referenced"
        gc.collect()
        time.sleep(0.01)
