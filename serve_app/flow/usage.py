"""What a generation used: OpenAI Images' `usage` fields plus ours (the step controller's
decision, cache hits, truncation). Made by the pipeline, returned as is by the HTTP layer."""

from __future__ import annotations

from pydantic import BaseModel, Field

from deployments.denoiser.engine import DenoiseJob
from deployments.prompt.optimizer import OptimizedPrompt
from deployments.text_encoder.engine import Encoding
from serve_app.flow.steps import StepDecision


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int = 0
    cached_tokens: int = Field(description="window positions (77 per text) of the prompt the text encoder had cached")
    negative_prompt_cached_tokens: int = Field(description="the same for the negative prompt")


class Usage(BaseModel):
    """The field order is the order of the JSON answer."""

    input_tokens: int = Field(description="CLIP tokens of the prompt CLIP got, without BOS/EOS")
    input_tokens_details: InputTokensDetails
    output_tokens: int = 0
    total_tokens: int
    original_input_tokens: int = Field(description="CLIP tokens of the prompt before the prompt optimizer")
    prefix_tokens: int = Field(description="leading positions (BOS included) the namespace's prompts share")
    template_tokens: int = Field(description="of input_tokens, the namespace template's (not the user's prompt)")
    negative_prompt_tokens: int
    truncated_tokens: int = Field(description="prompt tokens beyond the 77-token window, not seen by CLIP")
    num_inference_steps: int = Field(description="the schedule's length, as the step controller chose it")
    steps_reason: str = Field(description="why: explicit, fixed, complexity, slo, slo:reduced, ..., quality-guard")
    steps_policy: str
    scheduler: str | None = Field(description="the sampler that ran; null: the model's own")
    cache_interval: int = Field(description="feature caching across steps: a whole UNet step every this many (1: off)")
    cache_branch_id: int = Field(description="the deep features cached steps reused (0: the outermost level reran)")
    sampler_reason: str = Field(
        description="why this sampler and cache interval: explicit (the request's), default, table (the cheapest "
        "setting within the tier's adherence in the model's measured table), table:slo (the best that meets the "
        "deadline), table:slo-infeasible, quality-guard (speed-ups off)"
    )
    steps_complexity: float | None = Field(description="the complexity score behind the choice, 0..1")
    deadline_ms: float | None
    deadline_met: bool | None
    predicted_ms: float | None
    elapsed_ms: float = Field(description="ingress to images, as judged against the deadline")
    denoising_steps: int = Field(description="UNet steps run: num_inference_steps, or an edit's strength share")
    strength: float | None = Field(description="an edit's strength; null for a generation")
    reference_image_cached: bool | None = Field(
        description="an edit with a reference image: its embedding came from the cache; null without one"
    )


def usage_of(
    prompt: OptimizedPrompt,
    steps: StepDecision,
    encoding: Encoding,
    total_ms: float,
    job: DenoiseJob,
    reference_cached: bool | None = None,
) -> Usage:
    deadline = steps.deadline_ms
    return Usage(
        input_tokens=prompt.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            text_tokens=prompt.prompt_tokens,
            cached_tokens=encoding.cached_tokens[0],  # [0]: the prompt, [1]: the negative prompt
            negative_prompt_cached_tokens=encoding.cached_tokens[1],
        ),
        total_tokens=prompt.prompt_tokens,
        original_input_tokens=prompt.original_tokens,
        prefix_tokens=prompt.prefix_tokens,
        template_tokens=prompt.template_tokens,
        negative_prompt_tokens=prompt.negative_prompt_tokens,
        truncated_tokens=prompt.truncated_tokens,
        num_inference_steps=steps.steps,
        steps_reason=steps.reason,
        steps_policy=steps.policy,
        scheduler=job.scheduler,
        cache_interval=job.cache_interval,
        cache_branch_id=job.cache_branch_id,
        sampler_reason=steps.sampler_reason,
        steps_complexity=steps.complexity,
        deadline_ms=deadline,
        deadline_met=None if deadline is None else total_ms <= deadline,
        predicted_ms=steps.predicted_ms,
        elapsed_ms=round(total_ms, 1),
        denoising_steps=job.steps_to_run,
        strength=job.strength if job.init_image is not None else None,
        reference_image_cached=reference_cached,
    )
