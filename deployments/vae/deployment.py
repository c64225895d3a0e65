"""The VaeCodec as a Ray Serve deployment: the engine's calls, one at a time, on its own thread.

Ray is imported when the deployment is built, not with this module: Ray Serve reads its
environment (serve_app.config.RAY_ENVIRONMENT) when it is first imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from deployments.common.serial_executor import SerialExecutor
from deployments.denoiser.edit_latents import EncodedEdit
from deployments.vae.codec import VaeCodecEngine


def build_deployment() -> Any:
    from ray import serve

    @serve.deployment(name="VaeCodec", ray_actor_options={"num_cpus": 0.2})
    class VaeCodec:
        def __init__(self, model_path: str, num_threads: int | None = None):
            self.engine = VaeCodecEngine(Path(model_path), num_threads)
            self.executor = SerialExecutor("vae-codec")

        async def decode_png(
            self, latents: torch.Tensor, overlay: tuple[Image.Image, Image.Image] | None = None
        ) -> list[bytes]:
            return await self.executor.run(self.engine.decode_png, latents, overlay)

        async def preview_png(self, latents: torch.Tensor) -> list[bytes]:
            return await self.executor.run(self.engine.preview_png, latents)

        async def encode_image(
            self, image: Image.Image, width: int, height: int, mask: Image.Image | None = None
        ) -> EncodedEdit:
            return await self.executor.run(self.engine.encode_image, image, width, height, mask)

    return VaeCodec
