"""The step controller's table of settings: for each (sampler, steps, cache interval) measured
on a model, what it costs and what it draws.

`benchmarks/step_savings.py` measures it and writes `configs/samplers/<model>.json`; the step
controller (steps.py) chooses from it, not from guesses. It holds the digest of the UNet it
was measured on: a table is used only for those weights, and found by them (a renamed copy of
a model folder keeps its table).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from deployments.denoiser.deep_cache import MAX_CACHE_INTERVAL
from deployments.denoiser.solvers import SolverName

logger = logging.getLogger(__name__)


class SamplerSetting(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheduler: SolverName
    steps: int = Field(ge=1)
    cache_interval: int = Field(ge=1, le=MAX_CACHE_INTERVAL)
    cache_branch_id: int = Field(0, ge=0)
    # UNet work per image in whole-step equivalents: ms per image at batch 8 over one whole
    # step's ms at batch 8 (a cached step costs a fraction of a whole one)
    step_equivalents: float = Field(gt=0)
    adherence: float = Field(ge=0, le=1)  # on held-out attribute combinations, read by the judge
    psnr_db: float  # against DDIM at 50 steps, uncached, same seed


class SamplerTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    unet_digest: str  # loading.unet_digest of the weights it was measured on
    measured: str  # the command and date that produced it
    settings: list[SamplerSetting] = Field(min_length=1)

    def matching(
        self, scheduler: str | None = None, steps: int | None = None, cache_interval: int | None = None
    ) -> list[SamplerSetting]:
        """The settings that agree with what a request fixed itself."""
        return [
            s
            for s in self.settings
            if (scheduler is None or s.scheduler == scheduler)
            and (steps is None or s.steps == steps)
            and (cache_interval is None or s.cache_interval == cache_interval)
        ]


def acceptable(settings: list[SamplerSetting], max_adherence_drop: float, min_psnr_db: float) -> list[SamplerSetting]:
    """Of `settings`, those within `max_adherence_drop` of the best adherence among them and at
    least `min_psnr_db` from the most expensive picture, cheapest first; the best alone when
    none is both."""
    best = max(s.adherence for s in settings)
    chosen = [s for s in settings if s.adherence >= best - max_adherence_drop - 1e-9 and s.psnr_db >= min_psnr_db]
    if not chosen:
        chosen = [max(settings, key=lambda s: (s.adherence, -s.step_equivalents))]
    return sorted(chosen, key=lambda s: (s.step_equivalents, -s.adherence))


def packaged_tables() -> Path:
    return Path(str(resources.files("fusionserve_configs") / "samplers"))


def packaged_table_path(model: str) -> Path:
    return packaged_tables() / f"{Path(model).name}.json"


def packaged_table_for(model: str, unet_digest: str) -> SamplerTable | None:
    """The packaged table measured on these weights: the one named after `model` first, then
    any other (a copy of a preset's folder under another name keeps its table)."""
    named = packaged_table_path(model)
    others = sorted(p for p in packaged_tables().glob("*.json") if p != named)
    for path in [named, *others] if named.is_file() else others:
        table = SamplerTable.model_validate_json(path.read_text())
        if table.unet_digest == unet_digest:
            return table
    if named.is_file():
        logger.warning("sampler table %s was measured on other UNet weights: not used", named)
    return None


def sampler_table_for(source: str | None, model_path: Path) -> SamplerTable | None:
    """The table `steps.sampler_table` names for the model folder at `model_path`."""
    from deployments.models import loading

    return load_sampler_table(source, model_path.name, loading.unet_digest(model_path))


def load_sampler_table(source: str | None, model: str, unet_digest: str) -> SamplerTable | None:
    """`source`: "auto" (the packaged table measured on these weights, when one ships), a path,
    or None (off). A table measured on other weights is not used (logged)."""
    if source is None:
        return None
    if source == "auto":
        return packaged_table_for(model, unet_digest)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"steps.sampler_table: {path} not found")
    table = SamplerTable.model_validate_json(path.read_text())
    if table.unet_digest != unet_digest:
        logger.warning("sampler table %s was measured on other UNet weights: not used", path)
        return None
    return table
