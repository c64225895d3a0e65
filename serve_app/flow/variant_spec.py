"""An A/B variant, from `key=value,...` text: what `fusionserve ab-test` and the quality guard
compare. Torch-free, so the CLI can list its keys in `--help` without loading torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployments.denoiser.settings import BackendName, Precision
from serve_app.config import StepCount, StepPolicy


class VariantSpec(BaseModel):
    """One side of an A/B test, from `key=value,...` text (`VariantSpec.parse`).

    Backend, precision and encoder cache are pinned (defaults: torch fp32, the reference;
    cache on); model, policy and early stop default to the config's (None)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: BackendName = "torch"  # the Denoiser's own names (BackendSpec)
    precision: Precision = "fp32"
    model: str | None = Field(None, description="preset or model folder (e.g. a prune-unet variant)")
    steps: StepCount | None = Field(None, description="explicit steps; None: the step policy decides")
    policy: StepPolicy | None = None
    encoder_cache: Literal["on", "off"] = "on"
    early_stop: float | Literal["off"] | None = None

    @field_validator("early_stop", mode="before")
    @classmethod
    def _threshold_or_off(cls, value):
        if value is None or value == "off":
            return value
        try:
            threshold = float(value)
        except (TypeError, ValueError):
            raise ValueError("must be a threshold between 0 and 1 or 'off'") from None
        if not 0.0 < threshold < 1.0:
            raise ValueError("must be a threshold between 0 and 1 (exclusive) or 'off'")
        return threshold

    @classmethod
    def parse(cls, text: str) -> VariantSpec:
        """`backend=onnxruntime,precision=int8,steps=30`; '' or 'default': all defaults.
        Raises ValueError naming the key at fault."""
        text = text.strip()
        if text in ("", "default"):
            return cls()
        values: dict[str, str] = {}
        for item in text.split(","):
            key, equals, value = (part.strip() for part in item.partition("="))
            if not equals or not key or not value:
                raise ValueError(f"variant spec {text!r}: {item.strip()!r} is not key=value")
            if key not in cls.model_fields:
                raise ValueError(f"variant spec {text!r}: unknown key {key!r} (keys: {', '.join(cls.model_fields)})")
            if key in values:
                raise ValueError(f"variant spec {text!r}: {key!r} given twice")
            values[key] = value
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            key = str(error["loc"][0])
            message = error["msg"].removeprefix("Value error, ")
            raise ValueError(f"variant spec {text!r}: {key}={values[key]!r}: {message}") from None

    def __str__(self) -> str:
        given = self.model_dump(exclude_defaults=True)
        return ",".join(f"{key}={value}" for key, value in given.items()) or "default"
