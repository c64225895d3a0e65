"""Live A/B: judge the served variant against the baseline on real traffic.

A sampled request is rendered a second time by the baseline (full-precision UNet; the same
steps or `baseline_steps`) as a background job of the denoiser, which runs only when no
user's job runs or waits. Each comparison adds to two rolling windows: the PSNR of the served
image against the baseline's, and (when the prompt asks something drawable) the judge's
adherence of both images. The guard trips on either rule of issue 18, each judged once its
window holds `min_samples`:
- PSNR: the rolling mean PSNR is under `min_psnr_db`;
- adherence: the rolling baseline adherence is more than `max_adherence_drop` (2 points) over
  the rolling served adherence.
Once tripped, this ingress serves the baseline variant from then on, logs why and stops shadowing.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import statistics
from dataclasses import dataclass

from serve_app.config import QualityGuardSettings

logger = logging.getLogger("ray.serve")

IDENTICAL_DB = 100.0  # what an identical image (infinite PSNR) counts as in the rolling mean
# Shares like 0.75 - 0.73 come out as 0.02000000000000002: a drop of exactly the limit passes.
_DROP_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Adherence:
    """Share of the prompt's drawable attributes the judge finds in each image of one comparison."""

    served: float
    baseline: float


class LiveQualityGuard:
    def __init__(self, settings: QualityGuardSettings | None = None, rng: random.Random | None = None):
        self.settings = settings or QualityGuardSettings()
        self._rng = rng or random.Random()
        self._window: collections.deque[float] = collections.deque(maxlen=self.settings.window)
        # Only comparisons whose prompt asks something drawable: the rule is not judged on the others.
        self._adherence: collections.deque[Adherence] = collections.deque(maxlen=self.settings.window)
        self.tripped = False
        self.reason = ""
        self.comparisons = 0

    def should_shadow(self) -> bool:
        return (
            not self.tripped
            and self.settings.shadow_fraction > 0
            and self._rng.random() < self.settings.shadow_fraction
        )

    @property
    def rolling_psnr_db(self) -> float | None:
        return statistics.fmean(self._window) if self._window else None

    @property
    def rolling_served_adherence(self) -> float | None:
        return statistics.fmean(a.served for a in self._adherence) if self._adherence else None

    @property
    def rolling_baseline_adherence(self) -> float | None:
        return statistics.fmean(a.baseline for a in self._adherence) if self._adherence else None

    @property
    def rolling_adherence_drop(self) -> float | None:
        """Baseline minus served rolling adherence (negative: the served variant draws more of what
        was asked); None before any comparison with drawable attributes."""
        served, baseline = self.rolling_served_adherence, self.rolling_baseline_adherence
        return None if served is None or baseline is None else baseline - served

    def record(self, psnr_db: float, adherence: Adherence | None = None) -> bool:
        """Add one comparison (`adherence` None: the prompt asks nothing drawable); True when this
        one trips the guard."""
        self.comparisons += 1
        self._window.append(IDENTICAL_DB if math.isinf(psnr_db) else min(psnr_db, IDENTICAL_DB))
        if adherence is not None:
            self._adherence.append(adherence)
        if self.tripped:
            return False
        reason = self._psnr_failure() or self._adherence_failure()
        if reason is None:
            return False
        self.tripped = True
        self.reason = f"{reason}: serving the baseline variant from now on"
        logger.warning("quality guard: %s", self.reason)
        return True

    def _psnr_failure(self) -> str | None:
        rolling = self.rolling_psnr_db
        if rolling is None or len(self._window) < self.settings.min_samples or rolling >= self.settings.min_psnr_db:
            return None
        return (
            f"rolling PSNR {rolling:.1f} dB over the last {len(self._window)} shadow renders is under "
            f"{self.settings.min_psnr_db:g} dB"
        )

    def _adherence_failure(self) -> str | None:
        served, baseline = self.rolling_served_adherence, self.rolling_baseline_adherence
        limit = self.settings.max_adherence_drop
        if served is None or baseline is None or len(self._adherence) < self.settings.min_samples:
            return None
        if baseline - served <= limit + _DROP_TOLERANCE:
            return None
        return (
            f"rolling adherence {served:.1%} over the last {len(self._adherence)} shadow renders with drawable "
            f"attributes is {(baseline - served) * 100:.1f} points under the baseline's {baseline:.1%} "
            f"(at most {limit * 100:g} points allowed)"
        )
