"""The step controller's choices in constructed situations (no model, no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from deployments.denoiser.step_batcher import LoadSnapshot
from deployments.prompt.optimizer import OptimizedPrompt
from serve_app.config import StepSettings
from serve_app.flow.request import ImageRequest
from serve_app.flow.steps import StepController, StepDecision, image_detail, predict_denoise_ms, step_ms

SIMPLE = OptimizedPrompt(
    "portrait",
    "",
    prompt_tokens=1,
    negative_prompt_tokens=0,
    truncated_tokens=0,
    cache_namespace="default",
    attributes={},
)
BUSY = OptimizedPrompt(
    "Asian man, age:35, ...",
    "",
    prompt_tokens=60,
    negative_prompt_tokens=0,
    truncated_tokens=0,
    cache_namespace="default",
    attributes={  # 8 terms: one per key, each accessory apart
        "identity": ["Asian man"],
        "age": ["age:35"],
        "expression": ["smiling expression"],
        "glasses": ["wearing glasses"],
        "hair": ["short black hair"],
        "facial_hair": ["beard"],
        "lighting": ["soft lighting"],
        "accessories": ["earrings"],
    },
)
MEDIUM = dataclasses.replace(
    BUSY, prompt_tokens=30, attributes={"identity": ["man"], "age": ["age:35"], "glasses": ["wearing glasses"]}
)


def request(**overrides) -> ImageRequest:
    fields = dict(
        prompt="p", negative_prompt="", width=128, height=128, n=1, seed=1, guidance_scale=7.5, num_inference_steps=None
    )
    fields.update(overrides)
    return ImageRequest(**fields)


def load(active_images=0, waiting_images=0, queued_steps=0, batch=8, table=None) -> LoadSnapshot:
    """A replica whose 16x16-latent forward costs 20 ms + 10 ms per image."""
    table = table if table is not None else {1: 30.0, 2: 40.0, 4: 60.0, 8: 100.0}
    return LoadSnapshot(
        waiting_jobs=0,
        active_jobs=0,
        active_images=active_images,
        queued_steps=queued_steps,
        queued_work=float(queued_steps * 16 * 16),
        steps_run=0,
        cancelled_jobs=0,
        waiting_images=waiting_images,
        max_batch_size=batch,
        step_ms_by_shape={"16x16": table},
    )


def slo(deadline_ms, **kwargs):
    return StepController(StepSettings(policy="slo", deadline_ms=deadline_ms)).choose(request(), BUSY, load(**kwargs))


def test_complexity_maps_the_prompt_onto_the_range():
    controller = StepController(StepSettings(policy="complexity"))
    simple, medium, busy = (controller.choose(request(), p) for p in (SIMPLE, MEDIUM, BUSY))
    assert simple.steps == 15 and simple.reason == "complexity"  # 1 token, nothing recognised
    assert busy.steps == 30  # 8 attribute values and 60 tokens: full score
    assert 15 < medium.steps < 30
    assert medium.complexity == pytest.approx(0.6 * 3 / 8 + 0.4 * 30 / 60)


def test_the_template_prefix_does_not_count_as_complexity():
    with_template = dataclasses.replace(SIMPLE, prompt_tokens=21, prefix_tokens=21)  # 20 template tokens + 1
    controller = StepController(StepSettings(policy="complexity"))
    assert controller.choose(request(), with_template).steps == controller.choose(request(), SIMPLE).steps


def test_an_edit_image_adds_its_detail():
    controller = StepController(StepSettings(policy="complexity"))
    flat = np.full((64, 64, 3), 128, np.uint8)
    checkerboard = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    assert image_detail(flat) == 0.0 and image_detail(checkerboard) == 1.0
    assert (
        controller.choose(request(), SIMPLE, detail=1.0).steps > controller.choose(request(), SIMPLE, detail=0.0).steps
    )


def test_slo_at_no_load_gives_the_complexity_choice():
    decision = slo(deadline_ms=10_000)
    assert (decision.steps, decision.reason) == (30, "slo")
    assert decision.predicted_ms == pytest.approx(30 * 30.0)  # alone: 30 steps of a 1-image forward


def test_slo_under_a_deep_queue_takes_fewer_steps_but_never_below_the_minimum():
    # A full batch (8 images) and 400 image-steps queued: at 100 ms per full forward they
    # drain in 5000 ms, and each of our steps adds 100/8 ms: (400 + s) * 12.5 <= 5200 -> s = 16.
    decision = slo(deadline_ms=5_200, active_images=8, queued_steps=400)
    assert (decision.steps, decision.reason) == (16, "slo:reduced")
    assert decision.predicted_ms == pytest.approx((400 + 16) * 12.5)
    deeper = slo(deadline_ms=5_200, active_images=8, queued_steps=800)
    assert (deeper.steps, deeper.reason) == (15, "slo:infeasible")  # the minimum, and counted as such


def test_slo_that_cannot_be_met_serves_the_minimum_and_says_so():
    decision = slo(deadline_ms=200, active_images=8, queued_steps=400)
    assert (decision.steps, decision.reason) == (15, "slo:infeasible")
    assert decision.predicted_ms > 200 and decision.deadline_ms == 200


def test_slo_counts_time_already_spent_and_the_decode_estimate():
    controller = StepController(StepSettings(policy="slo", deadline_ms=1_000))
    assert controller.choose(request(), BUSY, load()).steps == 30  # 900 ms
    assert controller.choose(request(), BUSY, load(), elapsed_ms=300).steps == 23  # 700 ms left: 23 x 30 ms
    controller.observe_decode(ms=100.0, pixels=128 * 128)
    assert controller.choose(request(), BUSY, load(), elapsed_ms=300).steps == 20  # and 100 ms for the decode


def test_without_timings_slo_falls_back_to_the_complexity_choice():
    decision = StepController(StepSettings(policy="slo")).choose(request(), BUSY, load(table={}))
    assert (decision.steps, decision.reason) == (30, "slo:no-timings")


def test_explicit_steps_always_win():
    controller = StepController(StepSettings(policy="slo", deadline_ms=1))
    decision = controller.choose(
        request(num_inference_steps=7, quality="best"), BUSY, load(active_images=8, queued_steps=10_000)
    )
    assert (decision.steps, decision.reason) == (7, "explicit")


def test_quality_tiers_shift_the_range():
    controller = StepController(StepSettings(policy="complexity"))
    assert [controller.choose(request(quality=q), SIMPLE).steps for q in ("fast", "balanced", "best")] == [15, 15, 25]
    assert [controller.choose(request(quality=q), BUSY).steps for q in ("fast", "balanced", "best")] == [20, 30, 40]


def test_fixed_policy_and_per_request_policy_override():
    controller = StepController(StepSettings(policy="fixed", fixed_steps=22))
    assert controller.choose(request(), BUSY).steps == 22
    assert controller.choose(request(step_policy="complexity"), BUSY).steps == 30
    assert controller.policy_for(request(deadline_ms=500)) == "slo"  # a deadline asks for the slo policy
    assert not controller.needs_load(request()) and controller.needs_load(request(deadline_ms=500))


def test_step_cost_interpolates_and_extrapolates_pessimistically():
    snapshot = load()
    assert step_ms(snapshot, (16, 16), 3) == pytest.approx(50.0)  # between 2 (40) and 4 (60)
    assert step_ms(snapshot, (16, 16), 16) == pytest.approx(200.0)  # beyond 8: linear in images
    assert step_ms(snapshot, (32, 32), 1) == pytest.approx(120.0)  # another size: scaled by pixels
    sparse = load(table={4: 60.0})
    assert step_ms(sparse, (16, 16), 1) == 60.0  # below the smallest measured: its time


def test_ranges_are_validated():
    with pytest.raises(ValueError, match="min 30 > max 15"):
        StepSettings(ranges={"fast": (30, 15), "balanced": (15, 30), "best": (25, 40)})


def test_a_recently_full_batch_counts_even_when_the_queue_is_empty_now():
    """Jobs arriving after this one will join its batch: under steady load the recent
    occupancy, not the instant one, prices its steps."""
    busy_lately = dataclasses.replace(load(), recent_occupancy=8.0)
    assert predict_denoise_ms(load(), 20, 1, (16, 16)) == pytest.approx(20 * 30.0)
    assert predict_denoise_ms(busy_lately, 20, 1, (16, 16)) == pytest.approx(20 * 100.0)


def test_the_cost_model_calibrates_itself_from_served_requests():
    controller = StepController(StepSettings(policy="slo", deadline_ms=900))
    first = controller.choose(request(), BUSY, load())
    assert (first.steps, first.predicted_denoise_ms) == (30, pytest.approx(900.0))
    controller.observe_denoise(first, actual_ms=1800.0)  # twice as slow as predicted: rises fast
    assert controller.calibration == pytest.approx(1.5)
    second = controller.choose(request(), BUSY, load())
    assert second.steps == 20 and second.predicted_ms == pytest.approx(20 * 30.0 * 1.5)
    controller.observe_denoise(second, actual_ms=600.0 * 0.5)  # then faster: falls slowly, never under 0.5
    assert controller.calibration == pytest.approx(0.9 * 1.5 + 0.1 * 0.5)
    controller.observe_denoise(StepDecision(7, "explicit"), actual_ms=1e6)  # no prediction: nothing learned
    assert controller.calibration == pytest.approx(1.4)


def test_an_edit_costs_its_strength_share_of_the_steps():
    """At strength 0.3 an edit runs 30% of the schedule, so a deadline that cuts a generation
    leaves the edit its complexity choice; the predicted denoise time counts only those steps."""
    from PIL import Image

    controller = StepController()
    image = Image.new("RGB", (128, 128))
    generation = controller.choose(request(deadline_ms=500), BUSY, load())
    edit = controller.choose(request(deadline_ms=500, image=image, strength=0.3), BUSY, load(), detail=1.0)
    assert generation.reason == "slo:reduced" and generation.steps < 30
    assert (edit.steps, edit.reason) == (30, "slo")
    assert edit.predicted_denoise_ms == pytest.approx(predict_denoise_ms(load(), 9, 1, (16, 16)))


def test_an_edit_always_gets_a_schedule_that_runs_a_step():
    from PIL import Image

    controller = StepController(StepSettings(policy="fixed", fixed_steps=20))
    tiny_strength = request(image=Image.new("RGB", (128, 128)), strength=0.01)
    assert controller.choose(tiny_strength, SIMPLE).steps == 100  # int(100 x 0.01) = 1


# -- with a measured sampler table ------------------------------------------------------------
def sampler_table():
    from serve_app.flow.sampler_table import SamplerSetting, SamplerTable

    def row(scheduler, steps, interval, equivalents, adherence, psnr):
        return SamplerSetting(
            scheduler=scheduler,
            steps=steps,
            cache_interval=interval,
            step_equivalents=equivalents,
            adherence=adherence,
            psnr_db=psnr,
        )

    return SamplerTable(
        model="portrait",
        unet_digest="0" * 16,
        measured="constructed",
        settings=[
            row("ddim", 30, 1, 30.0, 0.400, 45.0),
            row("ddim", 20, 1, 20.0, 0.398, 37.0),
            row("dpmpp_2m", 20, 3, 10.0, 0.395, 31.0),  # cheap, within 1 point, close to the picture
            row("unipc", 10, 5, 4.0, 0.370, 24.0),  # cheapest: 3 points under, far from the picture
        ],
    )


def table_controller(**settings) -> StepController:
    return StepController(StepSettings(**settings), sampler_table())


def test_the_table_gives_the_cheapest_setting_within_the_tier():
    """balanced: within 1 point of the best and >= 26 dB -> DPM-Solver++ 20 steps, cache 3;
    fast (3 points, 22 dB) -> the cheapest row; best (0 points, 30 dB) -> the best row."""
    controller = table_controller(policy="complexity")
    balanced = controller.choose(request(), BUSY)
    assert (balanced.scheduler, balanced.steps, balanced.cache_interval) == ("dpmpp_2m", 20, 3)
    assert balanced.sampler_reason == "table"
    fast = controller.choose(request(quality="fast"), BUSY)
    assert (fast.scheduler, fast.steps, fast.cache_interval) == ("unipc", 10, 5)
    best = controller.choose(request(quality="best"), BUSY)
    assert (best.scheduler, best.steps, best.cache_interval) == ("ddim", 30, 1)


def test_request_fields_narrow_the_table_and_win():
    controller = table_controller(policy="complexity")
    ddim = controller.choose(request(scheduler="ddim"), BUSY)
    assert (ddim.scheduler, ddim.steps, ddim.cache_interval) == ("ddim", 20, 1)  # the cheapest DDIM within 1 point
    uncached = controller.choose(request(cache_interval=1, quality="fast"), BUSY)
    assert uncached.cache_interval == 1 and uncached.scheduler == "ddim"
    # explicit steps: the model's own sampler, uncached, as without a table (same request, same image)
    steps = controller.choose(request(num_inference_steps=20), BUSY)
    assert (steps.steps, steps.reason, steps.scheduler, steps.cache_interval) == (20, "explicit", None, 1)
    assert steps.sampler_reason == "default"
    other = controller.choose(request(num_inference_steps=7, cache_interval=2), BUSY)
    assert (other.steps, other.cache_interval, other.scheduler, other.sampler_reason) == (7, 2, None, "explicit")
    # nothing in the table agrees: the step ranges decide, the request's fields are used as given
    unmeasured = controller.choose(request(cache_interval=4), BUSY)
    assert (unmeasured.cache_interval, unmeasured.reason, unmeasured.sampler_reason) == (4, "complexity", "explicit")


def test_the_fixed_policy_and_no_table_keep_the_models_sampler_uncached():
    for controller in (table_controller(policy="fixed"), StepController(StepSettings(policy="complexity"))):
        decision = controller.choose(request(), BUSY)
        assert (decision.scheduler, decision.cache_interval, decision.sampler_reason) == (None, 1, "default")


def test_under_a_deadline_the_table_gives_the_best_setting_that_meets_it():
    """Idle replica, 30 ms per whole step alone: dpmpp 20/3 (10 equivalents) takes ~300 ms;
    a 200 ms deadline leaves only unipc 10/5 (4 equivalents, ~120 ms); 50 ms leaves nothing."""
    controller = table_controller(policy="slo")
    roomy = controller.choose(request(deadline_ms=10_000), BUSY, load())
    assert (roomy.scheduler, roomy.sampler_reason) == ("dpmpp_2m", "table")
    tight = controller.choose(request(deadline_ms=200), BUSY, load())
    assert (tight.scheduler, tight.steps, tight.sampler_reason) == ("unipc", 10, "table:slo")
    assert tight.predicted_ms is not None and tight.predicted_ms <= 200
    hopeless = controller.choose(request(deadline_ms=50), BUSY, load())
    assert (hopeless.scheduler, hopeless.sampler_reason) == ("unipc", "table:slo-infeasible")


def test_a_table_measured_on_other_weights_is_not_used(tmp_path):
    from serve_app.flow.sampler_table import load_sampler_table

    path = tmp_path / "table.json"
    path.write_text(sampler_table().model_dump_json())
    assert load_sampler_table(str(path), "portrait", "0" * 16) == sampler_table()
    assert load_sampler_table(str(path), "portrait", "f" * 16) is None
    assert load_sampler_table(None, "portrait", "0" * 16) is None
    with pytest.raises(ValueError, match="not found"):
        load_sampler_table(str(tmp_path / "missing.json"), "portrait", "0" * 16)


def test_the_packaged_table_is_found_by_the_weights_not_the_folders_name():
    """A copy of the portrait folder under another name gets portrait's table; other weights
    under the name portrait get none."""
    from serve_app.flow.sampler_table import SamplerTable, load_sampler_table, packaged_table_path

    packaged = SamplerTable.model_validate_json(packaged_table_path("portrait").read_text())
    assert load_sampler_table("auto", "portrait_copy", packaged.unet_digest) == packaged
    assert load_sampler_table("auto", "portrait", packaged.unet_digest) == packaged
    assert load_sampler_table("auto", "portrait", "f" * 16) is None
    assert load_sampler_table("auto", "portrait_copy", "f" * 16) is None
