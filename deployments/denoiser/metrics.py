"""The Denoiser's live load as Ray Serve metrics (Prometheus, so Ray's dashboard)."""

from __future__ import annotations

from deployments.denoiser.step_batcher import LoadSnapshot


class DenoiserMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self._gauges = {
            "waiting_jobs": metrics.Gauge(
                "fusionserve_denoiser_waiting_jobs", description="jobs queued for the step loop"
            ),
            "active_jobs": metrics.Gauge("fusionserve_denoiser_active_jobs", description="jobs in the running batch"),
            "active_images": metrics.Gauge(
                "fusionserve_denoiser_active_images", description="images in the running batch"
            ),
            "queued_steps": metrics.Gauge(
                "fusionserve_denoiser_queued_steps", description="image-steps left, waiting and running jobs"
            ),
            "queued_work": metrics.Gauge(
                "fusionserve_denoiser_queued_work", description="latent pixels x steps left, waiting and running jobs"
            ),
        }
        self._step_ms = metrics.Gauge(
            "fusionserve_denoiser_step_ms",
            description="median ms of one batched UNet forward, by latent size and images in the batch",
            tag_keys=("shape", "occupancy"),  # type: ignore[arg-type]  # ray annotates tag_keys as Tuple[str]
        )
        self._steps = metrics.Counter("fusionserve_denoiser_steps", description="UNet forwards run")
        self._cancelled = metrics.Counter("fusionserve_denoiser_cancelled_jobs", description="jobs whose client left")
        self._fallbacks = metrics.Counter(
            "fusionserve_denoiser_backend_fallbacks", description="UNet backends given up (load or run-time failure)"
        )
        self._last = (0, 0, 0)

    def update(self, load: LoadSnapshot) -> None:
        for name, gauge in self._gauges.items():
            gauge.set(getattr(load, name))
        for shape, by_occupancy in load.step_ms_by_shape.items():
            for occupancy, ms in by_occupancy.items():
                self._step_ms.set(ms, tags={"shape": shape, "occupancy": str(occupancy)})
        steps, cancelled, fallbacks = self._last
        if load.steps_run > steps:
            self._steps.inc(load.steps_run - steps)
        if load.cancelled_jobs > cancelled:
            self._cancelled.inc(load.cancelled_jobs - cancelled)
        if load.backend_fallbacks > fallbacks:
            self._fallbacks.inc(load.backend_fallbacks - fallbacks)
        self._last = (load.steps_run, load.cancelled_jobs, load.backend_fallbacks)
