"""Offline quality guard: PSNR/SSIM between images, variant specs, the A/B run.

`fusionserve ab-test` renders the same prompts and seeds with a baseline and a candidate
variant (UNet backend and precision, a pruned model, step count or policy, encoder cache,
early stop) in-process, compares each pair of images and has the judge read both.

Verdict: the candidate passes when both rules hold.
- PSNR: the mean PSNR is at least min_psnr_db. Identical pairs have infinite PSNR and are left
  out of the mean, which is taken over the pairs that differ (infinite when none do). So a
  candidate cannot hide a bad image behind identical ones: the guard judges only what
  changed, which is the conservative choice. Mean SSIM is a plain mean (identical pairs count 1.0).
- Adherence (issue 18): the candidate's mean adherence (the share of a prompt's drawable
  attributes the judge finds, as `fusionserve judge --prompt` scores it) is at most
  max_adherence_drop (2 points) under the baseline's. Means are over the pairs whose prompt
  asks something drawable; when none does, this rule is not judged.
The Fréchet distance on judge features (all baseline vs all candidate images) is reported,
not judged (the issue sets no threshold for it).
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from deployments.models.portrait.adherence import PromptExpectations, expectations
from deployments.models.portrait.judge import Judge, frechet_distance
from serve_app.config import AppSettings, QualityGuardSettings
from serve_app.flow.request import ImageRequest
from serve_app.flow.variant_spec import VariantSpec

if TYPE_CHECKING:
    from serve_app.flow.pipeline import ImagePipeline


# --------------------------------------------------------------------------- metrics
def pixels_of(image: bytes | np.ndarray | Image.Image) -> np.ndarray:
    """PNG bytes, a PIL image or an [H, W, 3] uint8 array -> [H, W, 3] uint8 RGB array."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 RGB image, got {pixels.dtype} {pixels.shape}")
    return pixels


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images as [1, 3, H, W] float64 tensors in 0..255 (float64: no rounding in the error sums)."""
    a, b = pixels_of(a), pixels_of(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}")
    return _as_tensor(a), _as_tensor(b)


def _as_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.tensor(pixels, dtype=torch.float64).permute(2, 0, 1).unsqueeze(0)


def psnr_db(a, b) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; inf when identical."""
    return float(peak_signal_noise_ratio(*_pair(a, b), data_range=255.0))


def ssim(a, b) -> float:
    """Structural similarity (Gaussian 11x11 window, sigma 1.5): 1.0 when identical."""
    value = structural_similarity_index_measure(*_pair(a, b), data_range=255.0)
    assert isinstance(value, torch.Tensor)  # a tuple only with return_full_image=True
    return float(value)


# --------------------------------------------------------------------------- variant specs
def _engine_key(spec: VariantSpec) -> tuple:
    """What the four engines depend on: specs equal here share one set of engines."""
    return spec.model, spec.backend, spec.precision, spec.encoder_cache


def variant_pipeline(spec: VariantSpec, settings: AppSettings, engines: ImagePipeline | None = None) -> ImagePipeline:
    """In-process pipeline for `spec`, otherwise configured as the served app is
    (`local_pipeline_for`), but without the live quality guard: no shadow renders, no
    switching to the baseline mid-run. `engines`: an ImagePipeline whose four engines to
    reuse (the specs differ only in steps, policy or early stop)."""
    from deployments.denoiser.backends import BackendSpec
    from deployments.models import loading
    from serve_app.flow.pipeline import ImagePipeline, local_pipeline_for
    from serve_app.flow.steps import StepController

    steps = settings.steps.model_copy(update=_step_overrides(spec))
    if engines is not None:
        return ImagePipeline(
            engines.prompt_optimizer,
            engines.text_encoder,
            engines.denoiser,
            engines.vae_codec,
            StepController(steps, engines.step_controller.table),
        )
    encoder_cache = settings.text_encoder.cache.model_copy(update={"enabled": spec.encoder_cache == "on"})
    variant_settings = settings.model_copy(
        update={
            "steps": steps,
            "quality_guard": QualityGuardSettings(),  # off
            "text_encoder": settings.text_encoder.model_copy(update={"cache": encoder_cache}),
            # exactly this backend, no fallback chain: the guard must judge the variant it was asked about
            "denoiser": settings.denoiser.model_copy(
                update={"backends": [BackendSpec(backend=spec.backend, precision=spec.precision)]}
            ),
        }
    )
    return local_pipeline_for(loading.resolve_model(spec.model or settings.model), variant_settings)


def _step_overrides(spec: VariantSpec) -> dict[str, Any]:
    """The spec's step-controller settings (policy, early stop) over the served ones."""
    overrides: dict[str, Any] = {}
    if spec.policy is not None:
        overrides["policy"] = spec.policy
    if spec.early_stop is not None:
        overrides["early_stop_threshold"] = None if spec.early_stop == "off" else spec.early_stop
    return overrides


# --------------------------------------------------------------------------- the A/B run
MAX_ADHERENCE_DROP = 0.02  # issue 18: a variant may lose at most 2 points of adherence
# Shares like 0.75 - 0.73 come out as 0.02000000000000002: a drop of exactly the limit passes.
_DROP_TOLERANCE = 1e-9


@dataclass
class ImagePair:
    prompt: str
    seed: int
    baseline_steps: int  # the step controller's choice (before any early stop)
    candidate_steps: int
    psnr_db: float  # inf: identical
    ssim: float
    # Share of the prompt's drawable attributes the judge sees; None: the prompt asks nothing drawable.
    baseline_adherence: float | None = None
    candidate_adherence: float | None = None


@dataclass
class ABResult:
    baseline: str
    candidate: str
    width: int
    height: int
    min_psnr_db: float
    pairs: list[ImagePair] = field(default_factory=list)
    max_adherence_drop: float = MAX_ADHERENCE_DROP
    # Judge features of all baseline vs all candidate images; None under 2 images a side (no covariance).
    frechet_distance: float | None = None

    @property
    def differing(self) -> int:
        """Pairs whose pixels differ (finite PSNR)."""
        return sum(1 for p in self.pairs if math.isfinite(p.psnr_db))

    @property
    def mean_psnr_db(self) -> float:
        """Over the pairs that differ; inf when all are identical (module docstring)."""
        finite = [p.psnr_db for p in self.pairs if math.isfinite(p.psnr_db)]
        return statistics.fmean(finite) if finite else math.inf

    @property
    def mean_ssim(self) -> float:
        return statistics.fmean(p.ssim for p in self.pairs)

    @property
    def mean_baseline_adherence(self) -> float | None:
        return _mean_or_none([p.baseline_adherence for p in self._scored_pairs()])

    @property
    def mean_candidate_adherence(self) -> float | None:
        return _mean_or_none([p.candidate_adherence for p in self._scored_pairs()])

    @property
    def adherence_drop(self) -> float | None:
        """Baseline minus candidate mean adherence (negative: the candidate draws more of what
        was asked); None when no prompt asks anything drawable."""
        baseline, candidate = self.mean_baseline_adherence, self.mean_candidate_adherence
        return None if baseline is None or candidate is None else baseline - candidate

    @property
    def failed_rules(self) -> list[str]:
        """The rules the candidate breaks: "psnr" (mean PSNR under min_psnr_db), "adherence"
        (adherence drop over max_adherence_drop; not judged when nothing drawable was asked)."""
        failed = []
        if self.mean_psnr_db < self.min_psnr_db:
            failed.append("psnr")
        drop = self.adherence_drop
        if drop is not None and drop > self.max_adherence_drop + _DROP_TOLERANCE:
            failed.append("adherence")
        return failed

    @property
    def passed(self) -> bool:
        return not self.failed_rules

    def _scored_pairs(self) -> list[ImagePair]:
        """Pairs whose prompt asks something drawable (both sides read the same prompt)."""
        return [p for p in self.pairs if p.baseline_adherence is not None and p.candidate_adherence is not None]

    def to_json(self) -> dict:
        """JSON has no infinity: an identical pair's psnr_db (and an all-identical mean) is null.
        Adherence and Fréchet are null where not applicable (module docstring)."""

        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        pairs = [
            asdict(p)
            | {
                "psnr_db": finite(p.psnr_db),
                "identical": not math.isfinite(p.psnr_db),
                "baseline_adherence": _rounded(p.baseline_adherence),
                "candidate_adherence": _rounded(p.candidate_adherence),
            }
            for p in self.pairs
        ]
        return {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "size": f"{self.width}x{self.height}",
            "min_psnr_db": self.min_psnr_db,
            "mean_psnr_db": finite(self.mean_psnr_db),
            "differing": self.differing,
            "mean_ssim": self.mean_ssim,
            "mean_baseline_adherence": _rounded(self.mean_baseline_adherence),
            "mean_candidate_adherence": _rounded(self.mean_candidate_adherence),
            "adherence_drop": _rounded(self.adherence_drop),
            "max_adherence_drop": self.max_adherence_drop,
            "frechet_distance": _rounded(self.frechet_distance),
            "failed_rules": self.failed_rules,
            "passed": self.passed,
            "pairs": pairs,
        }


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _rounded(value: float | None) -> float | None:
    """4 decimals: a hundredth of an adherence point."""
    return None if value is None else round(value, 4)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and `#` comments skipped. ValueError if none."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} not found")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts (one per line; # starts a comment)")
    return prompts


def run_ab_test(
    baseline: VariantSpec,
    candidate: VariantSpec,
    prompts: list[str],
    seeds: int,
    settings: AppSettings,
    size: tuple[int, int] = (128, 128),
    seed_base: int = 0,
    min_psnr_db: float | None = None,
    on_image: Callable[[], None] | None = None,
    max_adherence_drop: float = MAX_ADHERENCE_DROP,
) -> ABResult:
    """Render every prompt x seed (seed_base .. seed_base + seeds - 1) with both variants,
    compare each pair and have the judge read both images. `min_psnr_db` None: the live
    guard's (settings.quality_guard).

    Both pipelines (and the judge) are loaded first, so a variant that cannot load fails before
    any rendering; variants that differ only in steps, policy or early stop share one set of engines."""
    width, height = size
    baseline_pipe = variant_pipeline(baseline, settings)
    shared = baseline_pipe if _engine_key(candidate) == _engine_key(baseline) else None
    candidate_pipe = variant_pipeline(candidate, settings, engines=shared)
    judge = Judge.packaged()
    if min_psnr_db is None:
        min_psnr_db = settings.quality_guard.min_psnr_db
    result = ABResult(str(baseline), str(candidate), width, height, min_psnr_db, max_adherence_drop=max_adherence_drop)
    variants = ((baseline, baseline_pipe), (candidate, candidate_pipe))
    baseline_images: list[Image.Image] = []
    candidate_images: list[Image.Image] = []
    for prompt in prompts:
        # Read with the baseline's optimizer: what a prompt asks must not depend on the variant.
        asked = prompt_expectations(baseline_pipe, prompt)
        for seed in range(seed_base, seed_base + seeds):
            request = _ab_request(prompt, seed, size, settings)
            (a, steps_a), (b, steps_b) = [_render(pipe, spec, request, on_image) for spec, pipe in variants]
            reading_a, reading_b = judge.read([a, b])
            adherence = asked.adherence(reading_a), asked.adherence(reading_b)
            result.pairs.append(ImagePair(prompt, seed, steps_a, steps_b, psnr_db(a, b), ssim(a, b), *adherence))
            baseline_images.append(a)
            candidate_images.append(b)
    result.frechet_distance = judge_frechet(judge, baseline_images, candidate_images)
    return result


def prompt_expectations(pipe: ImagePipeline, prompt: str) -> PromptExpectations:
    """What `prompt` asks that a portrait can show, as the pipeline's prompt optimizer reads it
    (the reading of `fusionserve judge --prompt`)."""
    optimized = asyncio.run(pipe.optimize_prompt(prompt))
    return expectations(optimized.attributes, prompt)


def _render(
    pipe: ImagePipeline, spec: VariantSpec, request: ImageRequest, on_image: Callable[[], None] | None
) -> tuple[Image.Image, int]:
    """`spec`'s image of `request` and the step controller's choice of steps (before any early stop)."""
    generated = asyncio.run(pipe.generate(replace(request, num_inference_steps=spec.steps)))
    if on_image:
        on_image()
    return Image.open(io.BytesIO(generated.images_png[0])).convert("RGB"), generated.steps.steps


def _ab_request(prompt: str, seed: int, size: tuple[int, int], settings: AppSettings) -> ImageRequest:
    width, height = size
    return ImageRequest(
        prompt=prompt,
        negative_prompt="",
        width=width,
        height=height,
        n=1,
        seed=seed,
        guidance_scale=settings.default_guidance_scale,
        num_inference_steps=None,
    )


def judge_frechet(judge: Judge, baseline: list[Image.Image], candidate: list[Image.Image]) -> float | None:
    """Fréchet distance on judge features between two sets of images; None when either side has
    fewer than 2 (no covariance to fit)."""
    if min(len(baseline), len(candidate)) < 2:
        return None
    # Floating-point error can leave identical sets a hair below zero.
    return max(0.0, frechet_distance(judge.embed(baseline), judge.embed(candidate)))
