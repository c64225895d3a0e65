"""Autoscale the Denoiser on queued work, not on request count.

A request's cost is its steps times its latent size: ten 512x512 requests at 30 steps are
~100x the work of ten 64x64 requests at 12 steps, and Serve's default policy (ongoing
requests per replica) cannot tell them apart. Each Denoiser replica reports, through
Ray Serve's `record_autoscaling_stats`, its queued work in latent pixels x steps (waiting
and running jobs; a 512x512 step = 4096) and its number of jobs. This policy sizes the
deployment so that each replica holds at most `target_work_per_replica`, counting the
requests Serve queues at the handles (not yet on a replica) at the mean work of the jobs
the replicas hold. Serve applies min/max replicas and the upscale/downscale delays.

Used from serve_config.yaml / the profiles:

    autoscaling_config:
      policy:
        policy_function: deployments.denoiser.autoscaling:QueuedWorkPolicy
        policy_kwargs: {target_work_per_replica: 1310720}
"""

from __future__ import annotations

import math
from typing import Any

# Two full batches (8 images) of 512x512 at 20 steps: enough queued that a replica never
# idles between batches, little enough that a new request waits at most ~two batches.
DEFAULT_TARGET_WORK = 2 * 8 * 20 * 64 * 64


class QueuedWorkPolicy:
    def __init__(self, target_work_per_replica: float = DEFAULT_TARGET_WORK):
        if target_work_per_replica <= 0:
            raise ValueError("target_work_per_replica must be > 0")
        self.target_work_per_replica = float(target_work_per_replica)

    def __call__(self, ctx: Any) -> tuple[int, dict]:
        """`ctx`: Ray Serve's AutoscalingContext. Returns (desired replicas, policy state)."""
        metrics = ctx.aggregated_metrics or {}
        work_by_replica = metrics.get("queued_work") or {}
        if not work_by_replica:  # no report yet (replicas starting): hold
            return ctx.target_num_replicas, {}
        work = sum(work_by_replica.values())
        jobs = sum((metrics.get("jobs") or {}).values())
        queued_at_handles = float(ctx.total_queued_requests or 0.0)
        if queued_at_handles and jobs:
            work += queued_at_handles * work / jobs
        elif queued_at_handles:  # replicas idle but requests waiting: at least one target's worth each
            work += queued_at_handles * self.target_work_per_replica
        return math.ceil(work / self.target_work_per_replica), {"queued_work": work}
