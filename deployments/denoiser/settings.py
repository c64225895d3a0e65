"""The Denoiser's settings (serve_config.yaml: args.denoiser) and the UNet backend names.

Plain pydantic, no torch: the ingress validates the whole config with these models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BackendName = Literal["torch", "onnxruntime", "tensorrt"]
Precision = Literal["fp32", "bf16", "fp16", "int8"]


class BackendSpec(BaseModel):
    """One link of the chain (serve_config.yaml: args.denoiser.backends[i])."""

    model_config = ConfigDict(extra="forbid")

    backend: BackendName = "torch"
    precision: Precision = "fp32"
    device: Literal["cpu", "cuda"] = Field("cpu", description="torch backend: where the UNet runs")
    channels_last: bool = False
    compile: bool = Field(False, description="torch.compile the UNet (torch backend)")

    @property
    def name(self) -> str:
        extras = "+channels_last" if self.channels_last else ""
        extras += "+compile" if self.compile else ""
        return f"{self.backend}-{self.precision}{extras}"


class DenoiserSettings(BaseModel):
    """The Denoiser stage (serve_config.yaml: args.denoiser)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=64, description="images per UNet forward (x2 rows with guidance)")
    admit_between_steps: bool = Field(True, description="false: request-level batching (for comparison)")
    backends: list[BackendSpec] = Field(
        default_factory=lambda: [BackendSpec()],
        description="UNet backends, first that works wins; a failing one falls back to the next",
    )
    baseline_backends: list[BackendSpec] = Field(
        default_factory=lambda: [BackendSpec()],
        description="the quality guard's full-precision baseline (shadow renders, switch-back); loaded on first use",
    )
    preload_ip_adapter: bool = Field(
        True,
        description="when the model has an image-prompt adapter, load its UNet at start; false: at the "
        "first reference edit, on the step loop (every batch waits for the load)",
    )
