"""Typed settings of the application (the `args` of serve_config.yaml)."""

from __future__ import annotations

import os

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.denoiser import DenoiserSettings
from deployments.text_encoder import TextEncoderSettings


class Limits(BaseModel):
    """What the API accepts; requests outside get a 400 naming the parameter."""

    model_config = ConfigDict(extra="forbid")

    min_side: int = Field(64, ge=8)
    max_side: int = Field(1024, ge=64)
    max_images: int = Field(4, ge=1, le=16)
    max_prompt_chars: int = Field(4000, ge=1)
    max_steps: int = Field(150, ge=1)


class PromptSettings(BaseModel):
    """The prompt optimizer: per-namespace templates put first so prompts share a prefix."""

    model_config = ConfigDict(extra="forbid")

    templates: dict[str, str] = Field(default_factory=lambda: {
        "studio-portrait": "portrait photo, front view, head and shoulders, soft studio lighting, plain grey background",
    })
    default_style: str = "photorealistic"


class StepSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_steps: int = Field(20, ge=1, le=150)


class AppSettings(BaseModel):
    """Everything `build_app` needs. Defaults are the laptop defaults."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description="preset name (tiny, sd15) or path to a diffusers SD 1.x folder")
    num_threads: int | None = Field(None, ge=1, description="torch threads per replica; default: all cores")
    stage_threads: dict[Literal["TextEncoder", "Denoiser", "VaeCodec"], Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="per-stage torch threads, overriding num_threads")
    default_size: str = "512x512"
    default_guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    limits: Limits = Limits()
    steps: StepSettings = StepSettings()
    prompt: PromptSettings = PromptSettings()
    text_encoder: TextEncoderSettings = TextEncoderSettings()
    denoiser: DenoiserSettings = DenoiserSettings()

    def threads_for(self, stage: str) -> int | None:
        return self.stage_threads.get(stage, self.num_threads)

    @field_validator("default_size")
    @classmethod
    def _size_is_valid(cls, value: str) -> str:
        parse_size(value)
        return value


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
