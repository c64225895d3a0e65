"""Live A/B: shadow renders by the baseline, the rolling PSNR, the switch back."""

from __future__ import annotations

import math
import random

from serve_app.config import AppSettings, QualityGuardSettings
from serve_app.flow.pipeline import local_pipeline_for
from serve_app.flow.quality import psnr_db
from serve_app.flow.quality_guard import IDENTICAL_DB, LiveQualityGuard
from serve_app.flow.request import ImageRequest
from tests.conftest import max_pixel_diff, run

BF16 = {"backends": [{"backend": "torch", "precision": "bf16"}]}


def request(seed: int) -> ImageRequest:
    return ImageRequest(
        prompt="portrait of a smiling woman",
        negative_prompt="",
        width=64,
        height=64,
        n=1,
        seed=seed,
        guidance_scale=7.5,
        num_inference_steps=6,
    )


def generate_and_judge(pipe, seed: int):
    """One request and its shadow render, in one event loop (the shadow is a task of it)."""

    async def both():
        result = await pipe.generate(request(seed))
        await pipe.wait_for_shadows()
        return result

    return run(both())


def pipeline(path, denoiser=None, **guard):
    guard_settings = {"shadow_fraction": 1.0, "window": 4, "min_samples": 2, **guard}
    settings = AppSettings.model_validate(
        {"num_threads": 2, "denoiser": denoiser or {}, "quality_guard": guard_settings}
    )
    return local_pipeline_for(path, settings)


def test_the_guard_trips_only_on_enough_bad_comparisons():
    guard = LiveQualityGuard(
        QualityGuardSettings(shadow_fraction=0.5, window=3, min_samples=2, min_psnr_db=32), rng=random.Random(0)
    )
    assert not guard.record(20.0)  # one sample is no verdict
    assert guard.record(math.inf) is False and guard.rolling_psnr_db == (20.0 + IDENTICAL_DB) / 2
    assert not guard.record(25.0) and not guard.tripped  # (20 + 100 + 25) / 3 = 48 dB
    assert not guard.record(22.0)  # the window slides: (100 + 25 + 22) / 3 = 49 dB
    assert guard.record(10.0) and guard.tripped  # (25 + 22 + 10) / 3 = 19 dB
    assert "19.0 dB" in guard.reason and "under 32 dB" in guard.reason
    assert not guard.should_shadow() and not guard.record(5.0)  # tripped once; no shadows after


def test_shadowing_samples_the_configured_share():
    guard = LiveQualityGuard(QualityGuardSettings(shadow_fraction=0.25), rng=random.Random(1))
    share = sum(guard.should_shadow() for _ in range(4000)) / 4000
    assert abs(share - 0.25) < 0.03
    assert not LiveQualityGuard(QualityGuardSettings(shadow_fraction=0.0)).should_shadow()


def test_a_degraded_variant_is_switched_back_to_the_baseline(tiny_model_path):
    """bf16 UNet served, fp32 baseline shadowing every request; a 99 dB bar that bf16 cannot
    meet trips the guard after two comparisons, and the next request gets the fp32 image."""
    served = pipeline(tiny_model_path, BF16, min_psnr_db=99.0)
    first = generate_and_judge(served, 1)
    assert not served.quality_guard.tripped  # one comparison: no verdict yet
    generate_and_judge(served, 2)
    guard = served.quality_guard
    assert guard.tripped and guard.comparisons == 2 and "under 99 dB" in guard.reason
    assert 20 < guard.rolling_psnr_db < 99  # bf16 is close to fp32, just not that close

    reference = local_pipeline_for(tiny_model_path, AppSettings(num_threads=2))  # fp32 throughout
    after = generate_and_judge(served, 1)
    assert max_pixel_diff(after.images_png[0], run(reference.generate(request(1))).images_png[0]) <= 1
    assert psnr_db(first.images_png[0], after.images_png[0]) < 99  # it did change variant
    assert guard.comparisons == 2  # no more shadows once switched


def test_an_identical_variant_never_trips(tiny_model_path):
    served = pipeline(tiny_model_path, None, min_psnr_db=32.0)
    for seed in (1, 2, 3):
        generate_and_judge(served, seed)
    assert served.quality_guard.comparisons == 3 and not served.quality_guard.tripped
    assert served.quality_guard.rolling_psnr_db == IDENTICAL_DB
