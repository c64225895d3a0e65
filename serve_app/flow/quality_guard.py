"""Live A/B: judge the served variant against the baseline on real traffic.

A sampled request is rendered a second time by the baseline (full-precision UNet; the same
steps or `baseline_steps`) as a background job of the denoiser, which runs only when no
user's job runs or waits. The PSNR of the served image against the baseline's goes into a
rolling window; once it holds `min_samples` and its mean is under `min_psnr_db`, the guard
trips: from then on this ingress serves the baseline variant, logs why and stops shadowing.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import statistics

from serve_app.config import QualityGuardSettings

logger = logging.getLogger("ray.serve")

IDENTICAL_DB = 100.0  # what an identical image (infinite PSNR) counts as in the rolling mean


class LiveQualityGuard:
    def __init__(self, settings: QualityGuardSettings | None = None, rng: random.Random | None = None):
        self.settings = settings or QualityGuardSettings()
        self._rng = rng or random.Random()
        self._window: collections.deque[float] = collections.deque(maxlen=self.settings.window)
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

    def record(self, psnr_db: float) -> bool:
        """Add one comparison; True when this one trips the guard."""
        self.comparisons += 1
        self._window.append(IDENTICAL_DB if math.isinf(psnr_db) else min(psnr_db, IDENTICAL_DB))
        rolling = statistics.fmean(self._window)
        if self.tripped or len(self._window) < self.settings.min_samples or rolling >= self.settings.min_psnr_db:
            return False
        self.tripped = True
        self.reason = (
            f"rolling PSNR {rolling:.1f} dB over the last {len(self._window)} shadow renders is under "
            f"{self.settings.min_psnr_db:g} dB: serving the baseline variant from now on"
        )
        logger.warning("quality guard: %s", self.reason)
        return True
