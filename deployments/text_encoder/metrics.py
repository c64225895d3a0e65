"""The text encoder cache's figures as Ray Serve metrics (Prometheus, so Ray's dashboard).

Exported on Ray's metrics port with the `ray_` prefix, tagged with deployment, replica
and, where it applies, the cache namespace. Counters are fed the difference between two
`TextEncoderEngine.cache_info()` snapshots, so the engine stays free of Ray.
"""

from __future__ import annotations

NAMESPACE_COUNTERS = {
    # cache_info()["namespaces"][ns] field -> (metric name, description)
    "texts": ("fusionserve_encoder_texts", "texts encoded"),
    "exact_hits": ("fusionserve_encoder_exact_hits", "texts whose whole window was cached (no model call)"),
    "prefix_hits": ("fusionserve_encoder_prefix_hits", "texts computed after a cached prefix"),
    "misses": ("fusionserve_encoder_misses", "texts computed from the first position"),
    "window_tokens": ("fusionserve_encoder_window_tokens", "window positions asked for (77 per text)"),
    "cached_tokens": ("fusionserve_encoder_cached_tokens", "window positions served from the cache"),
    "rebuilds": ("fusionserve_encoder_cache_rebuilds", "hit-rate watchdog rebuilds"),
}


class CacheMetrics:
    def __init__(self):
        from ray.serve import metrics

        self._counters = {
            field: metrics.Counter(name, description=description, tag_keys=("namespace",))
            for field, (name, description) in NAMESPACE_COUNTERS.items()
        }
        self._evictions = metrics.Counter("fusionserve_encoder_cache_evictions", description="cache entries evicted")
        self._bytes = metrics.Gauge("fusionserve_encoder_cache_bytes", description="bytes held by the cache")
        self._entries = metrics.Gauge(
            "fusionserve_encoder_cache_entries", description="blocks + whole-window outputs cached"
        )
        self._last: dict = {"namespaces": {}, "evictions": 0}

    def update(self, info: dict) -> None:
        for namespace, stats in info["namespaces"].items():
            before = self._last["namespaces"].get(namespace, {})
            for field, counter in self._counters.items():
                delta = stats[field] - before.get(field, 0)
                if delta > 0:
                    counter.inc(delta, tags={"namespace": namespace})
        if info["evictions"] > self._last["evictions"]:
            self._evictions.inc(info["evictions"] - self._last["evictions"])
        self._bytes.set(info["bytes_in_use"])
        self._entries.set(info["entries"])
        self._last = info
