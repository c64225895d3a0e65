"""The TextEncoder deployment: the text engine and the image-prompt encoder behind Ray Serve.

Requests are batched by `@serve.batch` (sizes from `EncoderBatchSettings`), run one batch at
a time on the engine's own thread, and the cache's figures are exported as metrics. Ray is
imported when the deployment is built, not with this module: Ray Serve reads its environment
(serve_app.config.RAY_ENVIRONMENT) when it is first imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from deployments.text_encoder.engine import Encoding, TextEncoderEngine, check_texts
from deployments.text_encoder.image_prompt import ImagePromptEmbedding
from deployments.text_encoder.settings import EncoderBatchSettings, TextEncoderSettings

# What `@serve.batch` starts with; each replica then applies its configured settings.
_DEFAULT_BATCH = EncoderBatchSettings()


def build_deployment() -> Any:
    from ray import serve

    from deployments.common.serial_executor import SerialExecutor
    from deployments.text_encoder.image_prompt import LazyImagePromptEncoder
    from deployments.text_encoder.metrics import CacheMetrics

    # Ray types @serve.batch for a function of one list; ours is a method of two (texts, namespaces).
    batch: Any = serve.batch

    @serve.deployment(name="TextEncoder", ray_actor_options={"num_cpus": 0.2})
    class TextEncoder:
        def __init__(
            self,
            model_path: str,
            num_threads: int | None = None,
            settings: TextEncoderSettings | dict[str, Any] | None = None,
        ):
            config = TextEncoderSettings.model_validate(settings or {})
            self.engine = TextEncoderEngine(Path(model_path), num_threads, config.cache)
            self.executor = SerialExecutor("text-encoder")
            self.metrics = CacheMetrics()
            self._encode_batch.set_max_batch_size(config.batch.max_batch_size)
            self._encode_batch.set_batch_wait_timeout_s(config.batch.batch_wait_timeout_s)
            self.image_prompts = LazyImagePromptEncoder(
                Path(model_path), num_threads, config.image_prompt_cache_entries
            )

        async def encode_image_prompt(self, image: Image.Image, routing_key: str | None = None) -> ImagePromptEmbedding:
            """A reference image's IP-Adapter embedding (deployments/text_encoder/image_prompt.py).
            `routing_key` (the image's hash) sends one face to one replica, where it is cached."""
            return await self.executor.run(self.image_prompts.encode_image_prompt, image)

        async def encode(
            self, texts: list[str], namespace: str = "default", routing_key: str | None = None
        ) -> Encoding:
            """`routing_key` is read by the request router (prefix affinity), not here."""
            check_texts(texts, namespace)  # a bad request fails alone, not its whole batch
            return await self._encode_batch(texts, namespace)

        @batch(max_batch_size=_DEFAULT_BATCH.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCH.batch_wait_timeout_s)
        async def _encode_batch(self, texts: list[list[str]], namespaces: list[str]) -> list[Encoding]:
            outputs = await self.executor.run(self.engine.encode_many, list(zip(texts, namespaces)))
            self.metrics.update(await self.cache_info())
            return outputs

        async def cache_info(self) -> dict[str, Any]:
            return await self.executor.run(self.engine.cache_info)  # on the engine's thread: no torn reads

    return TextEncoder
