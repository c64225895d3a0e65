"""Live A/B: shadow renders by the baseline, the rolling PSNR and adherence, the switch back."""

from __future__ import annotations

import math
import random

import pytest

from deployments.models.portrait.judge import Reading
from serve_app.config import AppSettings, QualityGuardSettings
from serve_app.flow.pipeline import local_pipeline_for
from serve_app.flow.quality import psnr_db
from serve_app.flow.quality_guard import IDENTICAL_DB, Adherence, LiveQualityGuard
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


def adherence_guard(min_samples: int = 3) -> LiveQualityGuard:
    return LiveQualityGuard(QualityGuardSettings(window=5, min_samples=min_samples, min_psnr_db=32))


def test_an_adherence_drop_trips_the_guard_while_psnr_passes():
    guard = adherence_guard()
    assert not guard.record(45.0, Adherence(served=0.70, baseline=0.80))
    assert not guard.record(45.0, Adherence(served=0.70, baseline=0.80))  # two comparisons: no verdict yet
    assert guard.record(45.0, Adherence(served=0.70, baseline=0.80)) and guard.tripped
    assert guard.rolling_psnr_db == 45.0  # the PSNR rule alone would pass
    assert guard.rolling_served_adherence == pytest.approx(0.70)
    assert guard.rolling_baseline_adherence == pytest.approx(0.80)
    assert "adherence 70.0%" in guard.reason and "10.0 points under the baseline's 80.0%" in guard.reason
    assert "at most 2 points" in guard.reason and "dB" not in guard.reason


def test_up_to_two_points_of_adherence_may_be_lost():
    guard = adherence_guard()
    for _ in range(10):
        assert not guard.record(45.0, Adherence(served=0.74, baseline=0.75))  # 1 point
    for _ in range(10):
        assert not guard.record(45.0, Adherence(served=0.73, baseline=0.75))  # exactly 2 points
    assert not guard.tripped and guard.rolling_adherence_drop is not None
    assert abs(guard.rolling_adherence_drop - 0.02) < 1e-9
    assert guard.record(45.0, Adherence(served=0.60, baseline=0.75))  # the window's mean drop passes 2 points


def test_comparisons_without_drawable_attributes_leave_the_adherence_window_alone():
    guard = adherence_guard()
    guard.record(45.0, Adherence(served=0.5, baseline=1.0))
    guard.record(45.0, Adherence(served=0.5, baseline=1.0))
    for _ in range(10):
        assert not guard.record(45.0)  # nothing drawable asked: no adherence verdict on these
    assert guard.comparisons == 12 and not guard.tripped
    assert guard.rolling_served_adherence == 0.5 and guard.rolling_adherence_drop == 0.5
    assert guard.record(45.0, Adherence(served=0.5, baseline=1.0))  # the third one with adherence
    assert "over the last 3 shadow renders" in guard.reason
    assert LiveQualityGuard().rolling_adherence_drop is None


def test_the_psnr_rule_trips_even_when_adherence_holds():
    guard = adherence_guard(min_samples=2)
    assert not guard.record(20.0, Adherence(served=1.0, baseline=1.0))
    assert guard.record(20.0, Adherence(served=1.0, baseline=1.0))
    assert "rolling PSNR 20.0 dB" in guard.reason and "under 32 dB" in guard.reason


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
    assert served.quality_guard.rolling_adherence_drop == 0.0  # the judge read both identical images


class MissesTheSmile:
    """A judge that sees the smile asked for in the baseline's image (read second) only."""

    def __init__(self):
        self.images_read = 0

    def read(self, images):
        self.images_read += len(images)
        return [self._reading(expression) for expression in ("neutral", "smiling expression")]

    @staticmethod
    def _reading(expression: str) -> Reading:
        values = {"identity": "woman", "expression": expression}
        return Reading(values, dict.fromkeys(values, 1.0), frozenset())


def test_the_served_images_losing_what_was_asked_trips_the_guard(tiny_model_path, monkeypatch):
    """Identical images (PSNR passes) that a judge reads differently: the prompt's smile, which the
    optimizer parsed, is missing from the served image, so adherence drops 50 points and the guard trips."""
    judge = MissesTheSmile()
    loads = []
    monkeypatch.setattr("serve_app.flow.pipeline.Judge.packaged", lambda: loads.append(1) or judge)
    served = pipeline(tiny_model_path, None, min_psnr_db=32.0)
    generate_and_judge(served, 1)
    generate_and_judge(served, 2)
    guard = served.quality_guard
    assert guard.tripped and guard.rolling_psnr_db == IDENTICAL_DB
    assert guard.rolling_served_adherence == 0.5 and guard.rolling_baseline_adherence == 1.0
    assert "50.0 points under the baseline's 100.0%" in guard.reason
    assert judge.images_read == 4 and len(loads) == 1  # loaded once, for both comparisons
