"""The in-process request flow: determinism, n>1, usage, cancellation, progress."""

from __future__ import annotations

import threading

import pytest
import torch

from deployments.denoiser.engine import DenoiseJob, DenoiserEngine, JobCancelled
from deployments.prompt.optimizer import PromptOptimizerEngine
from serve_app.flow.pipeline import local_pipeline_for
from serve_app.flow.request import ImageRequest
from tests.conftest import max_pixel_diff, png_pixels, run


def request(**overrides) -> ImageRequest:
    fields = dict(
        prompt="portrait of a smiling woman",
        negative_prompt="",
        width=64,
        height=64,
        n=1,
        seed=11,
        guidance_scale=7.5,
        num_inference_steps=10,
    )
    fields.update(overrides)
    return ImageRequest(**fields)


def test_same_seed_gives_byte_identical_png(local_pipe):
    first = run(local_pipe.generate(request())).images_png[0]
    second = run(local_pipe.generate(request())).images_png[0]
    assert first == second
    assert first.startswith(b"\x89PNG\r\n\x1a\n")


def test_different_seed_gives_a_different_image(local_pipe):
    a = run(local_pipe.generate(request(seed=1))).images_png[0]
    b = run(local_pipe.generate(request(seed=2))).images_png[0]
    assert max_pixel_diff(a, b) > 10


def test_n_images_use_seed_plus_i(local_pipe):
    result = run(local_pipe.generate(request(n=3, seed=40)))
    assert result.seeds == [40, 41, 42]
    assert len(set(result.images_png)) == 3
    # Image i of a batch is the image of a single request with seed+i (batch invariance:
    # batched matmuls may round differently, so allow 1/255).
    alone = run(local_pipe.generate(request(n=1, seed=41))).images_png[0]
    assert max_pixel_diff(result.images_png[1], alone) <= 1


def test_output_size_follows_the_request(local_pipe):
    png = run(local_pipe.generate(request(width=96, height=64))).images_png[0]
    assert png_pixels(png).shape == (64, 96, 3)


def test_usage_counts_clip_tokens(local_pipe):
    result = run(
        local_pipe.generate(
            request(
                prompt="A  smiling Asian man\nwho is wearing glasses", num_inference_steps=None, optimize_prompt=False
            )
        )
    )
    assert result.prompt.prompt == "A smiling Asian man who is wearing glasses"  # whitespace normalised
    assert result.usage.input_tokens == 8  # 10 CLIP ids minus BOS/EOS
    assert result.usage.total_tokens == 8
    assert result.usage.original_input_tokens == 8
    # no steps given: the default slo policy, at no load the complexity choice (8 tokens, no
    # attributes: 15 + round(0.4 * 8/60 * 15) = 16) within the 30 s default deadline
    assert result.usage.num_inference_steps == 16 and result.usage.steps_reason in ("slo", "slo:no-timings")
    assert result.usage.steps_policy == "slo" and result.usage.deadline_met is True
    assert result.usage.truncated_tokens == 0


def test_optimized_prompt_and_its_usage(local_pipe):
    result = run(local_pipe.generate(request(prompt="A smiling Asian man who is wearing glasses")))
    # the default style would make it longer than the original: left out
    assert result.prompt.prompt == "Asian man, smiling expression, wearing glasses"
    assert result.usage.original_input_tokens == 8
    assert result.usage.input_tokens == result.prompt.prompt_tokens
    assert result.prompt.negative_prompt.startswith("blurry, deformed eyes, asymmetrical face")


def test_tokens_beyond_the_clip_window_are_reported(tiny_model_path):
    optimizer = PromptOptimizerEngine(tiny_model_path)
    long_prompt = " ".join(["portrait"] * 100)
    optimized = optimizer.optimize(long_prompt, enabled=False)
    assert optimized.prompt_tokens == 100
    assert optimized.truncated_tokens == 100 - 75


def test_cancelled_job_stops_at_a_step_boundary(tiny_model_path):
    engine = DenoiserEngine(tiny_model_path)
    context = torch.zeros(1, 77, 64)
    job = DenoiseJob(context, context, 64, 64, [1], 10, 7.5)
    cancelled = threading.Event()
    steps_done = []

    def on_step(done, total):
        steps_done.append(done)
        if done == 3:
            cancelled.set()

    with pytest.raises(JobCancelled):
        engine.submit(job, on_step=on_step, cancelled=cancelled).result(timeout=120)
    assert steps_done == [1, 2, 3]


def test_progress_callback_sees_every_step(tiny_model_path):
    seen = []
    pipe = local_pipeline_for(tiny_model_path, on_step=lambda done, total: seen.append((done, total)))
    run(pipe.generate(request(num_inference_steps=5)))
    assert seen == [(i, 5) for i in range(1, 6)]
