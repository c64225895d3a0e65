"""Upload checks of the edits endpoint that need no server: mask conventions, the default
output size, and a reference image for a model without an image-prompt adapter."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serve_app.config import AppSettings
from serve_app.http import uploads
from serve_app.http.errors import ApiError
from serve_app.http.image_request import check_generation_supported, decoded_edit_inputs
from serve_app.http.schemas import ImageEditForm
from tests.conftest import png_bytes


def test_alpha_masks_follow_openai_and_grey_masks_diffusers():
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:, 4:] = 255  # right half opaque: kept
    rgba = Image.new("RGBA", (8, 8))
    rgba.putalpha(Image.fromarray(alpha))
    mask = np.asarray(uploads.as_mask(rgba, (8, 8)))
    assert (mask[:, :4] == 255).all() and (mask[:, 4:] == 0).all()  # transparent -> repaint (white)
    grey = Image.fromarray(255 - alpha, "L")
    assert np.array_equal(np.asarray(uploads.as_mask(grey, (8, 8))), mask)
    with pytest.raises(uploads.UploadError, match="single-channel"):
        uploads.as_mask(Image.new("RGB", (8, 8)), (8, 8))


@pytest.mark.parametrize(
    "size,expected",
    [((512, 512), (512, 512)), ((1000, 701), (1000, 696)), ((2048, 1024), (1024, 512)), ((3000, 1000), (1024, 336))],
)
def test_default_edit_size(size, expected):
    assert uploads.default_edit_size(*size, 64, 1024) == expected


def test_reference_image_needs_an_adapter():
    files = {"image": png_bytes(Image.new("RGB", (64, 64))), "reference_image": png_bytes(Image.new("RGB", (64, 64)))}
    form = ImageEditForm(prompt="p")
    with pytest.raises(ApiError) as caught:
        decoded_edit_inputs(files, form, AppSettings(), features={})
    assert caught.value.param == "reference_image"
    assert "this model has no image-prompt adapter" in caught.value.message
    edit = decoded_edit_inputs(files, form, AppSettings(), features={"image_prompt_adapter": True})
    assert edit.reference_image.mode == "RGB" and edit.strength == 0.8


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (64, 32), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert uploads.decode_image(buffer.getvalue(), "image", 2**20, 2**20).size == (32, 64)


def test_an_inpainting_model_needs_a_mask_and_serves_no_generations():
    files = {"image": png_bytes(Image.new("RGB", (64, 64)))}
    with pytest.raises(ApiError) as caught:
        decoded_edit_inputs(files, ImageEditForm(prompt="p"), AppSettings(), features={"inpainting_unet": True})
    assert caught.value.param == "mask" and "inpainting UNet" in caught.value.message
    files["mask"] = png_bytes(Image.new("L", (64, 64), 255))
    edit = decoded_edit_inputs(files, ImageEditForm(prompt="p"), AppSettings(), features={"inpainting_unet": True})
    assert edit.strength == 1.0
    with pytest.raises(ApiError, match="not generations"):
        check_generation_supported({"inpainting_unet": True})
    check_generation_supported({"image_prompt_adapter": True})  # a text-to-image model: no error


def test_transparent_pixels_of_the_target_are_the_mask_without_one():
    opaque = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    assert uploads.transparency_mask(opaque) is None and uploads.transparency_mask(Image.new("RGB", (8, 8))) is None
    holed = opaque.copy()
    holed.putpixel((2, 3), (10, 20, 30, 0))
    mask = np.asarray(uploads.transparency_mask(holed))
    assert mask[3, 2] == 255 and mask.sum() == 255  # that pixel only, white = repaint
    edit = decoded_edit_inputs(
        {"image": png_bytes(holed)}, ImageEditForm(prompt="p", size="64x64"), AppSettings(), features={}
    )
    assert edit.mask is not None and edit.strength == 1.0 and edit.image.mode == "RGB"
