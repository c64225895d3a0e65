"""The one request type that flows through the stages. Made and validated at the ingress."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    n: int
    seed: int
    guidance_scale: float
    num_inference_steps: int | None  # None: the step controller decides
    cache_namespace: str = "default"
    optimize_prompt: bool = True
    step_policy: str | None = None  # fixed | complexity | slo; None: deadline_ms given -> slo, else the config's
    deadline_ms: float | None = None  # latency target for the slo policy
    quality: str | None = None  # fast | balanced | best: the step range; None: the config's

    @property
    def seeds(self) -> list[int]:
        """Image i of the request uses seed + i, so n>1 gives distinct, reproducible images."""
        return [self.seed + i for i in range(self.n)]
