"""The one percentile definition behind every p50/p95 column of the README's benchmark tables."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def percentile(values: Iterable[float], q: float) -> float:
    """The `q`-th percentile (q in percent, 0-100) with numpy's default linear interpolation
    between the two nearest ranks: of [10, 20, 30, 40], p50 is 25.0 and p95 is 38.5."""
    data = np.asarray(list(values), dtype=float)
    if data.size == 0:
        raise ValueError("percentile of no values")
    return float(np.percentile(data, q))
