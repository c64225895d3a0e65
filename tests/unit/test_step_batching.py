"""Step-level continuous batching in the Denoiser: invariance, mixing, cancellation, fairness.

Tolerance: a job's image batched with others equals its image alone within 2/255 per
pixel (the UNet's float sums change with the batch size: ~3e-6 in the noise prediction;
1/255 in every local trial, 2/255 seen once through the served path in CI).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from deployments.common.vae_scale import latent_shape
from deployments.denoiser.engine import DenoiseJob, DenoiserEngine, JobCancelled, UNetVariant, VariantKind
from deployments.vae.codec import VaeCodecEngine

SIZE = 64
WAIT_S = 120  # for any one job or condition; far above what a slow CI core takes


@pytest.fixture(scope="module")
def vae(tiny_model_path):
    return VaeCodecEngine(tiny_model_path, num_threads=2)


def engine_for(path, **settings) -> DenoiserEngine:
    return DenoiserEngine(path, num_threads=2, settings=settings)


def job(
    seed: int, steps: int = 8, scheduler: str | None = None, guidance: float = 7.5, size: int = SIZE, images: int = 1
) -> DenoiseJob:
    generator = torch.Generator().manual_seed(1000 + seed)
    cond, uncond = torch.randn(2, 1, 77, 64, generator=generator)
    return DenoiseJob(cond, uncond, size, size, [seed + i for i in range(images)], steps, guidance, scheduler)


def denoise(engine: DenoiserEngine, job: DenoiseJob, **kwargs) -> torch.Tensor:
    return engine.submit(job, **kwargs).result(timeout=WAIT_S)


def alone(path, jobs: list[DenoiseJob]) -> list[torch.Tensor]:
    engine = engine_for(path, max_batch_size=1)
    return [denoise(engine, j) for j in jobs]


def together(engine: DenoiserEngine, jobs: list[DenoiseJob], **kwargs) -> list:
    """Submit every job before the loop can finish one step, then collect."""
    futures = [engine.submit(j, **kwargs) for j in jobs]
    return [f.result(timeout=WAIT_S) for f in futures]


def wait_for_steps(engine: DenoiserEngine, steps: int) -> None:
    """Until the step loop has run `steps` forwards; fails the test after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while engine.load().steps_run < steps:
        assert time.monotonic() < deadline, (
            f"the step loop ran {engine.load().steps_run} of {steps} steps in {WAIT_S} s"
        )
        time.sleep(0.005)


def assert_same_images(vae, batched: torch.Tensor, single: torch.Tensor) -> None:
    a, b = vae.decode_pixels(batched), vae.decode_pixels(single)
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 2


def test_a_job_batched_with_others_renders_its_image_alone(tiny_model_path, vae):
    jobs = [job(seed) for seed in range(4)]
    engine = engine_for(tiny_model_path, max_batch_size=8)
    batched = together(engine, jobs)
    load = engine.load()
    assert load.image_steps == sum(j.num_inference_steps for j in jobs)
    assert load.steps_run < load.image_steps  # they did share forwards
    for got, expected in zip(batched, alone(tiny_model_path, jobs)):
        assert (got - expected).abs().max().item() < 1e-3
        assert_same_images(vae, got, expected)


def test_mixed_step_counts_schedulers_and_guidance_in_one_batch(tiny_model_path, vae):
    jobs = [
        job(1, steps=5),
        job(2, steps=12, scheduler="EulerDiscreteScheduler"),
        job(3, steps=9, guidance=1.0),
        job(4, steps=7, images=2),
    ]
    engine = engine_for(tiny_model_path, max_batch_size=8)
    batched = together(engine, jobs)
    assert engine.load().steps_run <= 12 + 2  # all ran side by side: about as many forwards as the longest job
    for got, expected in zip(batched, alone(tiny_model_path, jobs)):
        assert got.shape == expected.shape
        assert_same_images(vae, got, expected)


def test_a_cancelled_job_leaves_the_batch_and_the_others_finish(tiny_model_path, vae):
    engine = engine_for(tiny_model_path, max_batch_size=8)
    cancelled = threading.Event()
    steps_of_cancelled = []

    def on_step(done, total):
        steps_of_cancelled.append(done)
        if done == 3:
            cancelled.set()

    jobs = [job(10, steps=10), job(11, steps=10), job(12, steps=10)]
    futures = [
        engine.submit(jobs[0]),
        engine.submit(jobs[1], on_step=on_step, cancelled=cancelled),
        engine.submit(jobs[2]),
    ]
    with pytest.raises(JobCancelled):
        futures[1].result(timeout=WAIT_S)
    assert steps_of_cancelled == [1, 2, 3]
    survivors = [futures[0].result(timeout=WAIT_S), futures[2].result(timeout=WAIT_S)]
    for got, expected in zip(survivors, alone(tiny_model_path, [jobs[0], jobs[2]])):
        assert_same_images(vae, got, expected)
    assert engine.load().cancelled_jobs == 1


def test_a_bad_job_fails_alone(tiny_model_path):
    engine = engine_for(tiny_model_path, max_batch_size=8)
    good = engine.submit(job(20, steps=4))
    bad = engine.submit(job(21, steps=4, scheduler="NoSuchScheduler"))
    with pytest.raises(ValueError, match="unknown scheduler"):
        bad.result(timeout=WAIT_S)
    assert good.result(timeout=WAIT_S).shape == (1, 4, *latent_shape(SIZE, SIZE))


def first_step_order(engine: DenoiserEngine, jobs: list[DenoiseJob], gap_s: float = 0.0) -> list[int]:
    """Submit jobs in order (optionally spaced out); return job indices in the order they first stepped."""
    order, lock = [], threading.Lock()

    def recorder(index):
        def on_step(done, total):
            if done == 1:
                with lock:
                    order.append(index)

        return on_step

    futures = []
    for index, j in enumerate(jobs):
        futures.append(engine.submit(j, on_step=recorder(index)))
        time.sleep(gap_s)
    for future in futures:
        future.result(timeout=WAIT_S)
    return order


def test_admission_is_fifo_and_a_different_size_is_not_starved(tiny_model_path):
    """With room for 2 images: jobs start in arrival order, and a 96x96 job waiting at the head
    is not overtaken by 64x64 jobs that could have joined the running 64x64 batch."""
    engine = engine_for(tiny_model_path, max_batch_size=2)
    # Job 1 ends first and frees a slot while job 0 still runs: job 3 would fit, job 2 (the head) not.
    jobs = [job(30, steps=8), job(31, steps=3), job(32, steps=3, size=96), job(33, steps=3), job(34, steps=3)]
    order = first_step_order(engine, jobs)
    assert order == [0, 1, 2, 3, 4]


def test_step_level_admission_joins_a_running_batch_request_level_waits(tiny_model_path):
    """A job arriving while a long one runs starts at the next step with step-level batching
    (and finishes first), but only after the long one ends with request-level batching."""
    for step_level in (True, False):
        engine = engine_for(tiny_model_path, max_batch_size=8, admit_between_steps=step_level)
        finished = []
        long_job = engine.submit(job(40, steps=30))
        wait_for_steps(engine, 2)
        short_job = engine.submit(job(41, steps=3))
        for name, future in (("short", short_job), ("long", long_job)):
            future.add_done_callback(lambda _, name=name, finished=finished: finished.append(name))
        long_job.result(timeout=WAIT_S), short_job.result(timeout=WAIT_S)
        assert finished == (["short", "long"] if step_level else ["long", "short"])


def test_a_future_cancelled_by_its_caller_leaves_and_the_loop_keeps_serving(tiny_model_path):
    """asyncio.wrap_future cancels the job's future when the awaiting request is cancelled;
    settling a cancelled future raises, which once killed the loop and hung every later job."""
    engine = engine_for(tiny_model_path, max_batch_size=8)
    running = engine.submit(job(50, steps=20))
    wait_for_steps(engine, 1)
    assert running.cancel() or running.done()
    later = engine.submit(job(51, steps=3))
    assert later.result(timeout=60).shape == (1, 4, *latent_shape(SIZE, SIZE))
    assert engine.load().cancelled_jobs == 1 and engine.load().active_jobs == 0


def test_a_background_job_pauses_while_user_jobs_run_and_resumes_where_it_stopped(tiny_model_path, vae):
    """Shadow renders never share a forward with, nor run ahead of, a user's job: the user's
    steps are all consecutive forwards; the background job still ends with its own image."""
    engine = engine_for(tiny_model_path, max_batch_size=8)
    log: list[str] = []
    shadow = engine.submit(
        dataclasses.replace(job(60, steps=12), background=True), on_step=lambda done, total: log.append("shadow")
    )
    wait_for_steps(engine, 2)
    user = engine.submit(job(61, steps=5), on_step=lambda done, total: log.append("user"))
    user_latents = user.result(timeout=WAIT_S)
    shadow_latents = shadow.result(timeout=WAIT_S)
    first_user = log.index("user")
    assert log[first_user : first_user + 5] == ["user"] * 5  # no shadow step in between
    assert log.count("shadow") == 12 and 2 <= first_user < 12  # paused mid-way, then finished
    load = engine.load()
    assert load.background_jobs == 0 and load.queued_steps == 0
    assert_same_images(vae, shadow_latents, alone(tiny_model_path, [job(60, steps=12)])[0])
    assert_same_images(vae, user_latents, alone(tiny_model_path, [job(61, steps=5)])[0])


def test_background_work_is_not_counted_as_load(tiny_model_path):
    engine = engine_for(tiny_model_path, max_batch_size=8)
    gate = threading.Event()
    engine.unet.runner = lambda *args, original=engine.unet.runner: (gate.wait(WAIT_S), original(*args))[1]
    shadow = engine.submit(dataclasses.replace(job(62, steps=3), background=True))
    load = engine.load()
    assert load.background_jobs == 1 and load.queued_steps == 0 and load.waiting_jobs == 0
    gate.set()
    shadow.result(timeout=60)


def test_baseline_variant_jobs_run_on_the_baseline_unet(tiny_model_path, vae):
    """The production UNet here is bf16; a baseline job gets the fp32 image, a production
    job the bf16 one, even when both are queued together (they never share a forward)."""
    engine = engine_for(tiny_model_path, max_batch_size=8, backends=[{"backend": "torch", "precision": "bf16"}])
    production, baseline = together(engine, [job(63), dataclasses.replace(job(63), variant=UNetVariant.baseline())])
    fp32 = alone(tiny_model_path, [job(63)])[0]
    assert_same_images(vae, baseline, fp32)
    assert not torch.equal(production, baseline)
    with pytest.raises(ValueError, match="unknown UNet variant"):
        engine.submit(dataclasses.replace(job(64), variant="baseline"))  # a name, not a UNetVariant
    with pytest.raises(ValueError, match="image_embeds go with the ip_adapter variant"):
        engine.submit(dataclasses.replace(job(64), variant=UNetVariant.ip_adapter(0.5)))


def test_unet_variants_are_typed_batch_keys():
    """Equal variants batch together: the adapter at one scale, never two scales in a forward."""
    assert UNetVariant.ip_adapter(0.5) == UNetVariant.ip_adapter(0.5) != UNetVariant.ip_adapter(1.0)
    assert UNetVariant.ip_adapter() == UNetVariant.ip_adapter(1.0)
    assert len({UNetVariant.production(), UNetVariant.production(), UNetVariant.baseline()}) == 2
    assert str(UNetVariant.ip_adapter(0.6)) == "ip_adapter@0.6" and str(UNetVariant.baseline()) == "baseline"
    with pytest.raises(ValueError, match="image_prompt_scale must be in"):
        UNetVariant.ip_adapter(2.5)
    with pytest.raises(ValueError, match="adapter scale"):
        UNetVariant(VariantKind.PRODUCTION, 0.5)


def test_early_stop_ends_a_converged_job_with_its_clean_latent(tiny_model_path, vae):
    engine = engine_for(tiny_model_path, max_batch_size=8)
    steps_run = []
    full = denoise(engine, job(65, steps=40))
    early = denoise(
        engine,
        dataclasses.replace(job(65, steps=40), early_stop=0.05, early_stop_min_steps=10),
        on_step=lambda done, total: steps_run.append(done),
    )
    assert 10 <= len(steps_run) < 40 and steps_run[-1] == 40  # stopped early; progress reports completion
    assert engine.load().early_stops == 1
    a, b = vae.decode_pixels(early).astype(np.float64), vae.decode_pixels(full).astype(np.float64)
    assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 25  # close to the full run, not the noise
    never = denoise(engine, dataclasses.replace(job(65, steps=40), early_stop=1e-9, early_stop_min_steps=10))
    assert torch.equal(never, full)  # a threshold nothing meets: every step, the same latents


STOCHASTIC = ["EulerAncestralDiscreteScheduler", "DDPMScheduler"]


@pytest.mark.parametrize("scheduler", STOCHASTIC)
def test_a_stochastic_scheduler_draws_its_step_noise_from_the_request_seed(tiny_model_path, scheduler):
    """Ancestral/DDPM steps add fresh noise: it comes from each image's own generator (seeded
    by its seed, after the starting noise, as diffusers does), not from the global RNG — so
    a request renders the same image every time, alone or batched with others."""
    engine = engine_for(tiny_model_path, max_batch_size=8)
    target = job(5, steps=6, scheduler=scheduler, images=2)
    first = denoise(engine, target)
    torch.manual_seed(12345)  # the global RNG must not matter
    again = denoise(engine, target)
    assert torch.equal(first, again)
    others = [job(6, steps=9, scheduler=scheduler), job(7, steps=4), target, job(8, steps=6, scheduler=scheduler)]
    batched = together(engine, others)[2]
    assert (batched - first).abs().max().item() < 1e-3  # only the batch's float sums differ


@pytest.mark.parametrize("scheduler", STOCHASTIC)
def test_a_stochastic_scheduler_matches_diffusers(tiny_model_path, scheduler):
    target = job(11, steps=7, scheduler=scheduler)
    ours = denoise(engine_for(tiny_model_path, max_batch_size=4), target)
    assert (ours - diffusers_latents(tiny_model_path, target, scheduler)).abs().max().item() < 1e-4


def diffusers_latents(model_path, target: DenoiseJob, scheduler: str, **settings) -> torch.Tensor:
    """`target`'s final latents from diffusers' own pipeline with that scheduler class and settings."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_path))
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=target.prompt_embeds,
        negative_prompt_embeds=target.negative_prompt_embeds,
        height=SIZE,
        width=SIZE,
        num_inference_steps=target.num_inference_steps,
        guidance_scale=target.guidance_scale,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(target.seeds[0]),
    ).images


def test_multistep_solvers_by_name_run_side_by_side_as_they_run_alone(tiny_model_path, vae):
    """DPM-Solver++ 2M (with and without Karras sigmas) and UniPC keep their previous outputs in
    the job's own scheduler: in one batch with DDIM and each other, each renders its image alone."""
    jobs = [job(31, steps=9, scheduler=name) for name in ("dpmpp_2m", "dpmpp_2m_karras", "unipc", "ddim")]
    jobs.append(job(32, steps=5, scheduler="dpmpp_2m"))
    engine = engine_for(tiny_model_path, max_batch_size=8)
    batched = together(engine, jobs)
    assert engine.load().steps_run <= 9 + 2  # they shared forwards
    singles = alone(tiny_model_path, jobs)
    for got, expected in zip(batched, singles):
        assert_same_images(vae, got, expected)
    assert (singles[0] - singles[3]).abs().max().item() > 1e-2  # a solver is not DDIM under another name
    assert (singles[0] - singles[1]).abs().max().item() > 1e-3  # Karras sigmas change the schedule


def test_karras_sigmas_that_repeat_a_timestep_run_every_step(tiny_model_path):
    """At 50 steps Karras sigmas repeat the first timestep; the solver must still start at the first."""
    from deployments.denoiser.solvers import make_scheduler

    engine = engine_for(tiny_model_path, max_batch_size=2)
    scheduler = make_scheduler("dpmpp_2m_karras", engine.scheduler_cls, engine.scheduler_config, 50)
    assert len(set(scheduler.timesteps.tolist())) < len(scheduler.timesteps)  # the repeat this is about
    latents = denoise(engine, job(41, steps=50, scheduler="dpmpp_2m_karras"))
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras", "unipc"])
def test_a_named_solver_matches_diffusers_with_that_scheduler(tiny_model_path, name):
    from deployments.denoiser.solvers import SOLVERS

    solver = SOLVERS[name]
    target = job(12, steps=8, scheduler=name)
    ours = denoise(engine_for(tiny_model_path, max_batch_size=4), target)
    reference = diffusers_latents(tiny_model_path, target, solver.scheduler_class, **solver.settings)
    assert (ours - reference).abs().max().item() < 1e-4
