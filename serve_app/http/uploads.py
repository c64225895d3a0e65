"""Uploaded images of `/v1/images/edits` (and `fusionserve edit`): decoded and checked
before any stage sees them, so a bad file is a 400 naming its field, never a failed replica.

Checks, in order: not empty, at most `limits.max_upload_bytes`; an image Pillow can identify
in an accepted format; at most `limits.max_image_pixels` by its header (a decompression bomb
is refused before it is decoded); decodes completely (not truncated or corrupt). EXIF
orientation is applied, as a viewer shows the photo.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from deployments.common.vae_scale import VAE_SCALE_FACTOR

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
ALPHA_MODES = ("LA", "RGBA", "PA", "La", "RGBa")


class UploadError(ValueError):
    def __init__(self, message: str, param: str, code: str):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def decode_image(data: bytes, param: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes of an uploaded PNG/JPEG/WebP -> a fully decoded, upright PIL image."""
    if not data:
        raise UploadError(f"{param} is an empty file", param, "empty_file")
    if len(data) > max_bytes:
        raise UploadError(f"{param} is {len(data)} bytes; the limit is {max_bytes} bytes", param, "file_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(
            f"{param} has too many pixels (decompression bomb guard); the limit is {max_pixels}",
            param,
            "image_too_large",
        ) from None
    except UnidentifiedImageError:
        raise UploadError(f"{param} is not a PNG, JPEG or WebP image", param, "invalid_image_format") from None
    except Exception as error:  # a header Pillow chokes on
        raise UploadError(f"{param} could not be read as an image ({error})", param, "invalid_image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise UploadError(
            f"{param} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "(decompression bomb guard)",
            param,
            "image_too_large",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            return ImageOps.exif_transpose(image)
    except Exception as error:  # truncated data, corrupt chunks, bad CRCs, ...
        raise UploadError(f"{param} is truncated or corrupt ({error})", param, "invalid_image") from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def _transparent_is_white(image: Image.Image) -> Image.Image:
    """An L mask from the alpha channel: transparent (alpha 0) -> 255 = repaint."""
    return ImageOps.invert(image.convert("RGBA").getchannel("A"))


def as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def as_mask(mask: Image.Image, image_size: tuple[int, int]) -> Image.Image:
    """An uploaded mask -> L, white = repaint. Single-channel masks (L, 1) are taken as they
    are (diffusers' convention); masks with an alpha channel follow OpenAI's: transparent
    (alpha 0) = repaint."""
    if mask.size != image_size:
        raise UploadError(
            f"mask is {mask.width}x{mask.height} but image is {image_size[0]}x{image_size[1]}; "
            "they must be the same size",
            "mask",
            "mask_size_mismatch",
        )
    if mask.mode in ("L", "1"):
        return mask.convert("L")
    if _has_alpha(mask):
        return _transparent_is_white(mask)
    raise UploadError(
        f"mask must be a single-channel image (L: white = repaint) or have an alpha channel "
        f"(transparent = repaint); got mode {mask.mode}",
        "mask",
        "invalid_mask",
    )


def transparency_mask(image: Image.Image) -> Image.Image | None:
    """The mask an image with (some) transparent pixels carries (OpenAI's convention when no
    mask is sent); None when it is fully opaque or has no alpha channel."""
    if not _has_alpha(image):
        return None
    mask = _transparent_is_white(image)
    return mask if mask.getbbox() is not None else None  # all black (fully opaque): nothing to edit


def default_edit_size(width: int, height: int, min_side: int, max_side: int) -> tuple[int, int]:
    """The target's size, scaled down to fit `max_side` if needed, sides rounded down to multiples
    of the VAE scale factor."""
    scale = min(1.0, max_side / max(width, height))
    out_width, out_height = (int(side * scale) // VAE_SCALE_FACTOR * VAE_SCALE_FACTOR for side in (width, height))
    if min(out_width, out_height) < min_side:
        raise UploadError(
            f"image is {width}x{height}; the output would be {out_width}x{out_height}, and each side "
            f"must be at least {min_side} (or pass size)",
            "image",
            "image_too_small",
        )
    return out_width, out_height
