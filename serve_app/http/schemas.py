"""Request bodies and response models of the API: what /docs (openapi.json) shows.

Bodies are validated by pydantic before any check of ours (`image_request.py` does the
checks that depend on the configured limits); responses are built from the flow's results
here, so each field of an answer is named in one place.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.denoiser.deep_cache import MAX_CACHE_INTERVAL
from deployments.denoiser.solvers import SolverName
from deployments.prompt.optimizer import OptimizedPrompt
from serve_app.config import QualityTier, StepPolicy
from serve_app.flow.pipeline import GenerationResult
from serve_app.flow.usage import Usage
from serve_app.http.image_output import OutputFormat

MAX_SEED = 2**63 - 1
NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAMESPACE_HELP = "Cache namespace (tenant or template id); its configured template is put first."

# OpenAI's quality names are aliases of our tiers (one field, so nothing to arbitrate); "auto" is
# the configured default tier (steps.default_quality), as leaving `quality` out is: None.
QualityName = Literal["fast", "balanced", "best", "low", "medium", "high", "auto", "standard", "hd"]
QUALITY_TIERS: dict[QualityName, QualityTier | None] = {
    "fast": "fast",
    "balanced": "balanced",
    "best": "best",
    "low": "fast",
    "medium": "balanced",
    "high": "best",
    "auto": None,
    "standard": "balanced",
    "hd": "best",
}
# The tier a request ran at, as OpenAI's response names it.
OPENAI_QUALITY: dict[QualityTier, Literal["low", "medium", "high"]] = {
    "fast": "low",
    "balanced": "medium",
    "best": "high",
}
QUALITY_HELP = (
    "fast | balanced | best: the step range the policies choose in (15-20, 15-30, 25-40 by default). "
    "OpenAI's names are aliases: low=fast, medium=balanced, high=best, standard=balanced, hd=best, "
    "auto=the configured default tier."
)


# --------------------------------------------------------------------------- requests
class ImageOptions(BaseModel):
    """The fields generations and edits share."""

    prompt: str = Field(description="What to draw. Whitespace is normalised; at most `limits.max_prompt_chars`.")
    n: int = Field(1, ge=1, description="Number of images (1 to `limits.max_images`, 4 by default).")
    size: str | None = Field(
        None,
        description="'WIDTHxHEIGHT', sides multiples of 8 within the limits; 'auto' (as leaving it out): "
        "the model's native size, for edits the target's.",
    )
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = Field(None, description="Accepted for OpenAI compatibility; the served model is fixed.")
    user: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    safety_identifier: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    output_format: OutputFormat | None = Field(None, description="png (default) | jpeg | webp: how images are encoded.")
    output_compression: int | None = Field(
        None,
        ge=0,
        le=100,
        description="jpeg and webp only: the encoder's quality, 0-100 (default 100: least loss). "
        "With png it is refused: PNG is lossless.",
    )
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto | opaque (what the model draws); transparent is refused."
    )
    stream: bool | None = Field(
        None,
        description="true: answer text/event-stream: partial_image events as the picture forms, then a "
        "completed event per image.",
    )
    partial_images: int | None = Field(
        None,
        ge=0,
        le=3,
        description="Partial images to stream (0-3, default 0), evenly spaced over the denoising steps; fewer "
        "when the run is short. Without streaming, ignored.",
    )
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
    quality: QualityName | None = Field(None, description=QUALITY_HELP)
    scheduler: SolverName | None = Field(
        None,
        description="The sampler: ddim, dpmpp_2m (DPM-Solver++ 2M), dpmpp_2m_karras (with Karras sigmas) or unipc; "
        "default: the model's own (DDIM for the shipped models). Multistep solvers need fewer steps for the "
        "same picture.",
    )
    cache_interval: int | None = Field(
        None,
        ge=1,
        le=MAX_CACHE_INTERVAL,
        description="Feature caching across steps (DeepCache): the whole UNet runs every this many steps and the "
        "steps between rerun only its outer levels on the deep features kept from the last whole one (1: off). "
        "Default: the step controller's choice.",
    )
    cache_branch_id: int | None = Field(
        None,
        ge=0,
        description="Which deep features a cached step reuses: 0 (default) reruns only the UNet's outermost level, "
        "the cheapest; k reruns the k + 1 outermost levels (at most the model's levels - 2).",
    )

    @field_validator("size")
    @classmethod
    def _auto_is_the_default(cls, size: str | None) -> str | None:
        return None if size == "auto" else size


class ImageGenerationBody(ImageOptions):
    """`POST /v1/images/generations`. Strict types: `"n": "2"` is an error, not a 2."""

    model_config = ConfigDict(extra="forbid", strict=True)

    moderation: Literal["auto", "low"] | None = Field(
        None, description="Accepted for OpenAI compatibility; there is no moderation model."
    )
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")


class ImageEditForm(ImageOptions):
    """`POST /v1/images/edits`, the form fields besides the files. Multipart sends text, so
    numbers and booleans are parsed from it ("2", "0.5", "true")."""

    model_config = ConfigDict(extra="forbid")

    input_fidelity: Literal["high", "low"] | None = Field(
        None,
        description="Accepted for OpenAI compatibility; ignored: `strength` says how much of the target is kept.",
    )
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
    reference_scale: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        description=(
            "How strongly the reference face conditions the image (the IP-Adapter scale; 0.5-0.8 keeps more of "
            "the prompt). Default 1.5 with a mask, else 1.0; 0 ignores the reference (the plain edit)."
        ),
    )


def edit_form_openapi() -> dict[str, object]:
    """The edit's multipart body for the OpenAPI schema (/docs, client generators, schema
    fuzzing): the form fields of ImageEditForm and the files. The handler reads the form itself
    (to refuse an oversized body before reading it), so FastAPI cannot derive this."""
    form = ImageEditForm.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    files = {
        "image": {**binary, "description": "The target (B): PNG, JPEG or WebP; `image[]` is accepted too."},
        "mask": {**binary, "description": "Transparent (alpha 0) or white = may change; the target's size."},
        "reference_image": {
            "anyOf": [binary, {"type": "string"}],
            "description": "The source face (A) as a file, or as base64 text.",
        },
    }
    schema = {**form, "properties": {**form["properties"], **files}, "required": ["image", "prompt"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


class PromptOptimizeBody(BaseModel):
    """`POST /v1/prompts/optimize`: what the optimizer makes of a prompt, without generating."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str = ""
    cache_namespace: str = Field("default", pattern=NAMESPACE_PATTERN, description=NAMESPACE_HELP)


# --------------------------------------------------------------------------- responses
class ImageData(BaseModel):
    b64_json: str = Field(description="The image in `output_format`, base64-encoded.")
    revised_prompt: str = Field(description="The prompt CLIP got (after the prompt optimizer).")
    seed: int = Field(description="This image's seed: the request's seed + its index.")


class ImagesResponse(BaseModel):
    """`POST /v1/images/generations` and `/v1/images/edits`: OpenAI's shape plus `seed`, `usage`
    extensions and `warnings`."""

    created: int = Field(description="Unix time of the answer.")
    background: Literal["opaque"] = Field("opaque", description="The model draws opaque images only.")
    data: list[ImageData]
    output_format: OutputFormat = Field(description="How `data[i].b64_json` is encoded.")
    quality: Literal["low", "medium", "high"] = Field(
        description="The tier the steps were chosen in, by OpenAI's name (fast=low, balanced=medium, best=high)."
    )
    size: str = Field(description="'WIDTHxHEIGHT' of every image.")
    usage: Usage
    warnings: list[str] = Field(description="What the prompt optimizer dropped or could not translate.")

    @classmethod
    def of(
        cls, result: GenerationResult, images: list[bytes], output_format: OutputFormat, tier: QualityTier, size: str
    ) -> ImagesResponse:
        """`images`: the result's images encoded in `output_format`; `tier`: the one the request ran at."""
        return cls(
            created=int(time.time()),
            data=[
                ImageData(
                    b64_json=base64.b64encode(image).decode("ascii"), revised_prompt=result.prompt.prompt, seed=seed
                )
                for image, seed in zip(images, result.seeds)
            ],
            output_format=output_format,
            quality=OPENAI_QUALITY[tier],
            size=size,
            usage=result.usage,
            warnings=list(result.prompt.warnings),
        )


StreamKind = Literal["image_generation", "image_edit"]


class PartialImageEvent(BaseModel):
    """A streamed preview (`event: image_generation.partial_image` or `image_edit.partial_image`):
    the picture as the denoiser predicts it after `steps_done` steps."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    b64_json: str
    partial_image_index: int = Field(description="0, 1, ... per image, in order.")
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    quality: Literal["low", "medium", "high"]
    size: str
    created_at: int
    # Extensions beyond the OpenAI schema.
    image_index: int = Field(description="Which of the request's n images this is a preview of.")
    seed: int
    steps_done: int
    total_steps: int


def server_timing(stage_ms: Mapping[str, float]) -> str:
    """W3C Server-Timing: browsers' dev tools and curl -v show where time went."""
    return ", ".join(f"{stage};dur={ms:.1f}" for stage, ms in stage_ms.items())


class CompletedEvent(BaseModel):
    """The last events of a stream, one per image (`image_generation.completed` or `image_edit.completed`)."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    b64_json: str
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    quality: Literal["low", "medium", "high"]
    size: str
    created_at: int
    usage: Usage
    # Extensions beyond the OpenAI schema.
    image_index: int
    seed: int
    revised_prompt: str
    server_timing: str = Field(
        description="Where the time went, in the Server-Timing header's format (a stream's headers leave before it)."
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
    template_tokens: int = Field(
        description="Of `optimized_tokens`, the namespace template's (put first so the namespace shares a prefix)."
    )
    saved_fraction: float = Field(
        description="1 - (optimized_tokens - template_tokens) / original_tokens: the user's prompt only "
        "(negative: it grew)."
    )
    prefix_tokens: int = Field(description="Leading positions (BOS included) the namespace's prompts share.")
    cache_namespace: str
    warnings: list[str]

    @classmethod
    def of(cls, prompt: OptimizedPrompt) -> OptimizedPromptResponse:
        return cls(
            prompt=prompt.prompt,
            negative_prompt=prompt.negative_prompt,
            attributes=prompt.attribute_text(),
            original_tokens=prompt.original_tokens,
            optimized_tokens=prompt.prompt_tokens,
            template_tokens=prompt.template_tokens,
            saved_fraction=prompt.saved_fraction(),
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
