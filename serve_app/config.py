"""Typed settings of the application (the `args` of serve_config.yaml)."""

from __future__ import annotations

import os
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.denoiser.settings import DenoiserSettings
from deployments.prompt.settings import PromptSettings
from deployments.text_encoder.settings import TextEncoderSettings

MAX_STEPS = 150  # the most denoising steps any setting may name (and the default request limit)


class Limits(BaseModel):
    """What the API accepts; requests outside get a 400 naming the parameter."""

    model_config = ConfigDict(extra="forbid")

    min_side: int = Field(64, ge=8)
    max_side: int = Field(1024, ge=64)
    max_images: int = Field(4, ge=1, le=16)
    max_prompt_chars: int = Field(4000, ge=1)
    max_steps: int = Field(MAX_STEPS, ge=1)
    # edits: per uploaded file; the pixel limit is checked on the header, before decoding
    max_upload_bytes: int = Field(16 * 2**20, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    request_timeout_s: float = Field(
        290.0,
        gt=0,
        description="a request not answered by then gets 504 and its work is cancelled (a stream: an error "
        "event); keep it under http_options.request_timeout_s, whose proxy timeout answers in its own shape",
    )


StepPolicy = Literal["fixed", "complexity", "slo"]
QualityTier = Literal["fast", "balanced", "best"]
StepCount = Annotated[int, Field(ge=1, le=MAX_STEPS)]
StageName = Literal["TextEncoder", "Denoiser", "VaeCodec"]  # the stages that run torch

# quality tier -> [min, max] steps. Measured on the embedded model (README): 15 steps are
# ~30-33 dB PSNR against 50, 20 steps ~35 dB, 30 steps ~40 dB.
DEFAULT_STEP_RANGES: dict[QualityTier, tuple[int, int]] = {"fast": (15, 20), "balanced": (15, 30), "best": (25, 40)}

# with a measured sampler table (serve_app/flow/sampler_table.py), per tier: how much adherence
# under the table's best the cheapest setting may give up, and how close (PSNR) to the most
# expensive picture it must stay
DEFAULT_MAX_ADHERENCE_DROP: dict[QualityTier, float] = {"fast": 0.03, "balanced": 0.01, "best": 0.0}
DEFAULT_MIN_PSNR_DB: dict[QualityTier, float] = {"fast": 22.0, "balanced": 26.0, "best": 30.0}


class StepSettings(BaseModel):
    """The step controller (serve_config.yaml: args.steps); see serve_app/flow/steps.py."""

    model_config = ConfigDict(extra="forbid")

    policy: StepPolicy = Field("slo", description="fixed | complexity | slo (per request: step_policy)")
    fixed_steps: StepCount = Field(20, description="the `fixed` policy's step count")
    ranges: dict[QualityTier, tuple[StepCount, StepCount]] = Field(default_factory=DEFAULT_STEP_RANGES.copy)
    default_quality: QualityTier = "balanced"
    deadline_ms: float = Field(
        30000.0, gt=0, description="the `slo` policy's latency target unless a request gives deadline_ms"
    )

    sampler_table: str | None = Field(
        "auto",
        description="the measured (sampler, steps, cache interval) table the controller chooses from: auto (the "
        "packaged configs/samplers/*.json measured on the model's UNet weights, whatever the folder's name), a "
        "path, or null (off: the "
        "step ranges above, the model's sampler, no feature caching)",
    )
    max_adherence_drop: dict[QualityTier, float] = Field(
        default_factory=lambda: dict(DEFAULT_MAX_ADHERENCE_DROP),
        description="with a table: the cheapest setting within this much adherence of the table's best",
    )
    min_psnr_db: dict[QualityTier, float] = Field(
        default_factory=lambda: dict(DEFAULT_MIN_PSNR_DB),
        description="with a table: and at least this close (PSNR) to the most expensive picture of the same seed",
    )

    early_stop_threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="convergence early stop (off: null): a job ends once its predicted clean "
        "latent changes by less than this share between steps; measured in README before turning it on",
    )

    @field_validator("ranges")
    @classmethod
    def _ranges_are_ordered(cls, ranges: dict[QualityTier, tuple[int, int]]) -> dict[QualityTier, tuple[int, int]]:
        for tier, (low, high) in ranges.items():
            if low > high:
                raise ValueError(f"steps range of {tier!r}: min {low} > max {high}")
        missing = set(get_args(QualityTier)) - set(ranges)
        if missing:
            raise ValueError(f"steps ranges missing for {sorted(missing)}")
        return ranges


class QualityGuardSettings(BaseModel):
    """Live A/B (serve_config.yaml: args.quality_guard): a share of served requests is also
    rendered by the full-precision baseline in the background; when the rolling PSNR of the
    served images against those stays under `min_psnr_db`, or the judge's rolling adherence of
    the served images falls more than `max_adherence_drop` under the baseline's, the app serves
    the baseline."""

    model_config = ConfigDict(extra="forbid")

    shadow_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of requests shadowed (0: off)")
    baseline_steps: StepCount | None = Field(
        None,
        description="the baseline's steps (null: the same "
        "steps as the served request, so only the UNet variant is judged)",
    )
    min_psnr_db: float = Field(32.0, gt=0)
    max_adherence_drop: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="most the served images' rolling adherence (share of the prompt's drawable attributes "
        "the judge finds) may fall under the baseline's (0.02: 2 points)",
    )
    window: int = Field(
        20,
        ge=1,
        description="rolling means over the last N shadow comparisons (for adherence: N that asked something drawable)",
    )
    min_samples: int = Field(10, ge=1, description="no verdict on fewer comparisons than this")


class ApiKeyLimits(BaseModel):
    """Per-key limits (serve_config.yaml: args.api_key_limits) for keys that name none of their own
    (`fusionserve keys add --requests-per-minute N --max-concurrent N` stores a key's own)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(
        60, ge=1, description="requests admitted per key in any 60 s (null: no limit)"
    )
    max_concurrent: int | None = Field(4, ge=1, description="requests of one key in flight at once (null: no limit)")


class RetrySettings(BaseModel):
    """Stage calls retried after their replica died (serve_app/flow/retry.py)."""

    attempts: int = Field(10, ge=0, description="retries of one stage call after its replica died (0: none)")
    first_backoff_s: float = Field(0.25, gt=0, description="wait before the first retry; doubles after each")
    max_backoff_s: float = Field(2.0, gt=0)
    max_wait_s: float = Field(
        30.0, gt=0, description="how long a request without a deadline may spend waiting for a replica to come back"
    )


class AppSettings(BaseModel):
    """Everything `build_app` needs. Defaults are the laptop defaults."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "portrait", description="trained model (portrait), preset (tiny, sd15) or path to a diffusers SD 1.x folder"
    )
    num_threads: int | None = Field(None, ge=1, description="torch threads per replica; default: all cores")
    stage_threads: dict[StageName, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="per-stage torch threads, overriding num_threads"
    )
    default_size: str | None = Field(
        None, description="WxH of a request that names no size; default: the model's native size"
    )
    default_guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    limits: Limits = Limits()
    steps: StepSettings = StepSettings()
    quality_guard: QualityGuardSettings = QualityGuardSettings()
    prompt: PromptSettings = PromptSettings()
    text_encoder: TextEncoderSettings = TextEncoderSettings()
    denoiser: DenoiserSettings = DenoiserSettings()
    api_keys_file: str | None = Field(
        None,
        description="key file written by `fusionserve keys add`, read by the ingress replica (give an absolute path); "
        "set, every /v1 request needs `Authorization: Bearer KEY`; null: no authentication",
    )
    api_key_limits: ApiKeyLimits = ApiKeyLimits()
    retry: RetrySettings = RetrySettings()
    drain_grace_s: float = Field(
        60.0,
        ge=0,
        description="`fusionserve serve` on SIGTERM/Ctrl-C: new requests get 503 shutting_down at once, requests "
        "in flight get this long to finish before Ray stops",
    )

    def threads_for(self, stage: StageName) -> int | None:
        return self.stage_threads.get(stage, self.num_threads)

    @field_validator("default_size")
    @classmethod
    def _size_is_valid(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    def with_native_size(self, side: int) -> AppSettings:
        """These settings with `default_size` set to the model's native `side` if the config left it out."""
        return self if self.default_size else self.model_copy(update={"default_size": f"{side}x{side}"})


def parse_size(value: str) -> tuple[int, int]:
    """'WxH' -> (width, height); format only, limits are checked by the API."""
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"size must look like '512x512' (WIDTHxHEIGHT), got {value!r}")
    return int(parts[0]), int(parts[1])


# Ray Serve reads these when it is imported, in every Ray process (proxy, controller,
# replicas), so they must be in the environment before Ray starts. Throughput-optimized
# mode runs handle routing and user code on the replica's own event loop and skips
# per-request logging to stderr (logs still go to /tmp/ray/session_latest/logs/serve/):
# measured here, an HTTP request through the five-hop DAG costs ~20 ms less
# (benchmarks/serving_overhead.py). Values already set by the user win.
RAY_ENVIRONMENT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def apply_ray_environment() -> None:
    """Call before importing ray.serve and before starting Ray."""
    for name, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
