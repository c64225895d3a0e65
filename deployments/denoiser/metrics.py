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
        self._image_steps = metrics.Counter("fusionserve_denoiser_image_steps", description="images stepped")
        self._cached_image_steps = metrics.Counter(
            "fusionserve_denoiser_cached_image_steps",
            description="of the images stepped, those on a cached step (only the UNet's outer levels ran)",
        )
        self._last = (0, 0, 0, 0, 0)

    def update(self, load: LoadSnapshot) -> None:
        for name, gauge in self._gauges.items():
            gauge.set(getattr(load, name))
        for shape, by_occupancy in load.step_ms_by_shape.items():
            for occupancy, ms in by_occupancy.items():
                self._step_ms.set(ms, tags={"shape": shape, "occupancy": str(occupancy)})
        now = (load.steps_run, load.cancelled_jobs, load.backend_fallbacks, load.image_steps, load.cached_image_steps)
        counters = (self._steps, self._cancelled, self._fallbacks, self._image_steps, self._cached_image_steps)
        for counter, before, after in zip(counters, self._last, now):
            if after > before:
                counter.inc(after - before)
        self._last = now
