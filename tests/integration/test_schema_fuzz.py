"""Property-based fuzzing of the served app: schemathesis generates requests for every route
from our own OpenAPI schema (valid and invalid bodies, the edit's multipart form included), and
hypothesis builds hostile edit uploads (corrupt and truncated images, odd modes, huge dimensions
declared in a PNG header, masks that do not match). No answer may be a 5xx, and every error is
in the OpenAI error shape. Bounded and derandomized, so CI runs the same examples every time;
what it found is kept in tests/integration/test_bad_input_http.py and test_edits_http.py."""

from __future__ import annotations

import copy
import io
import struct
import zlib

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.specs.openapi.checks import ignored_auth, negative_data_rejection, positive_data_acceptance

from serve_app.http import routes

ERROR_KEYS = {"message", "type", "param", "code"}
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)


# The served app's schema is this FastAPI app's (the ingress serves `routes.app`); loaded here
# rather than from the URL because schemathesis' lazy fixture loader does not run on pytest 9.
schema = schemathesis.openapi.from_dict(copy.deepcopy(routes.app.openapi()))


def without_examples(node):
    """The schema without `example` keys (the served copy gains empty ones on the way)."""
    if isinstance(node, dict):
        return {key: without_examples(value) for key, value in node.items() if key != "example"}
    if isinstance(node, list):
        return [without_examples(value) for value in node]
    return node


def test_the_schema_fuzzed_is_the_one_served(http):
    assert without_examples(http.get("/openapi.json").json()) == without_examples(routes.app.openapi())


def assert_openai_error(response) -> None:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert body["error"]["message"], body


@schema.parametrize()
@FUZZ
def test_no_generated_request_gets_a_5xx_and_errors_are_openai_shaped(case, base_url):
    # Small work only: a valid generated body may ask for 150 steps of several images.
    if isinstance(case.body, dict):
        case.body.setdefault("num_inference_steps", 1)
    response = case.call(base_url=base_url, timeout=120)
    # Every default check but these: generated values the schema cannot express (a size must be
    # WxH within the limits, a prompt within max_prompt_chars) are rightly refused (positive data
    # acceptance); this app has no keys (ignored_auth); a multipart form is all text, which the
    # form parses ("1" is a valid n), so "negative" form data may rightly be accepted.
    excluded = [positive_data_acceptance, ignored_auth]
    if case.path == "/v1/images/edits":
        excluded.append(negative_data_rejection)
    case.validate_response(response, excluded_checks=excluded)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_openai_error(response)


# ---------------------------------------------------------------- hostile edit uploads
MODES = ("RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK", "PA")  # each writable as PNG or JPEG
FORMATS = ("PNG", "JPEG", "WEBP")


def encoded(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    image = Image.new("RGB", size, (30, 120, 200)).convert(mode)
    for candidate in (fmt, "PNG", "JPEG"):  # the first of these that can hold the mode
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=candidate)
            return buffer.getvalue()
        except (OSError, ValueError, KeyError):
            continue
    raise ValueError(f"no accepted format holds mode {mode}")


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


@st.composite
def uploads(draw) -> bytes:
    kind = draw(st.sampled_from(("image", "truncated", "flipped", "huge", "noise")))
    if kind == "huge":
        return png_declaring(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    if kind == "noise":
        return draw(st.binary(min_size=0, max_size=256))
    side = draw(st.sampled_from((8, 24, 64, 72)))
    size = (side, draw(st.sampled_from((side, 64, 40))))
    data = encoded(draw(st.sampled_from(MODES)), size, draw(st.sampled_from(FORMATS)))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flipped":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return data


@given(image=uploads(), mask=st.none() | uploads(), steps=st.sampled_from(("1", "2", "0", "x")))
@FUZZ
def test_hostile_edit_uploads_are_refused_with_a_400_naming_the_file(http, image, mask, steps):
    files = {"image": ("target.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    response = http.post(
        "/v1/images/edits", data={"prompt": "wearing glasses", "num_inference_steps": steps, "seed": "1"}, files=files
    )
    assert response.status_code in (200, 400, 413), response.text
    if response.status_code != 200:
        assert_openai_error(response)
        assert response.json()["error"]["param"] in {"image", "mask", "num_inference_steps", "size", "strength"}
