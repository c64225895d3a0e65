"""Offline quality guard: PSNR/SSIM between images, variant specs, the A/B run.

`fusionserve ab-test` renders the same prompts and seeds with a baseline and a candidate
variant (UNet backend and precision, a pruned model, step count or policy, encoder cache,
early stop) in-process and compares each pair of images.

Mean PSNR rule: identical pairs have infinite PSNR and are left out of the mean, which is
taken over the pairs that differ (infinite when none do). So a candidate cannot hide a
bad image behind identical ones: the guard judges only what changed, which is the
conservative choice. Mean SSIM is a plain mean (identical pairs count 1.0).
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
            engines.prompt_optimizer, engines.text_encoder, engines.denoiser, engines.vae_codec, StepController(steps)
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
@dataclass
class ImagePair:
    prompt: str
    seed: int
    baseline_steps: int  # the step controller's choice (before any early stop)
    candidate_steps: int
    psnr_db: float  # inf: identical
    ssim: float


@dataclass
class ABResult:
    baseline: str
    candidate: str
    width: int
    height: int
    min_psnr_db: float
    pairs: list[ImagePair] = field(default_factory=list)

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
    def passed(self) -> bool:
        return self.mean_psnr_db >= self.min_psnr_db

    def to_json(self) -> dict:
        """JSON has no infinity: an identical pair's psnr_db (and an all-identical mean) is null."""

        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        pairs = [
            asdict(p) | {"psnr_db": finite(p.psnr_db), "identical": not math.isfinite(p.psnr_db)} for p in self.pairs
        ]
        return {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "size": f"{self.width}x{self.height}",
            "min_psnr_db": self.min_psnr_db,
            "mean_psnr_db": finite(self.mean_psnr_db),
            "differing": self.differing,
            "mean_ssim": self.mean_ssim,
            "passed": self.passed,
            "pairs": pairs,
        }


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
) -> ABResult:
    """Render every prompt x seed (seed_base .. seed_base + seeds - 1) with both variants and
    compare each pair. `min_psnr_db` None: the live guard's (settings.quality_guard).

    Both pipelines are built first, so a variant that cannot load fails before any rendering;
    variants that differ only in steps, policy or early stop share one set of engines."""
    width, height = size
    baseline_pipe = variant_pipeline(baseline, settings)
    shared = baseline_pipe if _engine_key(candidate) == _engine_key(baseline) else None
    candidate_pipe = variant_pipeline(candidate, settings, engines=shared)
    if min_psnr_db is None:
        min_psnr_db = settings.quality_guard.min_psnr_db
    result = ABResult(str(baseline), str(candidate), width, height, min_psnr_db)
    for prompt in prompts:
        for seed in range(seed_base, seed_base + seeds):
            request = ImageRequest(
                prompt=prompt,
                negative_prompt="",
                width=width,
                height=height,
                n=1,
                seed=seed,
                guidance_scale=settings.default_guidance_scale,
                num_inference_steps=None,
            )
            images = []
            for spec, pipe in ((baseline, baseline_pipe), (candidate, candidate_pipe)):
                images.append(asyncio.run(pipe.generate(replace(request, num_inference_steps=spec.steps))))
                if on_image:
                    on_image()
            a, b = (generated.images_png[0] for generated in images)
            result.pairs.append(
                ImagePair(prompt, seed, images[0].steps.steps, images[1].steps.steps, psnr_db(a, b), ssim(a, b))
            )
    return result
