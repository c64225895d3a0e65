"""Request bodies and response models of the API: what /docs (openapi.json) shows.

Bodies are validated by pydantic before any check of ours (`image_request.py` does the
checks that depend on the configured limits); responses are built from the flow's results
here, so each field of an answer is named in one place.
"""

from __future__ import annotations

import base64
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.prompt.optimizer import OptimizedPrompt
from serve_app.config import QualityTier, StepPolicy
from serve_app.flow.pipeline import GenerationResult
from serve_app.flow.usage import Usage

MAX_SEED = 2**63 - 1
NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAMESPACE_HELP = "Cache namespace (tenant or template id); its configured template is put first."


# --------------------------------------------------------------------------- requests
class ImageOptions(BaseModel):
    """The fields generations and edits share."""

    prompt: str = Field(description="What to draw. Whitespace is normalised; at most `limits.max_prompt_chars`.")
    n: int = Field(1, ge=1, description="Number of images (1 to `limits.max_images`, 4 by default).")
    size: str | None = Field(None, description="'WIDTHxHEIGHT', sides multiples of 8 within the limits.")
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = Field(None, description="Accepted for OpenAI compatibility; the served model is fixed.")
    user: str | None = None
    # Extensions beyond the OpenAI schema.
    negative_prompt: str = ""
    seed: int | None = Field(None, ge=0, le=MAX_SEED - 16, description="Same seed -> same image. Image i uses seed+i.")
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps (1 to `limits.max_steps`).")
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, allow_inf_nan=False)
    optimize_prompt: bool = Field(True, description="Rewrite the prompt into the compact structured form.")
    cache_namespace: str = Field("default", pattern=NAMESPACE_PATTERN, description=NAMESPACE_HELP)
    step_policy: StepPolicy | None = Field(
        None,
        description="fixed | complexity | slo (default: the server's; "
        "slo when deadline_ms is given). num_inference_steps overrides it.",
    )
    deadline_ms: float | None = Field(
        None,
        gt=0,
        le=3_600_000,
        allow_inf_nan=False,
        description="Latency target in ms for the slo policy: the most steps that still meet it.",
    )
    quality: QualityTier | None = Field(
        None,
        description="fast | balanced | best: the step range the policies choose in (15-20, 15-30, 25-40 by default).",
    )


class ImageGenerationBody(ImageOptions):
    """`POST /v1/images/generations`. Strict types: `"n": "2"` is an error, not a 2."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ImageEditForm(ImageOptions):
    """`POST /v1/images/edits`, the form fields besides the files. Multipart sends text, so
    numbers and booleans are parsed from it ("2", "0.5", "true")."""

    model_config = ConfigDict(extra="forbid")

    strength: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=("How much of the target is redrawn: the last strength x steps run. Default 0.8, with a mask 1.0."),
    )
    keep_unmasked: bool = Field(True, description="With a mask: outside it, the output is the target's pixels.")
    reference_image: str | None = Field(
        None,
        description="The source face as base64 (or a data: URL), for "
        "clients that send only image and mask as files; or send it as a file.",
    )
    reference_scale: float = Field(
        1.0,
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        description=(
            "How strongly the reference face conditions the image (the IP-Adapter scale; 0.5-0.8 keeps more of "
            "the prompt)."
        ),
    )


class PromptOptimizeBody(BaseModel):
    """`POST /v1/prompts/optimize`: what the optimizer makes of a prompt, without generating."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str = ""
    cache_namespace: str = Field("default", pattern=NAMESPACE_PATTERN, description=NAMESPACE_HELP)


# --------------------------------------------------------------------------- responses
class ImageData(BaseModel):
    b64_json: str = Field(description="The PNG, base64-encoded.")
    revised_prompt: str = Field(description="The prompt CLIP got (after the prompt optimizer).")
    seed: int = Field(description="This image's seed: the request's seed + its index.")


class ImagesResponse(BaseModel):
    """`POST /v1/images/generations` and `/v1/images/edits`: OpenAI's shape plus `seed`, `usage`
    extensions and `warnings`."""

    created: int = Field(description="Unix time of the answer.")
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: str = Field(description="'WIDTHxHEIGHT' of every image.")
    usage: Usage
    warnings: list[str] = Field(description="What the prompt optimizer dropped or could not translate.")

    @classmethod
    def of(cls, result: GenerationResult, width: int, height: int) -> ImagesResponse:
        return cls(
            created=int(time.time()),
            data=[
                ImageData(
                    b64_json=base64.b64encode(png).decode("ascii"), revised_prompt=result.prompt.prompt, seed=seed
                )
                for png, seed in zip(result.images_png, result.seeds)
            ],
            size=f"{width}x{height}",
            usage=result.usage,
            warnings=list(result.prompt.warnings),
        )


class OptimizedPromptResponse(BaseModel):
    """`POST /v1/prompts/optimize` (and `fusionserve optimize --json`)."""

    prompt: str = Field(description="The compact structured prompt CLIP would get.")
    negative_prompt: str = Field(description="The default negative terms, what was asked away, then the user's.")
    attributes: dict[str, str | list[str]] = Field(
        description="Each recognised key and its value as it appears in the prompt (accessories: a list)."
    )
    original_tokens: int = Field(description="CLIP tokens of the prompt as written.")
    optimized_tokens: int = Field(description="CLIP tokens of `prompt`.")
    saved_fraction: float = Field(description="1 - optimized_tokens / original_tokens (negative: it grew).")
    prefix_tokens: int = Field(description="Leading positions (BOS included) the namespace's prompts share.")
    cache_namespace: str
    warnings: list[str]

    @classmethod
    def of(cls, prompt: OptimizedPrompt) -> OptimizedPromptResponse:
        original, optimized = prompt.original_tokens, prompt.prompt_tokens
        return cls(
            prompt=prompt.prompt,
            negative_prompt=prompt.negative_prompt,
            attributes=prompt.attribute_text(),
            original_tokens=original,
            optimized_tokens=optimized,
            saved_fraction=round(1 - optimized / original, 4) if original else 0.0,
            prefix_tokens=prompt.prefix_tokens,
            cache_namespace=prompt.cache_namespace,
            warnings=list(prompt.warnings),
        )


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "fusionserve"


class ModelList(BaseModel):
    """OpenAI `GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
