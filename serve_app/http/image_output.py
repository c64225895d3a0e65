"""The answer's image encoding: `output_format` png | jpeg | webp with `output_compression`.

The pipeline always makes PNGs (lossless: the quality guard compares them and the CLI writes
them); the ingress re-encodes them only when a request asks for another format, so a PNG
answer is the pipeline's bytes exactly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

from PIL import Image

OutputFormat = Literal["png", "jpeg", "webp"]
PILLOW_FORMATS: dict[OutputFormat, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class ImageOutput:
    format: OutputFormat = "png"
    compression: int = 100  # jpeg/webp: Pillow's `quality`, 0-100 (100: least loss)


def encode_image(png: bytes, output: ImageOutput) -> bytes:
    """One of the pipeline's PNGs in `output`'s format (blocking: run it in a thread)."""
    if output.format == "png":
        return png
    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format=PILLOW_FORMATS[output.format], quality=output.compression)
    return buffer.getvalue()
