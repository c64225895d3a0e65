"""Decoded pixels to bytes, the same arithmetic for every stage that makes pictures (the VAE
codec's final images, the previewer's partial ones)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats -> NHWC uint8, with diffusers' VaeImageProcessor arithmetic."""
    images = (decoded / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return (images * 255).round().astype("uint8")


def encode_png(pixels: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes (`compress_level`: zlib's 0-9; Pillow's default 6 for final images)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
