"""Streamed generation in process: which steps preview, the predicted clean latent each shows,
the events in order, the final image equal to the unstreamed one, and a stream closed early
cancelling its job."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from deployments.denoiser.clean_latent import predicted_clean_latent
from deployments.denoiser.engine import preview_steps
from serve_app.flow.pipeline import DenoiseStarted, GenerationResult, PartialImages
from serve_app.flow.request import ImageRequest
from tests.conftest import png_pixels, run
from tests.unit.test_pipeline import request as pipeline_request


def request(**overrides) -> ImageRequest:
    """test_pipeline's request, 8 steps unless told otherwise."""
    return pipeline_request(**{"num_inference_steps": 8, **overrides})


@pytest.mark.parametrize(
    ("steps", "previews", "expected"),
    [(20, 3, (5, 10, 15)), (8, 3, (2, 4, 6)), (4, 3, (1, 2, 3)), (2, 3, (1,)), (1, 2, ()), (30, 0, ())],
)
def test_previews_are_evenly_spaced_and_never_the_last_step(steps, previews, expected):
    assert preview_steps(steps, previews) == expected


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_predicted_clean_latent_is_the_one_the_scheduler_computes(prediction_type):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(prediction_type=prediction_type, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps[1:]:  # [0] is the zero-SNR step: epsilon cannot say x0 there
        expected = scheduler.step(output, t, sample).pred_original_sample
        assert torch.allclose(predicted_clean_latent(scheduler, sample, output, t), expected, atol=1e-5)


async def collect(pipe, image_request, partial_images):
    return [event async for event in pipe.generate_stream(image_request, partial_images)]


def test_a_stream_sends_started_then_previews_then_the_unstreamed_result(local_pipe):
    events = run(collect(local_pipe, request(n=2), 3))
    assert isinstance(events[0], DenoiseStarted) and isinstance(events[-1], GenerationResult)
    previews = events[1:-1]
    assert all(isinstance(event, PartialImages) for event in previews)
    assert [(p.index, p.steps_done, p.total_steps) for p in previews] == [(0, 2, 8), (1, 4, 8), (2, 6, 8)]
    final = events[-1].images_png
    assert final == run(local_pipe.generate(request(n=2))).images_png  # previews change nothing
    for image_index in range(2):
        pictures = [png_pixels(p.images_png[image_index]).astype(float) for p in previews]
        assert all(picture.shape == (64, 64, 3) for picture in pictures)
        target = png_pixels(final[image_index]).astype(float)
        distances = [np.abs(picture - target).mean() for picture in pictures]
        assert distances[-1] < distances[0]  # the picture forms: later previews are nearer the result
    assert "preview" in events[-1].stage_ms


def test_a_stream_closed_early_cancels_its_job(local_pipe):
    engine = local_pipe.denoiser._engine
    before = engine.load().cancelled_jobs

    async def first_preview_then_leave():
        events = local_pipe.generate_stream(request(num_inference_steps=40), 3)
        async for event in events:
            if isinstance(event, PartialImages):
                break
        await events.aclose()
        for _ in range(400):  # the step loop drops it at its next step boundary
            if engine.load().cancelled_jobs > before:
                return
            await asyncio.sleep(0.05)

    run(first_preview_then_leave())
    load = engine.load()
    assert load.cancelled_jobs == before + 1
    assert load.active_jobs == load.waiting_jobs == 0
