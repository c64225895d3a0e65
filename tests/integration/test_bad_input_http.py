"""Every kind of bad input gets a 400 with an OpenAI-shaped error naming the parameter,
and the server keeps serving."""

from __future__ import annotations

import concurrent.futures

import pytest

from tests.integration.test_generation_http import generate, png_of

OK = {"prompt": "portrait", "size": "64x64", "seed": 1, "num_inference_steps": 3}

# (case id, JSON body, expected param, a fragment of the message)
BAD_BODIES = [
    ("missing prompt", {"size": "64x64"}, "prompt", "missing"),
    ("empty prompt", {**OK, "prompt": ""}, "prompt", "empty"),
    ("whitespace prompt", {**OK, "prompt": " \n\t "}, "prompt", "empty"),
    ("too long prompt", {**OK, "prompt": "a" * 4001}, "prompt", "maximum is 4000"),
    ("control character", {**OK, "prompt": "portrait\x00of a man"}, "prompt", "control character U+0000"),
    ("bad namespace", {**OK, "cache_namespace": "no spaces allowed"}, "cache_namespace", "pattern"),
    ("optimize_prompt string", {**OK, "optimize_prompt": "yes"}, "optimize_prompt", "boolean"),
    ("prompt not a string", {**OK, "prompt": 3}, "prompt", "string"),
    ("prompt null", {**OK, "prompt": None}, "prompt", "string"),
    ("n as string", {**OK, "n": "2"}, "n", "integer"),
    ("n zero", {**OK, "n": 0}, "n", "greater than or equal to 1"),
    ("n too large", {**OK, "n": 5}, "n", "between 1 and 4"),
    ("n float", {**OK, "n": 1.5}, "n", "integer"),
    ("n bool", {**OK, "n": True}, "n", "integer"),
    ("size without x", {**OK, "size": "256"}, "size", "WIDTHxHEIGHT"),
    ("size half", {**OK, "size": "256x"}, "size", "WIDTHxHEIGHT"),
    ("size not multiple of 8", {**OK, "size": "100x64"}, "size", "multiples of 8"),
    ("size too small", {**OK, "size": "32x32"}, "size", "between 64 and 1024"),
    ("size too large", {**OK, "size": "2048x2048"}, "size", "between 64 and 1024"),
    ("size negative", {**OK, "size": "-64x64"}, "size", "WIDTHxHEIGHT"),
    ("size number", {**OK, "size": 256}, "size", "string"),
    ("steps zero", {**OK, "num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
    ("steps too many", {**OK, "num_inference_steps": 151}, "num_inference_steps", "between 1 and 150"),
    ("steps float", {**OK, "num_inference_steps": 2.5}, "num_inference_steps", "integer"),
    ("guidance negative", {**OK, "guidance_scale": -1}, "guidance_scale", "greater than or equal to 0"),
    ("guidance too large", {**OK, "guidance_scale": 31}, "guidance_scale", "less than or equal to 30"),
    ("guidance string", {**OK, "guidance_scale": "high"}, "guidance_scale", "number"),
    ("seed negative", {**OK, "seed": -1}, "seed", "greater than or equal to 0"),
    ("seed string", {**OK, "seed": "7"}, "seed", "integer"),
    ("response_format url", {**OK, "response_format": "url"}, "response_format", "b64_json"),
    ("response_format unknown", {**OK, "response_format": "png"}, "response_format", "b64_json"),
    ("unknown parameter", {**OK, "styl": "vivid"}, "styl", "unknown parameter"),
    ("deadline zero", {**OK, "deadline_ms": 0}, "deadline_ms", "greater than 0"),
    ("deadline string", {**OK, "deadline_ms": "fast"}, "deadline_ms", "number"),
    ("quality unknown", {**OK, "quality": "ultra"}, "quality", "'fast', 'balanced', 'best', 'low'"),
    ("step policy unknown", {**OK, "step_policy": "magic"}, "step_policy", "'fixed', 'complexity' or 'slo'"),
    ("negative prompt not a string", {**OK, "negative_prompt": ["blurry"]}, "negative_prompt", "string"),
]


def assert_openai_error(response, param, fragment):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment.lower() in error["message"].lower(), error["message"]


@pytest.mark.parametrize("body,param,fragment", [case[1:] for case in BAD_BODIES], ids=[case[0] for case in BAD_BODIES])
def test_bad_body_is_a_400_naming_the_parameter(http, body, param, fragment):
    assert_openai_error(http.post("/v1/images/generations", json=body), param, fragment)


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (b'{"prompt": "x",', "not valid JSON"),
        (b"not json at all", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"a string"', "JSON object"),
        (b"null", "JSON object"),
        (b"", "JSON object"),
    ],
    ids=["truncated", "garbage", "array", "string", "null", "empty"],
)
def test_body_that_is_not_a_json_object(http, raw, fragment):
    response = http.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, None, fragment)


def test_unknown_route_and_method_are_openai_shaped(http):
    missing = http.get("/v1/nothing")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}
    }
    wrong_method = http.get("/v1/images/generations")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["message"] == "Method Not Allowed"
    assert wrong_method.headers["allow"] == "POST"  # kept by the error handler (schema fuzzing found it gone)
    assert http.request("TRACE", "/healthz").headers["allow"] == "GET"


def test_bad_input_does_not_disturb_concurrent_work(http):
    """A valid request in flight while bad ones arrive still gets its exact image."""
    expected = png_of(generate(http, **OK)["data"][0])
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        good = pool.submit(lambda: png_of(generate(http, **OK)["data"][0]))
        bad = [pool.submit(http.post, "/v1/images/generations", json=case[1]) for case in BAD_BODIES[:10]]
        assert all(f.result().status_code == 400 for f in bad)
        assert good.result() == expected
    assert http.get("/healthz").json()["status"] == "ok"
