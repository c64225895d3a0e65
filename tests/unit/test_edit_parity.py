"""Edits must produce diffusers' images: StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
and, with a reference face, the same pipelines with the model's IP-Adapter loaded
(`load_ip_adapter`). Same model folder, inputs, seed, steps -> max pixel difference <= 1/255.
The prompt optimizer is off: diffusers gets the prompt as written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.flow.request import ImageRequest
from tests.conftest import max_pixel_diff, png_pixels, run


def portrait(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth synthetic 'photo': gradients and a disc, so the VAE sees structure."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    cx, cy = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < (min(width, height) * 0.3) ** 2).astype(np.float32)
    pixels = np.stack([x / width, y / height, disc], axis=-1) * 0.8 + 0.1
    return Image.fromarray((pixels * 255).astype(np.uint8))


def box_mask(width: int, height: int) -> Image.Image:
    """White (repaint) in the middle half, black (keep) around it."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask, "L")


def edit_request(
    image,
    prompt="portrait of a smiling woman",
    mask=None,
    reference=None,
    strength=0.6,
    steps=20,
    seed=3,
    guidance=7.5,
    n=1,
    keep_unmasked=True,
    reference_scale=1.0,
):
    return ImageRequest(
        prompt=prompt,
        negative_prompt="",
        width=image.width,
        height=image.height,
        n=n,
        seed=seed,
        guidance_scale=guidance,
        num_inference_steps=steps,
        optimize_prompt=False,
        image=image,
        mask=mask,
        reference_image=reference,
        strength=strength,
        keep_unmasked=keep_unmasked,
        reference_scale=reference_scale,
    )


@pytest.fixture(scope="module")
def img2img(tiny_model_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_model_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint(tiny_model_path):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(tiny_model_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_adapter(pipe, model_path):
    if pipe.image_encoder is None:  # unload_ip_adapter() of an earlier test removed the model's own
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        pipe.register_modules(
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(str(model_path), subfolder="image_encoder"),
            feature_extractor=CLIPImageProcessor.from_pretrained(str(model_path), subfolder="feature_extractor"),
        )
    pipe.load_ip_adapter(
        str(model_path), subfolder="ip_adapter", weight_name="ip-adapter.safetensors", image_encoder_folder=None
    )  # the model folder's own image_encoder/ is loaded already
    return pipe


@pytest.mark.parametrize("strength,steps,guidance", [(0.3, 20, 7.5), (0.75, 12, 5.0), (1.0, 10, 7.5), (0.5, 10, 1.0)])
def test_img2img_matches_diffusers(local_pipe, img2img, strength, steps, guidance):
    image = portrait(96, 64)
    request = edit_request(image, strength=strength, steps=steps, guidance=guidance)
    result = run(local_pipe.generate(request))
    reference = img2img(
        request.prompt,
        image=image,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    ).images[0]
    assert max_pixel_diff(result.images_png[0], np.asarray(reference)) <= 1
    assert result.usage.denoising_steps == min(int(steps * strength), steps)


@pytest.mark.parametrize("strength,keep_unmasked", [(1.0, False), (0.6, False), (0.6, True)])
def test_inpaint_matches_diffusers(local_pipe, inpaint, strength, keep_unmasked):
    """keep_unmasked=False: diffusers' latent blending as is; True: then its `apply_overlay`."""
    image, mask = portrait(64, 80, seed=1), box_mask(64, 80)
    request = edit_request(image, mask=mask, strength=strength, steps=12, keep_unmasked=keep_unmasked)
    ours = run(local_pipe.generate(request)).images_png[0]
    reference = inpaint(
        request.prompt,
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=12,
        height=80,
        width=64,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    ).images[0]
    if keep_unmasked:
        reference = inpaint.image_processor.apply_overlay(mask, image, reference)
    assert max_pixel_diff(ours, np.asarray(reference)) <= 1


def test_n_images_equal_single_requests_with_successive_seeds(local_pipe):
    image = portrait(64, 64, seed=2)
    both = run(local_pipe.generate(edit_request(image, n=2, seed=11, steps=10)))
    for i, seed in enumerate((11, 12)):
        alone = run(local_pipe.generate(edit_request(image, seed=seed, steps=10))).images_png[0]
        assert max_pixel_diff(both.images_png[i], alone) <= 1


def test_reference_image_matches_diffusers_ip_adapter(local_pipe, tiny_model_path, img2img):
    pipe = with_adapter(img2img, tiny_model_path)
    try:
        image, face = portrait(64, 64, seed=4), portrait(80, 96, seed=5)
        request = edit_request(image, reference=face, strength=0.8, steps=10)
        ours = run(local_pipe.generate(request))
        reference = pipe(
            request.prompt,
            image=image,
            ip_adapter_image=face,
            strength=0.8,
            num_inference_steps=10,
            generator=torch.Generator("cpu").manual_seed(request.seed),
        ).images[0]
        assert max_pixel_diff(ours.images_png[0], np.asarray(reference)) <= 1
        # the reference changes the image (the adapter is not a no-op) ...
        plain = run(local_pipe.generate(edit_request(image, strength=0.8, steps=10))).images_png[0]
        assert max_pixel_diff(ours.images_png[0], plain) > 8
        # ... and the second use of the same face is a cache hit with the same result
        again = run(local_pipe.generate(request))
        assert (ours.usage.reference_image_cached, again.usage.reference_image_cached) == (False, True)
        assert again.images_png[0] == ours.images_png[0]
    finally:
        pipe.unload_ip_adapter()


def test_reference_scales_match_diffusers_and_do_not_mix_in_one_batch(local_pipe, tiny_model_path, img2img):
    """Requests at different adapter scales, in flight together, each equal diffusers'
    set_ip_adapter_scale(scale): a batch holds one scale."""
    import asyncio

    pipe = with_adapter(img2img, tiny_model_path)
    try:
        image, face = portrait(64, 64, seed=12), portrait(64, 64, seed=13)
        scales = (0.5, 1.0, 0.0)
        requests = [edit_request(image, reference=face, strength=0.8, steps=10, reference_scale=s) for s in scales]

        async def together():
            return await asyncio.gather(*(local_pipe.generate(r) for r in requests))

        results = run(together())
        for scale, result in zip(scales, results):
            pipe.set_ip_adapter_scale(scale)
            reference = pipe(
                requests[0].prompt,
                image=image,
                ip_adapter_image=face,
                strength=0.8,
                num_inference_steps=10,
                generator=torch.Generator("cpu").manual_seed(3),
            ).images[0]
            assert max_pixel_diff(result.images_png[0], np.asarray(reference)) <= 1, scale
        plain = run(local_pipe.generate(edit_request(image, strength=0.8, steps=10))).images_png[0]
        assert max_pixel_diff(results[2].images_png[0], plain) <= 1  # scale 0: the adapter adds nothing
        assert max_pixel_diff(results[0].images_png[0], results[1].images_png[0]) > 2
    finally:
        pipe.unload_ip_adapter()


def test_inpainting_with_a_reference_matches_diffusers_ip_adapter(local_pipe, tiny_model_path, inpaint):
    pipe = with_adapter(inpaint, tiny_model_path)
    try:
        image, face, mask = portrait(64, 64, seed=10), portrait(64, 64, seed=11), box_mask(64, 64)
        request = edit_request(image, mask=mask, reference=face, strength=0.9, steps=10, keep_unmasked=False)
        ours = run(local_pipe.generate(request)).images_png[0]
        reference = pipe(
            request.prompt,
            image=image,
            mask_image=mask,
            ip_adapter_image=face,
            strength=0.9,
            num_inference_steps=10,
            height=64,
            width=64,
            generator=torch.Generator("cpu").manual_seed(request.seed),
        ).images[0]
        assert max_pixel_diff(ours, np.asarray(reference)) <= 1
    finally:
        pipe.unload_ip_adapter()


def test_the_adapter_unet_is_preloaded_unless_told_not_to(tiny_model_path, monkeypatch):
    import types

    from deployments.denoiser import engine

    loads = []

    def count_load(path, shared=None):
        loads.append(path)
        return types.SimpleNamespace(shared=False)

    monkeypatch.setattr(engine, "ip_adapter_runner", count_load)
    engine.DenoiserEngine(tiny_model_path, 1)
    assert loads == [tiny_model_path]  # at start
    lazy = engine.DenoiserEngine(tiny_model_path, 1, {"preload_ip_adapter": False})
    assert len(loads) == 1  # not at start ...
    lazy.unet_for(engine.UNetVariant.ip_adapter(0.5))
    lazy.unet_for(engine.UNetVariant.ip_adapter(1.0))
    assert len(loads) == 2  # ... but at the first reference job, once


def parameter_bytes(*modules) -> int:
    """Bytes of the distinct parameter storages the modules hold (a shared one counted once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in modules for p in m.parameters()}
    return sum(storages.values())


def test_the_adapter_runs_on_the_production_unets_own_weights(tiny_model_path):
    """One set of UNet weights per replica: the adapter's projection and key/value projections
    sit beside the production torch UNet's weights and are put in for adapter batches only; a
    plain forward after an adapter one is the plain forward exactly. (ONNX Runtime: the next test.)"""
    from deployments.denoiser.engine import DenoiserEngine, UNetVariant
    from deployments.models import loading

    engine = DenoiserEngine(tiny_model_path, 1)
    production = engine.unet.runner.module
    adapter = engine._load_ip_adapter()
    assert adapter.shared and adapter.unet is production
    base = parameter_bytes(loading.load_unet(tiny_model_path))
    extras = parameter_bytes(adapter._projection, *adapter._processors)
    assert parameter_bytes(production, adapter._projection, *adapter._processors) == base + extras  # not 2 x base

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps, context = torch.tensor([500, 500]), torch.randn(2, 77, 64, generator=generator)
    embed_dim = adapter._projection.image_projection_layers[0].image_embeds.in_features
    embeds = torch.randn(2, 1, embed_dim, generator=generator)
    with torch.inference_mode():
        plain = engine.unet_for(UNetVariant.production())(sample, timesteps, context)
        with_reference = engine.unet_for(UNetVariant.ip_adapter(1.0))(sample, timesteps, context, embeds)
        again = engine.unet_for(UNetVariant.production())(sample, timesteps, context)
    assert not torch.equal(with_reference, plain)
    assert torch.equal(again, plain)


def test_on_onnx_runtime_the_adapter_is_in_the_production_graph(tiny_model_path):
    """One graph, one session, one copy of the weights: reference rows run the production ONNX
    Runtime session at their scale (as torch's adapter computes them), plain rows at scale 0
    (the plain UNet's output); no torch UNet is loaded for the adapter. (Caching them:
    test_feature_caching.)"""
    import onnxruntime

    from deployments.denoiser import backends
    from deployments.denoiser.engine import DenoiserEngine, UNetVariant

    engine = DenoiserEngine(tiny_model_path, 1, {"backends": [{"backend": "onnxruntime", "precision": "fp32"}]})
    adapter = engine._load_ip_adapter()
    assert isinstance(adapter, backends.OnnxAdapterUNet)
    assert adapter.whole.session is engine.unet.runner.session

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps, context = torch.tensor([500, 500]), torch.randn(2, 77, 64, generator=generator)
    embeds = torch.randn(2, 1, adapter.embed_dim, generator=generator)
    with torch.inference_mode():
        plain = engine.unet_for(UNetVariant.production())(sample, timesteps, context)
        with_reference = engine.unet_for(UNetVariant.ip_adapter(0.7))(sample, timesteps, context, embeds)
        in_torch = backends.AdapterUNet(tiny_model_path)(sample, timesteps, context, embeds, 0.7)
    plain_graph = onnxruntime.InferenceSession(
        str(backends.onnx_plain_graph_file(tiny_model_path)), providers=["CPUExecutionProvider"]
    )
    (expected,) = backends._FP32Session(plain_graph).run(sample, timesteps, context)
    assert torch.allclose(plain, torch.from_numpy(expected), atol=1e-5)  # the plain UNet's rows
    assert not torch.allclose(with_reference, plain, atol=1e-3)
    assert torch.allclose(with_reference, in_torch, atol=1e-4)


def test_when_the_shared_onnx_graph_fails_reference_rows_fall_back_with_production(tiny_model_path):
    """A run-time failure of the ONNX session under an adapter batch moves production to the next
    backend (torch fp32) and the adapter with it, onto its weights: the batch is served."""
    from deployments.denoiser import backends
    from deployments.denoiser.engine import DenoiserEngine, UNetVariant

    chain = [{"backend": "onnxruntime", "precision": "fp32"}, {"backend": "torch", "precision": "fp32"}]
    engine = DenoiserEngine(tiny_model_path, 1, {"backends": chain})
    onnx_adapter = engine._load_ip_adapter()
    assert isinstance(onnx_adapter, backends.OnnxAdapterUNet)

    class Broken:
        def run(self, *args, **kwargs):
            raise RuntimeError("simulated ONNX Runtime failure")

    onnx_adapter.whole.session = Broken()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps, context = torch.tensor([500, 500]), torch.randn(2, 77, 64, generator=generator)
    embeds = torch.randn(2, 1, onnx_adapter.embed_dim, generator=generator)
    with torch.inference_mode():
        got = engine.unet_for(UNetVariant.ip_adapter(0.7))(sample, timesteps, context, embeds)
        expected = backends.AdapterUNet(tiny_model_path)(sample, timesteps, context, embeds, 0.7)
    assert engine.unet.active.backend == "torch"
    assert engine.unet.fallbacks[0][0].startswith("onnxruntime")
    adapter = engine._load_ip_adapter()
    assert isinstance(adapter, backends.AdapterUNet) and adapter.unet is engine.unet.runner.module
    assert torch.allclose(got, expected, atol=1e-5)


def test_inpaint_keeps_the_unmasked_region(local_pipe):
    """Outside the mask the target's pixels are kept exactly (tolerance 0: pasted back after
    decoding); inside, the image is repainted. Latent blending alone (keep_unmasked=False, what
    StableDiffusionInpaintPipeline returns) cannot promise that: the VAE decoder's group norms
    and mid-block attention are global, and on the embedded random-weight VAE the pixels
    outside the mask then differ from the target's VAE round trip by 30-50/255 on average."""
    image, mask = portrait(96, 96, seed=6), box_mask(96, 96)
    target = np.asarray(image).astype(np.int16)
    keep = np.asarray(mask) == 0
    kept = png_pixels(run(local_pipe.generate(edit_request(image, mask=mask, strength=1.0, steps=12))).images_png[0])
    assert np.abs(kept - target)[keep].max() == 0
    assert np.abs(kept - target)[~keep].mean() > 10  # the masked region was repainted
    blended = png_pixels(
        run(
            local_pipe.generate(edit_request(image, mask=mask, strength=1.0, steps=12, keep_unmasked=False))
        ).images_png[0]
    )
    assert np.array_equal(blended[~keep], kept[~keep])  # the overlay touches nothing inside the mask
    assert np.abs(blended - target)[keep].mean() > 5  # and is what keeps the outside


@pytest.fixture(scope="module")
def inpainting_model():
    """The embedded model with a 9-channel inpainting UNet (preset tiny-inpainting)."""
    from deployments.models.loading import resolve_model

    return resolve_model("tiny-inpainting")


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_nine_channel_inpainting_unet_matches_diffusers(inpainting_model, strength):
    """A 9-channel UNet gets the mask and the masked image's latents as input channels (no blending)."""
    from diffusers import StableDiffusionInpaintPipeline

    from serve_app.flow.pipeline import local_pipeline_for

    pipe = local_pipeline_for(inpainting_model)
    image, mask = portrait(64, 64, seed=9), box_mask(64, 64)
    request = edit_request(image, mask=mask, strength=strength, steps=10, keep_unmasked=False)
    ours = run(pipe.generate(request)).images_png[0]
    reference_pipe = StableDiffusionInpaintPipeline.from_pretrained(str(inpainting_model))
    reference_pipe.set_progress_bar_config(disable=True)
    reference = reference_pipe(
        request.prompt,
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=10,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    ).images[0]
    assert max_pixel_diff(ours, np.asarray(reference)) <= 1
    with pytest.raises(ValueError, match="inpainting UNet"):  # a generation has no mask to give it
        run(
            pipe.generate(
                ImageRequest(
                    prompt="p",
                    negative_prompt="",
                    width=64,
                    height=64,
                    n=1,
                    seed=1,
                    guidance_scale=7.5,
                    num_inference_steps=2,
                )
            )
        )
