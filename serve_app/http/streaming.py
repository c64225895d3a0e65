"""`stream: true`: an image request answered as server-sent events, as OpenAI's Images API
streams them. Each partial image is an `image_generation.partial_image` (edits:
`image_edit.partial_image`) event; each final image an `image_generation.completed` event with
the request's usage. A failure once the stream has begun arrives as an `error` event (the
OpenAI client raises it as an APIError), not as a broken connection; a client that goes away
closes the pipeline's stream, which cancels its denoising job.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator

from serve_app.config import QualityTier
from serve_app.flow.pipeline import GenerationResult, PartialImages, StreamEvent
from serve_app.flow.retry import StageUnavailableError
from serve_app.http.errors import SERVER_ERROR, ApiError, ErrorDetail, ErrorResponse, stage_unavailable
from serve_app.http.image_output import ImageOutput, encode_image
from serve_app.http.schemas import OPENAI_QUALITY, CompletedEvent, PartialImageEvent, StreamKind, server_timing

logger = logging.getLogger("ray.serve")


class StreamErrorEvent(ErrorResponse):
    """`event: error`: what failed after the stream began, in the shape of every error answer."""

    type: str = "error"


def server_sent_event(data: PartialImageEvent | CompletedEvent | StreamErrorEvent) -> bytes:
    """One event, named by its `type` (as OpenAI's stream names them)."""
    return f"event: {data.type}\ndata: {data.model_dump_json()}\n\n".encode()


class ImageEventWriter:
    """Turns one request's pipeline events into its server-sent events."""

    def __init__(self, kind: StreamKind, output: ImageOutput, tier: QualityTier, size: str, seeds: list[int]):
        self.kind, self.output, self.size, self.seeds = kind, output, size, seeds
        self.quality = OPENAI_QUALITY[tier]

    async def encoded(self, pngs: list[bytes]) -> list[str]:
        """The pipeline's PNGs in the asked format, base64 (re-encoding on a worker thread)."""
        images = pngs
        if self.output.format != "png":
            images = await asyncio.to_thread(lambda: [encode_image(png, self.output) for png in pngs])
        return [base64.b64encode(image).decode("ascii") for image in images]

    async def partial(self, previews: PartialImages) -> list[bytes]:
        now = int(time.time())
        return [
            server_sent_event(
                PartialImageEvent(
                    type=f"{self.kind}.partial_image",
                    b64_json=b64,
                    partial_image_index=previews.index,
                    output_format=self.output.format,
                    quality=self.quality,
                    size=self.size,
                    created_at=now,
                    image_index=image_index,
                    seed=seed,
                    steps_done=previews.steps_done,
                    total_steps=previews.total_steps,
                ),
            )
            for image_index, (b64, seed) in enumerate(zip(await self.encoded(previews.images_png), self.seeds))
        ]

    async def completed(self, result: GenerationResult) -> list[bytes]:
        now = int(time.time())
        return [
            server_sent_event(
                CompletedEvent(
                    type=f"{self.kind}.completed",
                    b64_json=b64,
                    output_format=self.output.format,
                    quality=self.quality,
                    size=self.size,
                    created_at=now,
                    usage=result.usage,
                    image_index=image_index,
                    seed=seed,
                    revised_prompt=result.prompt.prompt,
                    server_timing=server_timing(result.stage_ms),
                ),
            )
            for image_index, (b64, seed) in enumerate(zip(await self.encoded(result.images_png), result.seeds))
        ]

    @staticmethod
    def error(error: Exception) -> bytes:
        if isinstance(error, StageUnavailableError):
            error = stage_unavailable(error)
        if isinstance(error, ApiError):
            detail = ErrorDetail(message=error.message, type=error.error_type, param=error.param, code=error.code)
        else:
            detail = ErrorDetail(message=f"internal error: {type(error).__name__}", type=SERVER_ERROR)
        return server_sent_event(StreamErrorEvent(error=detail))

    async def stream(
        self, events: AsyncIterator[StreamEvent], deadline: float, timeout: ApiError
    ) -> AsyncIterator[bytes]:
        """Every event of `events` that the client sees, then the end; closes `events` however
        the stream ends (a client that went away cancels the work). Past `deadline` (the event
        loop's clock) the work is cancelled and `timeout` is the last event."""
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(events)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    yield self.error(timeout)
                    break
                if isinstance(event, PartialImages):
                    for chunk in await self.partial(event):
                        yield chunk
                elif isinstance(event, GenerationResult):
                    for chunk in await self.completed(event):
                        yield chunk
        except Exception as error:  # the status line is sent: the failure becomes an event
            logger.exception("streamed image request failed")
            yield self.error(error)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
