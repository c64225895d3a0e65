"""The offline quality guard (`fusionserve ab-test`): metrics, variant specs, verdicts.

Measured here (tiny model, 64x64, 20 steps, seeds 0-1, torch fp32 baseline): torch bf16
45-48 dB PSNR (SSIM 0.999); onnxruntime int8 37-42 dB; 2 steps 17-18 dB (SSIM ~0.6);
onnxruntime fp32 is mostly byte-identical after PNG rounding (one image of four: 89 dB), so
bf16 is the "differs a little" candidate. Bounds below leave room for other CPUs' bf16.
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


def test_mean_psnr_is_over_the_pairs_that_differ():
    def result(*psnrs):
        return ABResult("default", "x", 64, 64, 32.0, [ImagePair("p", s, 20, 20, v, 1.0) for s, v in enumerate(psnrs)])

    assert result(math.inf, 30.0, 40.0).mean_psnr_db == 35.0  # an identical pair does not lift the mean
    assert not result(math.inf, math.inf, 31.0).passed
    assert result(math.inf, math.inf).mean_psnr_db == math.inf and result(math.inf, math.inf).passed


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
    out = capsys.readouterr().out
    assert "inf" in out and out.rstrip().endswith("PASS")


def test_two_steps_fail_the_guard(tmp_path, prompts_file, capsys):
    status, result = ab_test(tmp_path, prompts_file, "steps=20", "steps=2")
    assert status == 1 and not result["passed"]
    assert result["mean_psnr_db"] < 32  # measured 17-18 dB
    assert [(p["baseline_steps"], p["candidate_steps"]) for p in result["pairs"]] == [(20, 2), (20, 2)]
    assert capsys.readouterr().out.rstrip().endswith("FAIL")


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
