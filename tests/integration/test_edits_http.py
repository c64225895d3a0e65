"""`POST /v1/images/edits` on the served app: the real `openai` client's `images.edit`,
parity with the in-process pipeline, and every kind of bad upload as a 400 naming its field."""

from __future__ import annotations

import base64
import io
import socket
import struct
import zlib

import numpy as np
import openai
import pytest
from PIL import Image

from serve_app.flow.request import ImageRequest
from tests.conftest import max_pixel_diff, png_bytes, png_pixels, run
from tests.integration.conftest import metric_lines
from tests.unit.test_edit_parity import box_mask, portrait

TARGET = png_bytes(portrait(96, 64, seed=7))
FACE = png_bytes(portrait(64, 64, seed=8))
MASK = png_bytes(box_mask(96, 64))


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120)


def local_edit(local_pipe, **fields) -> bytes:
    request = ImageRequest(
        prompt=fields.pop("prompt"), negative_prompt="", n=1, guidance_scale=7.5, width=96, height=64, **fields
    )
    return run(local_pipe.generate(request)).images_png[0]


def test_openai_client_edit_equals_in_process(client, local_pipe):
    response = client.images.edit(
        image=("target.png", TARGET, "image/png"),
        prompt="portrait of a smiling man",
        extra_body={"seed": 4, "num_inference_steps": 10, "strength": 0.5},
    )
    png = base64.b64decode(response.data[0].b64_json)
    assert png_pixels(png).shape == (64, 96, 3)  # default size: the target's
    assert response.usage.model_extra["denoising_steps"] == 5
    assert response.usage.model_extra["strength"] == 0.5
    ours = local_edit(
        local_pipe,
        prompt="portrait of a smiling man",
        seed=4,
        num_inference_steps=10,
        image=Image.open(io.BytesIO(TARGET)).convert("RGB"),
        strength=0.5,
    )
    assert max_pixel_diff(png, ours) <= 1


def test_mask_keeps_the_target_outside_and_alpha_masks_follow_openai(client, http):
    fields = {"prompt": "portrait", "seed": 2, "num_inference_steps": 8}
    white = http.post("/v1/images/edits", data=fields, files={"image": ("t.png", TARGET), "mask": ("m.png", MASK)})
    assert white.status_code == 200, white.text
    edited = png_pixels(base64.b64decode(white.json()["data"][0]["b64_json"]))
    keep = np.asarray(box_mask(96, 64)) == 0
    target = png_pixels(TARGET)
    assert np.abs(edited - target)[keep].max() == 0
    assert np.abs(edited - target)[~keep].mean() > 10
    # OpenAI's convention: an RGBA mask whose transparent pixels are the ones to edit
    alpha = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    alpha.putalpha(Image.fromarray(np.where(keep, 255, 0).astype(np.uint8)))
    response = client.images.edit(
        image=("t.png", TARGET, "image/png"),
        mask=("m.png", png_bytes(alpha), "image/png"),
        prompt="portrait",
        extra_body={"seed": 2, "num_inference_steps": 8},
    )
    assert base64.b64decode(response.data[0].b64_json) == base64.b64decode(white.json()["data"][0]["b64_json"])
    # ... and, with no mask at all, the target's own transparent pixels
    target_rgba = Image.open(io.BytesIO(TARGET)).convert("RGBA")
    target_rgba.putalpha(Image.fromarray(np.where(keep, 255, 0).astype(np.uint8)))
    response = client.images.edit(
        image=("t.png", png_bytes(target_rgba), "image/png"),
        prompt="portrait",
        extra_body={"seed": 2, "num_inference_steps": 8},
    )
    assert base64.b64decode(response.data[0].b64_json) == base64.b64decode(white.json()["data"][0]["b64_json"])


def test_reference_image_as_file_or_base64_and_cached(http, client, local_pipe):
    fields = {"prompt": "portrait of a woman", "seed": 6, "num_inference_steps": 8, "strength": "0.75"}
    first = http.post(
        "/v1/images/edits", data=fields, files={"image": ("t.png", TARGET), "reference_image": ("face.png", FACE)}
    )
    assert first.status_code == 200, first.text
    assert "reference;dur=" in first.headers["server-timing"]
    second = client.images.edit(
        image=("t.png", TARGET, "image/png"),
        prompt="portrait of a woman",
        extra_body={
            "seed": 6,
            "num_inference_steps": 8,
            "strength": 0.75,
            "reference_image": base64.b64encode(FACE).decode(),
        },
    )
    assert base64.b64decode(second.data[0].b64_json) == base64.b64decode(first.json()["data"][0]["b64_json"])
    assert second.usage.model_extra["reference_image_cached"] is True
    ours = local_edit(
        local_pipe,
        prompt="portrait of a woman",
        seed=6,
        num_inference_steps=8,
        strength=0.75,
        image=Image.open(io.BytesIO(TARGET)).convert("RGB"),
        reference_image=Image.open(io.BytesIO(FACE)).convert("RGB"),
    )
    assert max_pixel_diff(base64.b64decode(second.data[0].b64_json), ours) <= 1
    lines, _ = metric_lines("ray_fusionserve_edit_requests", 'reference="cached"')
    assert lines and 'kind="img2img"' in lines[0]


def test_explicit_size_and_large_target_default(http):
    big = png_bytes(portrait(1500, 700, seed=1))  # over max_side 1024: scaled to fit, multiples of 8
    response = http.post(
        "/v1/images/edits",
        data={"prompt": "portrait", "num_inference_steps": "4", "seed": "1"},
        files={"image": ("big.png", big)},
    )
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "1024x472"
    sized = http.post(
        "/v1/images/edits",
        data={"prompt": "portrait", "size": "64x64", "num_inference_steps": "4"},
        files={"image": ("t.png", TARGET)},
    )
    assert sized.status_code == 200, sized.text
    assert png_pixels(base64.b64decode(sized.json()["data"][0]["b64_json"])).shape == (64, 64, 3)


def _png_with_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width x height (a decompression bomb's shape)."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


RGB_MASK = png_bytes(Image.new("RGB", (96, 64), "white"))
BAD_UPLOADS = [
    # (case, form fields, files, param, message fragment)
    ("missing image", {"prompt": "p"}, {"mask": MASK}, "image", "missing required parameter"),
    ("not an image", {"prompt": "p"}, {"image": b"hello, not a picture"}, "image", "not a PNG, JPEG or WebP"),
    ("gif", {"prompt": "p"}, {"image": png_bytes(Image.new("P", (64, 64)), "GIF")}, "image", "not a PNG, JPEG"),
    ("truncated", {"prompt": "p"}, {"image": TARGET[: len(TARGET) // 2]}, "image", "truncated or corrupt"),
    ("empty file", {"prompt": "p"}, {"image": b""}, "image", "empty file"),
    ("decompression bomb", {"prompt": "p"}, {"image": _png_with_size(30000, 30000)}, "image", "decompression bomb"),
    ("too many bytes", {"prompt": "p"}, {"image": b"\x89PNG" + bytes(16 * 2**20)}, "image", "the limit is"),
    ("mask size", {"prompt": "p"}, {"image": TARGET, "mask": png_bytes(box_mask(64, 64))}, "mask", "same size"),
    ("mask rgb", {"prompt": "p"}, {"image": TARGET, "mask": RGB_MASK}, "mask", "single-channel"),
    (
        "corrupt mask",
        {"prompt": "p"},
        {"image": TARGET, "mask": MASK[: len(MASK) // 2]},
        "mask",
        "truncated or corrupt",
    ),
    ("strength zero", {"prompt": "p", "strength": "0"}, {"image": TARGET}, "strength", "greater than 0"),
    ("strength above one", {"prompt": "p", "strength": "1.5"}, {"image": TARGET}, "strength", "less than or equal"),
    ("strength text", {"prompt": "p", "strength": "lots"}, {"image": TARGET}, "strength", "number"),
    (
        "reference scale",
        {"prompt": "p", "reference_scale": "3"},
        {"image": TARGET},
        "reference_scale",
        "less than or equal to 2",
    ),
    (
        "no step runs",
        {"prompt": "p", "strength": "0.05", "num_inference_steps": "10"},
        {"image": TARGET},
        "strength",
        "runs no step",
    ),
    ("unknown field", {"prompt": "p", "colour": "red"}, {"image": TARGET}, "colour", "unknown parameter"),
    ("missing prompt", {}, {"image": TARGET}, "prompt", "missing"),
    ("target too small", {"prompt": "p"}, {"image": png_bytes(Image.new("RGB", (40, 200)))}, "image", "at least"),
    ("bad base64 reference", {"prompt": "p", "reference_image": "%%%"}, {"image": TARGET}, "reference_image", "base64"),
    (
        "corrupt reference",
        {"prompt": "p"},
        {"image": TARGET, "reference_image": b"GIF89a..."},
        "reference_image",
        "not a PNG",
    ),
]


@pytest.mark.parametrize("case,fields,files,param,fragment", BAD_UPLOADS, ids=[case[0] for case in BAD_UPLOADS])
def test_bad_upload_is_a_400_naming_the_field(http, case, fields, files, param, fragment):
    response = http.post("/v1/images/edits", data=fields, files={k: (f"{k}.bin", v) for k, v in files.items()})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_too_many_files_and_not_multipart(http):
    two = [("image", ("a.png", TARGET)), ("image", ("b.png", TARGET))]
    response = http.post("/v1/images/edits", data={"prompt": "p"}, files=two)
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_files"
    unknown = http.post(
        "/v1/images/edits", data={"prompt": "p"}, files={"image": ("a.png", TARGET), "extra": ("b.png", TARGET)}
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "extra"
    # a body declared at 1 GiB is refused from its headers, without sending (or reading) it
    host, port = str(http.base_url.host), int(http.base_url.port)
    with socket.create_connection((host, port), timeout=60) as connection:
        connection.sendall(
            b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )
        reply = b""
        while b"request_too_large" not in reply:
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"request_too_large" in reply, reply[:300]
    as_json = http.post("/v1/images/edits", json={"prompt": "p", "image": "x"})
    assert as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]


def test_openai_client_bad_edit_raises_and_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("t.png", b"not an image", "image/png"), prompt="portrait")
    assert caught.value.body["param"] == "image"
    response = client.images.edit(
        image=("t.png", TARGET, "image/png"), prompt="portrait", extra_body={"num_inference_steps": 4, "seed": 1}
    )
    assert png_pixels(base64.b64decode(response.data[0].b64_json)).shape == (64, 96, 3)
