"""HTTP routes and schemas: the OpenAI-compatible Images API.

The FastAPI app is module-level. Ray Serve ships a copy of it to the ingress replica,
so the pipeline is not kept on `app.state` (that would be the copy's) but installed
with `install()` into this module, which the replica process imports by reference.
Every error leaves as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import __version__
from serve_app.config import AppSettings, QualityTier, StepPolicy, parse_size
from serve_app.flow.request import ImageRequest

MAX_SEED = 2**63 - 1
NAMESPACE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAMESPACE_HELP = "Cache namespace (tenant or template id); its configured template is put first."
logger = logging.getLogger("ray.serve")


class ApiError(Exception):
    """A request we refuse, with the parameter to fix."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status_code: int = 400,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.code = code
        self.error_type = error_type

    def response(self) -> JSONResponse:
        return error_response(self.status_code, self.message, self.param, self.code, self.error_type)


def error_response(
    status_code: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    error_type: str = "invalid_request_error",
) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status_code)


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


EDIT_FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask", "reference_image": "reference_image"}


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


def to_image_request(body: ImageOptions, settings: AppSettings, **edit) -> ImageRequest:
    """Checks that depend on the configured limits, then the one internal request type.
    `edit`: the edit's fields (image, mask, reference_image, strength, keep_unmasked, and
    its default width/height when `size` is not given)."""
    limits = settings.limits
    prompt = check_text(body.prompt, "prompt", settings).strip()
    check_text(body.negative_prompt, "negative_prompt", settings)
    if body.n > limits.max_images:
        raise ApiError(f"n must be between 1 and {limits.max_images}, got {body.n}", "n")
    default_size = edit.pop("default_size", None)
    width, height = (
        _checked_size(body.size, settings)
        if body.size
        else (default_size or _checked_size(settings.default_size, settings))
    )
    if body.num_inference_steps is not None and body.num_inference_steps > limits.max_steps:
        raise ApiError(f"num_inference_steps must be between 1 and {limits.max_steps}", "num_inference_steps")
    return ImageRequest(
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
        quality=body.quality,
        **edit,
    )


def _checked_size(size: str, settings: AppSettings) -> tuple[int, int]:
    limits = settings.limits
    try:
        width, height = parse_size(size)
    except ValueError as exc:
        raise ApiError(str(exc), "size", code="invalid_size") from None
    for side in (width, height):
        if side % 8 or not limits.min_side <= side <= limits.max_side:
            raise ApiError(
                f"size {size!r}: width and height must be multiples of 8 between "
                f"{limits.min_side} and {limits.max_side}",
                "size",
                code="invalid_size",
            )
    return width, height


@dataclass
class ServingState:
    pipeline: Any = None  # an ImagePipeline
    settings: AppSettings = field(default_factory=AppSettings)
    model_id: str = ""
    features: dict = field(default_factory=dict)  # what the model folder has, e.g. image_prompt_adapter


_serving = ServingState()


def install(pipeline: Any, settings: AppSettings, model_id: str, features: dict | None = None) -> None:
    """Make this process's routes serve `pipeline` (called by the ingress constructor)."""
    _serving.pipeline, _serving.settings, _serving.model_id = pipeline, settings, model_id
    _serving.features = features or {}


app = FastAPI(
    title="fusionserve",
    version=__version__,
    description="Portrait generation and face-fusion edits, OpenAI Images API compatible.",
)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error_response(exc.errors())


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, str(exc.detail), error_type=error_type)


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The client gets the error's kind; the traceback goes to the ingress replica's log.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", error_type="server_error")


def validation_error_response(errors: list[dict]) -> JSONResponse:
    """FastAPI/pydantic validation errors -> one 400 naming the first bad parameter."""
    first = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
        return error_response(400, message, None, "invalid_json")
    if kind in ("model_attributes_type", "dict_type", "model_type") and param is None:
        return error_response(400, "the request body must be a JSON object", None, "invalid_body")
    if kind == "missing" and param is None:
        return error_response(400, "the request body is empty: send a JSON object", None, "invalid_body")
    if kind == "missing":
        return error_response(400, f"missing required parameter: {param!r}", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return error_response(400, f"unknown parameter: {param!r}", param, "unknown_parameter")
    if kind == "literal_error" and param == "response_format":
        return error_response(400, "response_format must be 'b64_json' (URLs are not served)", param, "invalid_value")
    message = f"invalid value for {param!r}: {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid")
    return error_response(400, message, param, "invalid_value")


def ready_pipeline():
    """The installed ImagePipeline, or a 503 while the ingress has not installed one."""
    if _serving.pipeline is None:
        raise ApiError("the pipeline is not ready", status_code=503, error_type="server_error")
    return _serving.pipeline


@app.get("/healthz")
async def healthz() -> dict:
    ready_pipeline()
    return {"status": "ok", "model": _serving.model_id}


@app.get("/v1/models")
async def list_models() -> dict:
    """OpenAI `GET /v1/models`: the one model this server runs (`client.models.list()`)."""
    ready_pipeline()
    return {
        "object": "list",
        "data": [{"id": _serving.model_id, "object": "model", "created": 0, "owned_by": "fusionserve"}],
    }


def server_timing(stage_ms: dict[str, float]) -> str:
    """W3C Server-Timing header: browsers' dev tools and curl -v show where time went."""
    return ", ".join(f"{stage};dur={ms:.1f}" for stage, ms in stage_ms.items())


def check_generation_supported(features: dict) -> None:
    if features.get("inpainting_unet"):
        raise ApiError(
            "this model has an inpainting UNet (9 input channels): it serves edits with a mask "
            "(POST /v1/images/edits with image and mask), not generations",
            code="unsupported_model",
        )


@app.post("/v1/images/generations")
async def create_image(body: ImageGenerationBody, response: Response) -> dict:
    ready_pipeline()
    check_generation_supported(_serving.features)
    return await images_response(to_image_request(body, _serving.settings), response)


async def images_response(image_request: ImageRequest, response: Response) -> dict:
    result = await ready_pipeline().generate(image_request)
    response.headers["Server-Timing"] = server_timing(result.stage_ms)
    return {
        "created": int(time.time()),
        "data": [
            {
                "b64_json": base64.b64encode(png).decode("ascii"),
                "revised_prompt": result.prompt.prompt,
                "seed": seed,
            }
            for png, seed in zip(result.images_png, result.seeds)
        ],
        "output_format": "png",
        "size": f"{image_request.width}x{image_request.height}",
        "usage": result.usage,
        "warnings": list(result.prompt.warnings),
    }


@app.post("/v1/images/edits")
async def edit_image(request: Request, response: Response) -> dict:
    """OpenAI `images.edit`: multipart with `image` (the target), optional `mask` and
    `reference_image` (the source face), and the generation fields."""
    ready_pipeline()
    settings = _serving.settings
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(
            "send the edit as multipart/form-data (fields image, prompt, optional mask, ...)",
            code="invalid_content_type",
        )
    limits = settings.limits
    length = request.headers.get("content-length", "")
    most = 4 * limits.max_upload_bytes + 2**20  # three files, or two and a base64 one, and the fields
    if length.isdigit() and int(length) > most:  # refused before a byte of it is read
        raise ApiError(
            f"the request body is {length} bytes; the limit is {most} (files of at most "
            f"{limits.max_upload_bytes} bytes each)",
            code="request_too_large",
        )
    try:  # text parts can carry a base64 reference image
        form = await request.form(max_files=8, max_fields=64, max_part_size=2 * limits.max_upload_bytes)
    except StarletteHTTPException as error:
        raise ApiError(f"the multipart body could not be read: {error.detail}", code="invalid_multipart") from None
    try:
        files, fields = _split_form(form, limits.max_upload_bytes)
        edit_form = ImageEditForm.model_validate(fields)
    except ValidationError as error:
        return validation_error_response(error.errors())
    finally:
        await form.close()
    edit = await asyncio.to_thread(decoded_edit_inputs, files, edit_form, settings, _serving.features)
    return await images_response(to_image_request(edit_form, settings, **edit), response)


def _split_form(form, max_bytes: int) -> tuple[dict[str, bytes], dict[str, str]]:
    """(file field -> bytes, text fields). One file per field; at most the 3 known ones."""
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
        if value.size is not None and value.size > max_bytes:
            raise ApiError(f"{name} is {value.size} bytes; the limit is {max_bytes} bytes", name, code="file_too_large")
        files[name] = value.file.read(max_bytes + 1)
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


def decoded_edit_inputs(files: dict[str, bytes], form: ImageEditForm, settings: AppSettings, features: dict) -> dict:
    """Decode and check the uploads (served: on a worker thread, decoding is CPU work);
    the keyword arguments of `to_image_request` for an edit. `features`: the model's."""
    from serve_app.http import uploads

    limits = settings.limits

    def decode(data: bytes, param: str):
        return uploads.decode_image(data, param, limits.max_upload_bytes, limits.max_image_pixels)

    try:
        target = decode(files["image"], "image")
        if "mask" in files:
            mask = uploads.as_mask(decode(files["mask"], "mask"), target.size)
        else:  # OpenAI: without a mask, the target's transparent pixels are the ones to edit
            mask = uploads.transparency_mask(target)
        reference = files.get("reference_image")
        if reference is None and form.reference_image is not None:
            reference = _base64_image(form.reference_image)
        if reference is not None:
            if not features.get("image_prompt_adapter"):
                raise ApiError(
                    "this model has no image-prompt adapter, so reference_image cannot be used "
                    "(it needs image_encoder/, feature_extractor/ and ip_adapter/ in the model folder)",
                    "reference_image",
                    code="unsupported_parameter",
                )
            reference = uploads.as_rgb(decode(reference, "reference_image"))
        default_size = None if form.size else uploads.default_edit_size(*target.size, limits.min_side, limits.max_side)
    except uploads.UploadError as error:
        raise ApiError(error.message, error.param, code=error.code) from None
    if mask is None and features.get("inpainting_unet"):
        raise ApiError(
            "this model has an inpainting UNet (9 input channels): send a mask (white or transparent = repaint)",
            "mask",
            code="missing_required_parameter",
        )
    strength = form.strength if form.strength is not None else (1.0 if mask is not None else 0.8)
    if form.num_inference_steps is not None and int(form.num_inference_steps * strength) < 1:
        raise ApiError(
            f"strength {strength} x num_inference_steps {form.num_inference_steps} runs no step; raise either",
            "strength",
            code="invalid_value",
        )
    return {
        "image": uploads.as_rgb(target),
        "mask": mask,
        "reference_image": reference,
        "strength": strength,
        "keep_unmasked": form.keep_unmasked,
        "reference_scale": form.reference_scale,
        "default_size": default_size,
    }


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


def optimized_prompt_body(prompt) -> dict:
    original, optimized = prompt.original_tokens, prompt.prompt_tokens
    return {
        "prompt": prompt.prompt,
        "negative_prompt": prompt.negative_prompt,
        "attributes": prompt.attributes,
        "original_tokens": original,
        "optimized_tokens": optimized,
        "saved_fraction": round(1 - optimized / original, 4) if original else 0.0,
        "prefix_tokens": prompt.prefix_tokens,
        "cache_namespace": prompt.cache_namespace,
        "warnings": list(prompt.warnings),
    }


@app.post("/v1/prompts/optimize")
async def optimize_prompt(body: PromptOptimizeBody) -> dict:
    check_text(body.prompt, "prompt", _serving.settings)
    check_text(body.negative_prompt, "negative_prompt", _serving.settings)
    prompt = await ready_pipeline().optimize_prompt(body.prompt, body.negative_prompt, body.cache_namespace)
    return optimized_prompt_body(prompt)
