"""UNet backends against the torch fp32 reference, and the fallback chain under injected faults.

Tolerances (tiny model, 64x64, 8 steps, decoded images vs torch fp32 with the same seed):
onnxruntime fp32 within 2/255 per pixel; torch bf16 and onnxruntime int8 at PSNR >= 20 dB
(reduced precision: the quality guard, not this test, decides whether they may serve).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deployments.denoiser import backends
from deployments.denoiser.backends import BackendSpec, BackendUnavailable, FallbackUNet, torch_runner
from deployments.denoiser.engine import DenoiseJob, DenoiserEngine
from deployments.vae.codec import VaeCodecEngine

SIZE, STEPS = 64, 8


@pytest.fixture(scope="module")
def vae(tiny_model_path):
    return VaeCodecEngine(tiny_model_path, num_threads=2)


@pytest.fixture(scope="module")
def jobs():
    generator = torch.Generator().manual_seed(7)
    return [
        DenoiseJob(*torch.randn(2, 1, 77, 64, generator=generator), SIZE, SIZE, [seed], STEPS, 7.5) for seed in range(2)
    ]


def images(path, vae, jobs, chain) -> list[np.ndarray]:
    engine = DenoiserEngine(path, num_threads=2, settings={"backends": chain})
    return [vae.decode_pixels(engine.submit(job).result(timeout=120))[0].astype(np.float64) for job in jobs]


@pytest.fixture(scope="module")
def reference(tiny_model_path, vae, jobs):
    return images(tiny_model_path, vae, jobs, [{"backend": "torch", "precision": "fp32"}])


def psnr(a, b) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_onnxruntime_fp32_matches_torch(tiny_model_path, vae, jobs, reference):
    got = images(tiny_model_path, vae, jobs, [{"backend": "onnxruntime", "precision": "fp32"}])
    for a, b in zip(got, reference):
        assert np.abs(a - b).max() <= 2


@pytest.mark.parametrize("backend,precision", [("torch", "bf16"), ("onnxruntime", "int8")])
def test_reduced_precision_stays_close(tiny_model_path, vae, jobs, reference, backend, precision):
    got = images(tiny_model_path, vae, jobs, [{"backend": backend, "precision": precision}])
    for a, b in zip(got, reference):
        assert 20 <= psnr(a, b) < math.inf  # close, and really a different computation


def test_unavailable_backends_are_skipped_at_load(tiny_model_path):
    chain = FallbackUNet(
        tiny_model_path,
        [
            BackendSpec(backend="tensorrt", precision="fp16"),
            BackendSpec(backend="torch", precision="fp16"),
            BackendSpec(backend="torch", precision="fp32"),
        ],
    )
    assert chain.active.name == "torch-fp32"
    assert [name for name, _ in chain.fallbacks] == ["tensorrt-fp16", "torch-fp16"]
    with pytest.raises(BackendUnavailable):
        FallbackUNet(tiny_model_path, [BackendSpec(backend="tensorrt")])


def test_a_backend_failing_mid_batch_falls_back_without_failing_requests(
    tiny_model_path, vae, jobs, reference, monkeypatch
):
    """The first backend dies on its 5th forward (as an out-of-memory would): the jobs in the
    batch finish on the next backend, with the images the next backend alone would give."""
    calls = {"n": 0}

    def flaky_loader(path, spec, num_threads):
        runner = torch_runner(path, BackendSpec(precision="fp32"))

        def run(sample, timesteps, context):
            calls["n"] += 1
            if calls["n"] >= 5:
                raise RuntimeError("CUDA out of memory (injected)")
            return runner(sample, timesteps, context)

        return run

    monkeypatch.setitem(backends.LOADERS, "onnxruntime", flaky_loader)
    engine = DenoiserEngine(
        tiny_model_path, num_threads=2, settings={"backends": [{"backend": "onnxruntime"}, {"backend": "torch"}]}
    )
    futures = [engine.submit(job) for job in jobs]
    got = [vae.decode_pixels(f.result(timeout=120))[0].astype(np.float64) for f in futures]
    load = engine.load()
    assert load.backend == "torch-fp32" and load.backend_fallbacks == 1
    assert "out of memory" in engine.unet.fallbacks[0][1]
    for a, b in zip(got, reference):
        assert np.abs(a - b).max() <= 1  # both links compute torch fp32


@pytest.mark.gpu
def test_torch_fp16_on_gpu_stays_close(tiny_model_path, vae, jobs, reference):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    got = images(tiny_model_path, vae, jobs, [{"backend": "torch", "precision": "fp16", "device": "cuda"}])
    for a, b in zip(got, reference):
        assert psnr(a, b) >= 30


@pytest.mark.gpu
def test_tensorrt_fp16_engine_stays_close_and_is_cached(tiny_model_path, vae, jobs, reference):
    """Where a GPU and TensorRT exist: the engine builds from the ONNX export, is cached on
    disk (the second load reuses the file), and its images stay close to torch fp32."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    got = images(tiny_model_path, vae, jobs, [{"backend": "tensorrt", "precision": "fp16"}])
    for a, b in zip(got, reference):
        assert psnr(a, b) >= 30
    spec = BackendSpec(backend="tensorrt", precision="fp16")
    first = backends.tensorrt_engine_file(tiny_model_path, spec)  # built by the engine above
    built = first.stat().st_mtime_ns
    again = backends.tensorrt_engine_file(tiny_model_path, spec)
    assert again == first and again.stat().st_mtime_ns == built
