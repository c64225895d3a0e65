"""HTTP routes: the OpenAI-compatible Images API.

The FastAPI app is module-level. Ray Serve ships a copy of it to the ingress replica,
so the pipeline is not kept on `app.state` (that would be the copy's) but installed
with `install()` into this module, which the replica process imports by reference.
Every error leaves as `{"error": {"message", "type", "param", "code"}}` (errors.py). With
`api_keys_file` set, every route but /healthz, the docs and the playground page needs an API
key (auth.py). `/` is the playground page; `/docs` works offline (playground/).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import __version__
from serve_app.config import AppSettings, Limits, QualityTier
from serve_app.flow.pipeline import DenoiseStarted, ImagePipeline
from serve_app.flow.request import ImageRequest
from serve_app.http import playground
from serve_app.http.auth import ApiKeyGuard, ApiKeyMiddleware
from serve_app.http.drain import DrainMiddleware
from serve_app.http.errors import ERROR_RESPONSES, SERVER_ERROR, ApiError, add_error_handlers
from serve_app.http.image_output import ImageOutput, encode_image
from serve_app.http.image_request import (
    check_feature_caching_supported,
    check_generation_supported,
    check_text,
    decoded_edit_inputs,
    image_output,
    split_form,
    to_image_request,
)
from serve_app.http.schemas import (
    Health,
    ImageEditForm,
    ImageGenerationBody,
    ImageOptions,
    ImagesResponse,
    ModelCard,
    ModelList,
    OptimizedPromptResponse,
    PromptOptimizeBody,
    StreamKind,
    edit_form_openapi,
    server_timing,
)
from serve_app.http.streaming import ImageEventWriter


@dataclass
class ServingState:
    pipeline: ImagePipeline | None = None
    settings: AppSettings = field(default_factory=AppSettings)
    model_id: str = ""
    features: Mapping[str, Any] = field(default_factory=dict)  # what the model folder has, e.g. image_prompt_adapter
    auth: ApiKeyGuard | None = None  # None: no API keys asked


_serving = ServingState()


def install(
    pipeline: ImagePipeline,
    settings: AppSettings,
    model_id: str,
    features: Mapping[str, Any] | None = None,
    on_key_use: Callable[[str, str], None] | None = None,
) -> None:
    """Make this process's routes serve `pipeline` (called by the ingress constructor).
    `on_key_use(key_name, outcome)`: per-key metrics when API keys are on."""
    _serving.pipeline, _serving.settings, _serving.model_id = pipeline, settings, model_id
    _serving.features = features or {}
    keys_file = settings.api_keys_file
    _serving.auth = ApiKeyGuard(Path(keys_file), settings.api_key_limits, record=on_key_use) if keys_file else None


def current_auth() -> ApiKeyGuard | None:
    """The installed key guard (a module function: the middleware of Ray's copy of the app finds
    this process's state through it)."""
    return _serving.auth


app = FastAPI(
    title="fusionserve",
    version=__version__,
    description="Portrait generation and face-fusion edits, OpenAI Images API compatible.",
    docs_url=None,  # FastAPI's own pages load their assets from a CDN; ours are served here (playground)
    redoc_url=None,
)
add_error_handlers(app)
app.add_middleware(ApiKeyMiddleware, guard=current_auth)
app.add_middleware(DrainMiddleware)  # added last, so it runs first: a draining replica refuses before anything
playground.mount_docs(app)
playground.mount_page_assets(app)


def ready_pipeline() -> ImagePipeline:
    """The installed ImagePipeline, or a 503 while the ingress has not installed one."""
    if _serving.pipeline is None:
        raise ApiError("the pipeline is not ready", status_code=503, error_type=SERVER_ERROR)
    return _serving.pipeline


@app.get("/", include_in_schema=False)
async def playground_page(request: Request) -> HTMLResponse:
    """The playground: generate and edit in the browser (serve_app/http/playground/)."""
    return HTMLResponse(playground.render_page(request.scope.get("root_path", ""), playground_config()))


def playground_config() -> playground.PlaygroundConfig:
    settings, limits = _serving.settings, _serving.settings.limits
    return playground.PlaygroundConfig(
        model=_serving.model_id,
        api_keys=_serving.auth is not None,
        default_size=settings.default_size or f"{limits.min_side}x{limits.min_side}",
        min_side=limits.min_side,
        max_side=limits.max_side,
        max_images=limits.max_images,
        max_steps=limits.max_steps,
        default_guidance_scale=settings.default_guidance_scale,
        reference_image=bool(_serving.features.get("image_prompt_adapter")),
        version=__version__,
    )


@app.get("/healthz")
async def healthz() -> Health:
    ready_pipeline()
    return Health(model=_serving.model_id)


@app.get("/v1/models")
async def list_models() -> ModelList:
    """OpenAI `GET /v1/models`: the one model this server runs (`client.models.list()`)."""
    ready_pipeline()
    return ModelList(data=[ModelCard(id=_serving.model_id)])


# /docs: a streamed answer is server-sent events
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "With `stream: true`: partial_image events, then a completed event per image.",
    }
}


@app.post("/v1/images/generations", responses={**ERROR_RESPONSES, **STREAMED})
async def create_image(body: ImageGenerationBody, response: Response) -> ImagesResponse:
    ready_pipeline()
    check_generation_supported(_serving.features)
    check_feature_caching_supported(body, _serving.features)
    output = image_output(body)
    image_request = to_image_request(body, _serving.settings)
    if body.stream:
        return await streamed_response(image_request, body, output, "image_generation")  # type: ignore[return-value]
    return await images_response(image_request, output, response)


def answer_tier(image_request: ImageRequest) -> QualityTier:
    """The tier a request runs at: its own, else the configured default."""
    return image_request.quality or _serving.settings.steps.default_quality


async def streamed_response(
    image_request: ImageRequest, body: ImageOptions, output: ImageOutput, kind: StreamKind
) -> StreamingResponse:
    """`stream: true`: what fails before the denoiser starts is an ordinary error answer;
    after that the answer is events (streaming.py)."""
    events = ready_pipeline().generate_stream(image_request, body.partial_images or 0)
    deadline = asyncio.get_running_loop().time() + _serving.settings.limits.request_timeout_s
    try:
        async with asyncio.timeout_at(deadline):
            started = await anext(events)
    except TimeoutError:
        await events.aclose()
        raise request_timeout() from None
    if not isinstance(started, DenoiseStarted):
        raise RuntimeError(f"the pipeline's stream began with {type(started).__name__}")
    size = f"{image_request.width}x{image_request.height}"
    writer = ImageEventWriter(kind, output, answer_tier(image_request), size, image_request.seeds)
    return StreamingResponse(
        writer.stream(events, deadline, request_timeout()),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # proxies pass events on at once
    )


def request_timeout() -> ApiError:
    limit = _serving.settings.limits.request_timeout_s
    return ApiError(
        f"the request was not done within limits.request_timeout_s ({limit:g} s); its work was cancelled",
        status_code=504,
        code="timeout",
        error_type=SERVER_ERROR,
    )


async def images_response(image_request: ImageRequest, output: ImageOutput, response: Response) -> ImagesResponse:
    try:  # a timeout cancels the awaited stage calls, and with them the denoising job
        async with asyncio.timeout(_serving.settings.limits.request_timeout_s):
            result = await ready_pipeline().generate(image_request)
    except TimeoutError:
        raise request_timeout() from None
    stage_ms = dict(result.stage_ms)
    images = result.images_png
    if output.format != "png":  # CPU work: on a worker thread
        start = time.perf_counter()
        images = await asyncio.to_thread(lambda: [encode_image(png, output) for png in result.images_png])
        stage_ms["transcode"] = (time.perf_counter() - start) * 1000.0
    response.headers["Server-Timing"] = server_timing(stage_ms)
    size = f"{image_request.width}x{image_request.height}"
    return ImagesResponse.of(result, images, output.format, answer_tier(image_request), size)


@app.post("/v1/images/edits", responses={**ERROR_RESPONSES, **STREAMED}, openapi_extra=edit_form_openapi())
async def edit_image(request: Request, response: Response) -> ImagesResponse:
    """OpenAI `images.edit`: multipart with `image` (the target), optional `mask` and
    `reference_image` (the source face), and the generation fields."""
    ready_pipeline()
    settings = _serving.settings
    files, edit_form = await read_edit_form(request, settings.limits)
    output = image_output(edit_form)  # before decoding: a refused field costs no decode
    check_feature_caching_supported(edit_form, _serving.features)
    edit = await asyncio.to_thread(decoded_edit_inputs, files, edit_form, settings, _serving.features)
    image_request = to_image_request(edit_form, settings, edit)
    if edit_form.stream:
        return await streamed_response(image_request, edit_form, output, "image_edit")  # type: ignore[return-value]
    return await images_response(image_request, output, response)


async def read_edit_form(request: Request, limits: Limits) -> tuple[dict[str, bytes], ImageEditForm]:
    """The edit's files (field -> bytes) and its validated form fields; a body too large
    by its headers is refused before a byte of it is read."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(
            "send the edit as multipart/form-data (fields image, prompt, optional mask, ...)",
            code="invalid_content_type",
        )
    length = request.headers.get("content-length", "")
    most = 4 * limits.max_upload_bytes + 2**20  # three files, or two and a base64 one, and the fields
    if length.isdigit() and int(length) > most:
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
        files, fields = split_form(form, limits.max_upload_bytes)
        return files, ImageEditForm.model_validate(fields)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None  # answered as a JSON body's errors are
    finally:
        await form.close()


@app.post("/v1/prompts/optimize", responses=ERROR_RESPONSES)
async def optimize_prompt(body: PromptOptimizeBody) -> OptimizedPromptResponse:
    check_text(body.prompt, "prompt", _serving.settings)
    check_text(body.negative_prompt, "negative_prompt", _serving.settings)
    prompt = await ready_pipeline().optimize_prompt(body.prompt, body.negative_prompt, body.cache_namespace)
    return OptimizedPromptResponse.of(prompt)
