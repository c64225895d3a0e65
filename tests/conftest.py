"""Shared fixtures: the embedded tiny model (built once) and an in-process pipeline."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from serve_app.config import apply_ray_environment

# Ray Serve reads its environment when first imported; unit tests import it too.
apply_ray_environment()

# Fixtures that load the embedded model: a test that uses one (directly or through another
# fixture) runs diffusion and is a `component` test, not a unit test.
MODEL_FIXTURES = frozenset({"tiny_model_path", "portrait_model_path"})


def pytest_collection_modifyitems(config, items):
    """Mark `component` (loads a model) and `integration` (starts Ray Serve) by what a test
    uses and where it lives, so `make test-fast` can leave both out without a list to keep."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.component)
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_model_path():
    from deployments.models.loading import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def portrait_model_path():
    """The trained portrait model, shipped in the package (nothing to build)."""
    from deployments.models.loading import resolve_model

    return resolve_model("portrait")


@pytest.fixture(scope="session")
def local_pipe(tiny_model_path):
    """In-process pipeline with the served settings. Torch thread counts change float
    summation order, so bytes match the served images only with the same stage_threads."""
    from serve_app.flow.pipeline import local_pipeline_for
    from serve_app.ops.cli import load_serve_config, split_app_config

    settings, _, _ = split_app_config(load_serve_config("serve_config.yaml"))
    return local_pipeline_for(tiny_model_path, settings)


def run(coroutine):
    return asyncio.run(coroutine)


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    """An image encoded as an upload would be (PNG unless `format` says otherwise)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def max_pixel_diff(a, b) -> int:
    a = a if isinstance(a, np.ndarray) else png_pixels(a)
    b = b if isinstance(b, np.ndarray) else png_pixels(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
