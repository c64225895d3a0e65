"""From a validated body to the flow's `ImageRequest`: the checks that depend on the configured
limits and on the served model, and an edit's uploads decoded and checked.

The server and the CLI (`fusionserve generate`, `edit`, `optimize`, `ab-test`) share these,
so a request the CLI accepts is one the server accepts.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import secrets
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image
from starlette.datastructures import FormData, UploadFile

from deployments.common.vae_scale import VAE_SCALE_FACTOR
from serve_app.config import AppSettings, parse_size
from serve_app.flow.request import ImageRequest, edit_defaults
from serve_app.http import uploads
from serve_app.http.errors import ApiError
from serve_app.http.image_output import ImageOutput, OutputFormat
from serve_app.http.schemas import QUALITY_TIERS, ImageEditForm, ImageOptions

# multipart file field -> the edit input it is (the `openai` client sends `image[]`)
EDIT_FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask", "reference_image": "reference_image"}


@dataclass(frozen=True)
class EditInputs:
    """An edit's decoded uploads and edit-only fields, checked."""

    image: Image.Image  # RGB, the target
    mask: Image.Image | None  # L, white = repaint
    reference_image: Image.Image | None  # RGB, the source face
    strength: float
    keep_unmasked: bool
    reference_scale: float
    default_size: tuple[int, int] | None  # the output size when the form gives none


def check_text(value: str, param: str, settings: AppSettings) -> str:
    """Empty, too long or control characters -> 400 naming `param`."""
    limit = settings.limits.max_prompt_chars
    if param == "prompt" and not value.strip():
        raise ApiError("prompt must not be empty or whitespace only", "prompt", code="empty_prompt")
    if len(value) > limit:
        raise ApiError(f"{param} is {len(value)} characters; the maximum is {limit}", param, code="prompt_too_long")
    bad = next((ch for ch in value if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r"), None)
    if bad is not None:
        raise ApiError(
            f"{param} contains the control character U+{ord(bad):04X}; remove it", param, code="control_character"
        )
    return value


def check_generation_supported(features: Mapping[str, Any]) -> None:
    """`features`: what the model folder has (`loading.features`)."""
    if features.get("inpainting_unet"):
        raise ApiError(
            "this model has an inpainting UNet (9 input channels): it serves edits with a mask "
            "(POST /v1/images/edits with image and mask), not generations",
            code="unsupported_model",
        )


def check_feature_caching_supported(body: ImageOptions, features: Mapping[str, Any]) -> None:
    """A cache branch the model's UNet has (`features["max_cache_branch_id"]`, from its depth)."""
    deepest = features.get("max_cache_branch_id", 0)
    if body.cache_branch_id is not None and body.cache_branch_id > deepest:
        raise ApiError(f"cache_branch_id must be between 0 and {deepest} for this model's UNet", "cache_branch_id")


def image_output(body: ImageOptions) -> ImageOutput:
    """How the answer's images are encoded. Refused: a transparent background (the model
    draws opaque images) and output_compression for PNG (lossless: nothing to set)."""
    if body.background == "transparent":
        raise ApiError(
            "background 'transparent' is not available: the model draws opaque images only (send 'opaque' or 'auto')",
            "background",
            code="unsupported_value",
        )
    output_format: OutputFormat = body.output_format or "png"
    if body.output_compression is not None and output_format == "png":
        raise ApiError(
            "output_compression applies to output_format jpeg and webp only; PNG is lossless",
            "output_compression",
            code="unsupported_parameter",
        )
    return ImageOutput(output_format, 100 if body.output_compression is None else body.output_compression)


def to_image_request(body: ImageOptions, settings: AppSettings, edit: EditInputs | None = None) -> ImageRequest:
    """Checks that depend on the configured limits, then the one internal request type;
    an edit when `edit` is given."""
    limits = settings.limits
    prompt = check_text(body.prompt, "prompt", settings).strip()
    check_text(body.negative_prompt, "negative_prompt", settings)
    if body.n > limits.max_images:
        raise ApiError(f"n must be between 1 and {limits.max_images}, got {body.n}", "n")
    if body.size:
        width, height = checked_size(body.size, settings)
    elif edit is not None and edit.default_size is not None:
        width, height = edit.default_size
    else:
        assert settings.default_size is not None, "build_app sets the model's native size"
        width, height = checked_size(settings.default_size, settings)
    if body.num_inference_steps is not None and body.num_inference_steps > limits.max_steps:
        raise ApiError(f"num_inference_steps must be between 1 and {limits.max_steps}", "num_inference_steps")
    request = ImageRequest(
        prompt=prompt,
        negative_prompt=body.negative_prompt,
        width=width,
        height=height,
        n=body.n,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        guidance_scale=body.guidance_scale if body.guidance_scale is not None else settings.default_guidance_scale,
        num_inference_steps=body.num_inference_steps,
        cache_namespace=body.cache_namespace,
        optimize_prompt=body.optimize_prompt,
        step_policy=body.step_policy,
        deadline_ms=body.deadline_ms,
        quality=QUALITY_TIERS[body.quality] if body.quality else None,
        scheduler=body.scheduler,
        cache_interval=body.cache_interval,
        cache_branch_id=body.cache_branch_id,
    )
    if edit is None:
        return request
    return dataclasses.replace(
        request,
        image=edit.image,
        mask=edit.mask,
        reference_image=edit.reference_image,
        strength=edit.strength,
        keep_unmasked=edit.keep_unmasked,
        reference_scale=edit.reference_scale,
    )


def checked_size(size: str, settings: AppSettings) -> tuple[int, int]:
    limits = settings.limits
    try:
        width, height = parse_size(size)
    except ValueError as exc:
        raise ApiError(str(exc), "size", code="invalid_size") from None
    for side in (width, height):
        if side % VAE_SCALE_FACTOR or not limits.min_side <= side <= limits.max_side:
            raise ApiError(
                f"size {size!r}: width and height must be multiples of {VAE_SCALE_FACTOR} between "
                f"{limits.min_side} and {limits.max_side}",
                "size",
                code="invalid_size",
            )
    return width, height


def split_form(form: FormData, max_bytes: int) -> tuple[dict[str, bytes], dict[str, str]]:
    """(file field -> bytes, text fields) of an edit's multipart form. One file per field; at
    most the 3 known ones."""
    files: dict[str, bytes] = {}
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, str):
            if key in fields:
                raise ApiError(f"{key!r} is given more than once", key, code="duplicate_parameter")
            fields[key] = value
            continue
        name = EDIT_FILE_FIELDS.get(key)
        if name is None:
            raise ApiError(
                f"unknown file field {key!r}; files go in image, mask and reference_image",
                key,
                code="unknown_parameter",
            )
        if name in files:
            raise ApiError(
                f"one file per field: {name!r} was sent more than once (the target is one image; "
                "the source face goes in reference_image)",
                name,
                code="too_many_files",
            )
        files[name] = _read_upload(value, name, max_bytes)
    if "image" not in files:
        raise ApiError(
            "missing required parameter: 'image' (the target image file)", "image", code="missing_required_parameter"
        )
    if "reference_image" in files and "reference_image" in fields:
        raise ApiError(
            "reference_image is given both as a file and as text; send one",
            "reference_image",
            code="duplicate_parameter",
        )
    return files, fields


def _read_upload(upload: UploadFile, name: str, max_bytes: int) -> bytes:
    """At most one byte past the limit: `uploads.decode_image` refuses it with its size."""
    if upload.size is not None and upload.size > max_bytes:
        raise ApiError(f"{name} is {upload.size} bytes; the limit is {max_bytes} bytes", name, code="file_too_large")
    return upload.file.read(max_bytes + 1)


def decoded_edit_inputs(
    files: Mapping[str, bytes], form: ImageEditForm, settings: AppSettings, features: Mapping[str, Any]
) -> EditInputs:
    """Decode and check the uploads (served: on a worker thread, decoding is CPU work).
    `features`: the model's (`loading.features`)."""
    limits = settings.limits

    def decode(data: bytes, param: str) -> Image.Image:
        return uploads.decode_image(data, param, limits.max_upload_bytes, limits.max_image_pixels)

    try:
        target = decode(files["image"], "image")
        mask = (
            uploads.as_mask(decode(files["mask"], "mask"), target.size)
            if "mask" in files
            else uploads.transparency_mask(target)  # OpenAI: without a mask, transparent pixels are edited
        )
        reference_bytes = files.get("reference_image")
        if reference_bytes is None and form.reference_image is not None:
            reference_bytes = _base64_image(form.reference_image)
        reference = None
        if reference_bytes is not None:
            if not features.get("image_prompt_adapter"):
                raise ApiError(
                    "this model has no image-prompt adapter, so reference_image cannot be used "
                    "(it needs image_encoder/, feature_extractor/ and ip_adapter/ in the model folder)",
                    "reference_image",
                    code="unsupported_parameter",
                )
            reference = uploads.as_rgb(decode(reference_bytes, "reference_image"))
        width, height = target.size
        default_size = None if form.size else uploads.default_edit_size(width, height, limits.min_side, limits.max_side)
    except uploads.UploadError as error:
        raise ApiError(error.message, error.param, code=error.code) from None
    if mask is None and features.get("inpainting_unet"):
        raise ApiError(
            "this model has an inpainting UNet (9 input channels): send a mask (white or transparent = repaint)",
            "mask",
            code="missing_required_parameter",
        )
    defaults = edit_defaults(masked=mask is not None)
    strength = form.strength if form.strength is not None else defaults.strength
    if form.num_inference_steps is not None and int(form.num_inference_steps * strength) < 1:
        raise ApiError(
            f"strength {strength} x num_inference_steps {form.num_inference_steps} runs no step; raise either",
            "strength",
            code="invalid_value",
        )
    return EditInputs(
        image=uploads.as_rgb(target),
        mask=mask,
        reference_image=reference,
        strength=strength,
        keep_unmasked=form.keep_unmasked,
        reference_scale=form.reference_scale if form.reference_scale is not None else defaults.reference_scale,
        default_size=default_size,
    )


def _base64_image(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            "reference_image as text must be base64 (or a data: URL) of a PNG, JPEG or WebP image",
            "reference_image",
            code="invalid_image",
        ) from None
