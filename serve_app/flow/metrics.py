"""The ingress's view of requests as Ray Serve metrics: steps chosen, deadlines, quality guard, edits."""

from __future__ import annotations

STEP_BUCKETS = [5, 10, 15, 18, 21, 24, 27, 30, 40, 50, 100]


class PipelineMetrics:
    def __init__(self):
        from ray.serve import metrics

        self._steps = metrics.Histogram(
            "fusionserve_steps_chosen",
            description="denoising steps given to a request",
            boundaries=STEP_BUCKETS,
            tag_keys=("policy", "reason"),
        )
        self._judged = metrics.Counter(
            "fusionserve_deadline_requests", description="requests with a latency target", tag_keys=("policy",)
        )
        self._missed = metrics.Counter(
            "fusionserve_deadline_misses",
            description="requests that ended after their latency target",
            tag_keys=("policy",),
        )
        self._rolling_psnr = metrics.Gauge(
            "fusionserve_quality_guard_rolling_psnr_db", description="rolling PSNR of served images vs the baseline's"
        )
        self._adherence_drop = metrics.Gauge(
            "fusionserve_quality_guard_adherence_drop",
            description="rolling judge adherence of the baseline's images minus the served images' (0.02: 2 points)",
        )
        self._comparisons = metrics.Counter(
            "fusionserve_quality_guard_comparisons", description="shadow renders compared with the served image"
        )
        self._tripped = metrics.Gauge(
            "fusionserve_quality_guard_tripped", description="1 once the guard switched to the baseline variant"
        )
        self._tripped.set(0)
        self._edits = metrics.Counter(
            "fusionserve_edit_requests",
            description="edits by kind (img2img, inpaint) "
            "and reference face (none, new: encoded, cached: from the embedding cache)",
            tag_keys=("kind", "reference"),
        )
        self._api_keys = metrics.Counter(
            "fusionserve_api_key_requests",
            description="requests by API key name (never the key; '-': no valid key) and outcome "
            "(accepted, unauthorized, rate_limited)",
            tag_keys=("key", "outcome"),
        )

    def record_request(self, decision, deadline_met: bool | None) -> None:
        self._steps.observe(decision.steps, tags={"policy": decision.policy, "reason": decision.reason})
        if deadline_met is not None:
            self._judged.inc(tags={"policy": decision.policy})
            if not deadline_met:
                self._missed.inc(tags={"policy": decision.policy})

    def record_edit(self, kind: str, reference: str) -> None:
        self._edits.inc(tags={"kind": kind, "reference": reference})

    def record_api_key(self, key_name: str, outcome: str) -> None:
        self._api_keys.inc(tags={"key": key_name, "outcome": outcome})

    def record_shadow(self, guard) -> None:
        self._comparisons.inc()
        if guard.rolling_psnr_db is not None:
            self._rolling_psnr.set(guard.rolling_psnr_db)
        if guard.rolling_adherence_drop is not None:
            self._adherence_drop.set(guard.rolling_adherence_drop)
        self._tripped.set(1 if guard.tripped else 0)
