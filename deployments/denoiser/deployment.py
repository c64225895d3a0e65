"""The Denoiser as a Ray Serve deployment: the engine, its live load and its metrics.

Ray is imported when the deployment is built, not with this module: Ray Serve reads its
environment (serve_app.config.RAY_ENVIRONMENT) when it is first imported.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import torch

from deployments.denoiser.engine import DenoiseJob, DenoiserEngine, DenoiserSettings, DenoiseUpdate
from deployments.denoiser.step_batcher import LoadSnapshot

METRICS_INTERVAL_S = 1.0


def build_deployment() -> Any:
    from ray import serve

    from deployments.denoiser.metrics import DenoiserMetrics

    @serve.deployment(name="Denoiser", ray_actor_options={"num_cpus": 1})
    class Denoiser:
        def __init__(
            self,
            model_path: str,
            num_threads: int | None = None,
            settings: DenoiserSettings | dict[str, Any] | None = None,
        ):
            self.engine = DenoiserEngine(Path(model_path), num_threads, settings)
            self.metrics = DenoiserMetrics()
            self._export: asyncio.Task | None = None

        async def denoise(self, job: DenoiseJob) -> torch.Tensor:
            self._start_metrics()
            return await self.engine.denoise_async(job)

        async def denoise_stream(self, job: DenoiseJob) -> AsyncGenerator[DenoiseUpdate]:
            """The job's previews, then its final latents (call with handle.options(stream=True))."""
            self._start_metrics()
            async for update in self.engine.denoise_stream(job):
                yield update

        def _start_metrics(self) -> None:
            if self._export is None:  # the replica's event loop runs by now
                self._export = asyncio.get_running_loop().create_task(self._export_metrics())

        def load(self) -> LoadSnapshot:
            """Live figures for the step controller and autoscaling."""
            return self.engine.load()

        async def record_autoscaling_stats(self) -> dict[str, float]:
            """Ray Serve calls this every `metrics_interval_s` for custom autoscaling
            policies (deployments/denoiser/autoscaling.py: scale on queued work)."""
            load = self.engine.load()
            return {"queued_work": float(load.queued_work), "jobs": float(load.waiting_jobs + load.active_jobs)}

        async def _export_metrics(self) -> None:
            while True:
                self.metrics.update(self.engine.load())
                await asyncio.sleep(METRICS_INTERVAL_S)

    return Denoiser
