"""The offline quality guard (`fusionserve ab-test`): metrics, variant specs, verdicts.

Measured here (tiny model, 64x64, 20 steps, seeds 0-1, torch fp32 baseline): torch bf16
45-48 dB PSNR (SSIM 0.999); onnxruntime int8 37-42 dB; 2 steps 17-18 dB (SSIM ~0.6);
onnxruntime fp32 is mostly byte-identical after PNG rounding (one image of four: 89 dB), so
bf16 is the "differs a little" candidate. Bounds below leave room for other CPUs' bf16.

The tiny model's weights are random, so the judge's adherence on its images is noise: the
tests assert the rules (equal images, equal adherence; the verdict's arithmetic), not values.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from serve_app.flow.quality import ABResult, ImagePair, VariantSpec, psnr_db, read_prompts, ssim
from serve_app.ops import cli

PROMPTS = ["A smiling Asian man wearing glasses, about 35 years old", "portrait of an old woman with grey hair"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# two portraits\n\n" + "\n".join(PROMPTS) + "\n")
    return path


def ab_test(tmp_path, prompts_file, baseline: str, candidate: str, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "ab.json"
    status = cli.main(
        [
            "ab-test",
            "--baseline",
            baseline,
            "--candidate",
            candidate,
            "--prompts",
            str(prompts_file),
            "--seeds",
            "1",
            "--size",
            "64x64",
            "--model",
            "tiny",
            "--json",
            str(out),
            *extra,
        ]
    )
    return status, json.loads(out.read_text()) if out.exists() else {}


# --------------------------------------------------------------------------- metrics
def test_identical_images_have_infinite_psnr_and_ssim_one():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert psnr_db(image, image.copy()) == math.inf
    assert ssim(image, image.copy()) == pytest.approx(1.0, abs=1e-9)


def test_psnr_of_a_known_error():
    black, one = np.zeros((64, 64, 3), np.uint8), np.ones((64, 64, 3), np.uint8)
    # MSE 1: 20 log10(255) = 48.1308 dB (torchmetrics takes log(10) in float32: ~2e-6 dB off)
    assert psnr_db(black, one) == pytest.approx(20 * math.log10(255), abs=1e-5)
    png = io.BytesIO()
    Image.fromarray(one).save(png, format="PNG")
    assert psnr_db(black, png.getvalue()) == psnr_db(black, one)  # PNG bytes decode to the same pixels
    assert ssim(black, one) < 1.0


def test_metrics_reject_mismatched_images():
    with pytest.raises(ValueError, match="differ in size"):
        psnr_db(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 72, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ssim(np.zeros((64, 64, 3), np.float32), np.zeros((64, 64, 3), np.float32))


def adherence_result(baseline: float | None, candidate: float | None, psnr: float = 40.0) -> ABResult:
    """Two pairs that differ a little (PSNR `psnr`), each with the given adherences."""
    pairs = [ImagePair("p", seed, 20, 20, psnr, 0.99, baseline, candidate) for seed in range(2)]
    return ABResult("default", "x", 64, 64, 32.0, pairs)


def test_mean_psnr_is_over_the_pairs_that_differ():
    def result(*psnrs):
        return ABResult("default", "x", 64, 64, 32.0, [ImagePair("p", s, 20, 20, v, 1.0) for s, v in enumerate(psnrs)])

    assert result(math.inf, 30.0, 40.0).mean_psnr_db == 35.0  # an identical pair does not lift the mean
    assert not result(math.inf, math.inf, 31.0).passed
    assert result(math.inf, math.inf).mean_psnr_db == math.inf and result(math.inf, math.inf).passed


def test_an_adherence_drop_over_two_points_fails_even_when_psnr_passes():
    three_points = adherence_result(0.75, 0.72)
    assert three_points.adherence_drop == pytest.approx(0.03)
    assert three_points.mean_psnr_db >= three_points.min_psnr_db  # the PSNR rule alone would pass
    assert three_points.failed_rules == ["adherence"] and not three_points.passed
    one_point = adherence_result(0.75, 0.74)
    assert one_point.failed_rules == [] and one_point.passed
    assert adherence_result(0.75, 0.73).passed  # exactly 2 points is within (0.75 - 0.73 > 0.02 in floats)
    assert adherence_result(0.5, 0.9).passed  # a better candidate: negative drop


def test_both_rules_are_named_when_both_fail():
    assert adherence_result(0.75, 0.5, psnr=20.0).failed_rules == ["psnr", "adherence"]
    assert adherence_result(0.75, 0.75, psnr=20.0).failed_rules == ["psnr"]


def test_adherence_is_not_judged_when_nothing_drawable_is_asked():
    nothing = adherence_result(None, None)
    assert (nothing.mean_baseline_adherence, nothing.mean_candidate_adherence, nothing.adherence_drop) == (None,) * 3
    assert nothing.passed
    assert not adherence_result(None, None, psnr=20.0).passed  # PSNR still judges


def test_mean_adherence_skips_pairs_with_nothing_drawable():
    result = adherence_result(0.5, 0.5)
    result.pairs += [
        ImagePair("headshot", 0, 20, 20, 40.0, 0.99, None, None),
        ImagePair("q", 1, 20, 20, 40.0, 0.99, 1.0, 0.5),
    ]
    assert result.mean_baseline_adherence == pytest.approx(2 / 3)  # (0.5 + 0.5 + 1.0) / 3: the None pair left out
    assert result.mean_candidate_adherence == pytest.approx(0.5)


def test_json_has_adherence_and_frechet():
    result = adherence_result(2 / 3, 0.5)
    result.frechet_distance = 1.234567
    body = result.to_json()
    assert body["mean_baseline_adherence"] == 0.6667 and body["mean_candidate_adherence"] == 0.5
    assert body["adherence_drop"] == 0.1667 and body["max_adherence_drop"] == 0.02
    assert body["frechet_distance"] == 1.2346 and body["failed_rules"] == ["adherence"] and not body["passed"]
    assert [(p["baseline_adherence"], p["candidate_adherence"]) for p in body["pairs"]] == [(0.6667, 0.5)] * 2
    empty = adherence_result(None, None).to_json()
    assert (empty["adherence_drop"], empty["frechet_distance"], empty["pairs"][0]["baseline_adherence"]) == (None,) * 3
    json.dumps(body, allow_nan=False)  # plain JSON: no NaN or infinity


# --------------------------------------------------------------------------- variant specs
def test_variant_spec_parses_every_key():
    spec = VariantSpec.parse(
        "backend=onnxruntime, precision=int8,model=tiny,steps=30,policy=fixed,encoder_cache=off,early_stop=0.02"
    )
    assert (spec.backend, spec.precision, spec.model, spec.steps, spec.policy, spec.encoder_cache, spec.early_stop) == (
        "onnxruntime",
        "int8",
        "tiny",
        30,
        "fixed",
        "off",
        0.02,
    )
    assert VariantSpec.parse(str(spec)) == spec
    assert VariantSpec.parse("early_stop=off").early_stop == "off"
    assert VariantSpec.parse("") == VariantSpec.parse("default") == VariantSpec()
    assert (VariantSpec().backend, VariantSpec().precision, VariantSpec().encoder_cache) == ("torch", "fp32", "on")


@pytest.mark.parametrize(
    "text,key",
    [
        ("foo=1", "unknown key 'foo'"),
        ("steps=0", "steps='0'"),
        ("steps=many", "steps='many'"),
        ("precision=fp8", "precision='fp8'"),
        ("policy=fast", "policy='fast'"),
        ("encoder_cache=maybe", "encoder_cache='maybe'"),
        ("early_stop=1.5", "early_stop='1.5'"),
        ("steps=20,steps=30", "'steps' given twice"),
        ("steps", "'steps' is not key=value"),
    ],
)
def test_bad_variant_specs_name_the_key(text, key):
    with pytest.raises(ValueError, match=key):
        VariantSpec.parse(text)


def test_prompts_file_skips_comments_and_blank_lines(prompts_file):
    assert read_prompts(prompts_file) == PROMPTS
    assert len(read_prompts("benchmarks/data/ab_prompts.txt")) == 6


# --------------------------------------------------------------------------- the CLI
def test_identical_variants_pass(tmp_path, prompts_file, capsys):
    status, result = ab_test(tmp_path, prompts_file, "steps=20", "steps=20")
    assert status == 0 and result["passed"]
    assert [pair["psnr_db"] for pair in result["pairs"]] == [None, None]  # JSON null: infinite, identical
    assert all(pair["identical"] and pair["ssim"] == pytest.approx(1.0) for pair in result["pairs"])
    assert result["mean_psnr_db"] is None and result["differing"] == 0
    # Equal images read alike: every prompt here asks something drawable, so adherence is judged.
    adherences = [(pair["baseline_adherence"], pair["candidate_adherence"]) for pair in result["pairs"]]
    assert all(b is not None and b == c for b, c in adherences)
    assert result["mean_baseline_adherence"] is not None
    assert result["mean_baseline_adherence"] == result["mean_candidate_adherence"]
    assert result["adherence_drop"] == 0 and result["failed_rules"] == []
    assert result["frechet_distance"] == pytest.approx(0, abs=1e-6)  # one image a prompt, two prompts: 2 a side
    out = capsys.readouterr().out
    assert "inf" in out and "drop 0.0 points" in out and out.rstrip().endswith("PASS")


def test_two_steps_fail_the_guard(tmp_path, prompts_file, capsys):
    status, result = ab_test(tmp_path, prompts_file, "steps=20", "steps=2")
    assert status == 1 and not result["passed"]
    assert result["mean_psnr_db"] < 32  # measured 17-18 dB
    assert [(p["baseline_steps"], p["candidate_steps"]) for p in result["pairs"]] == [(20, 2), (20, 2)]
    assert "psnr" in result["failed_rules"]
    out = capsys.readouterr().out
    assert "dB under 32 dB" in out and out.rstrip().endswith("FAIL")


def test_bf16_differs_a_little_and_the_threshold_decides(tmp_path, prompts_file):
    prompt = tmp_path / "one.txt"
    prompt.write_text(PROMPTS[0] + "\n")
    status, result = ab_test(tmp_path, prompt, "steps=20", "precision=bf16,steps=20", "--min-psnr", "40")
    assert status == 0 and result["min_psnr_db"] == 40
    (pair,) = result["pairs"]
    assert 40 < pair["psnr_db"] < math.inf and pair["ssim"] > 0.99  # measured 45.7 dB, SSIM 0.999
    status, result = ab_test(tmp_path, prompt, "steps=20", "precision=bf16,steps=20", "--min-psnr", "60")
    assert status == 1 and not result["passed"]


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--candidate", "steps=2", "--prompts", "missing.txt"], "missing.txt not found"),
        (["--candidate", "colour=red", "--prompts", "benchmarks/data/ab_prompts.txt"], "unknown key 'colour'"),
        (
            ["--candidate", "steps=2", "--prompts", "benchmarks/data/ab_prompts.txt", "--size", "60x64"],
            "multiples of 8",
        ),
    ],
)
def test_bad_input_exits_2(args, fragment, capsys):
    assert cli.main(["ab-test", *args]) == 2
    assert fragment in capsys.readouterr().err
