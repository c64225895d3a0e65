"""How many denoising steps a request gets, and why.

The adaptive controller (complexity, load, latency target) is a later issue; today an
explicit `num_inference_steps` wins and everything else gets the configured default.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.request import ImageRequest


@dataclass(frozen=True)
class StepDecision:
    steps: int
    reason: str  # "explicit" | "default"


class StepController:
    def __init__(self, default_steps: int = 20):
        self.default_steps = default_steps

    def choose(self, request: ImageRequest) -> StepDecision:
        if request.num_inference_steps is not None:
            return StepDecision(request.num_inference_steps, "explicit")
        return StepDecision(self.default_steps, "default")
