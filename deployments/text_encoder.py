"""Stage 2: CLIP text encoder -> per-token hidden states (`last_hidden_state`) for the UNet.

The paged prefix cache is a later issue and plugs in here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from deployments import models


class TextEncoderEngine:
    def __init__(self, model_path: Path, num_threads: int | None = None):
        self.num_threads = num_threads
        model_path = Path(model_path)
        self.tokenizer = models.load_tokenizer(model_path)
        self.model = models.load_text_encoder(model_path)
        self._lock = threading.Lock()  # one forward at a time: torch already uses every thread

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """Token ids padded/truncated to the 77-token window, as diffusers' pipelines do."""
        return self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 77, hidden] float32 hidden states after the final layer norm."""
        if not texts:
            raise ValueError("encode() needs at least one text")
        ids = self.token_ids(list(texts))
        with self._lock:
            models.set_torch_threads(self.num_threads)
            return self.model(ids)[0]


def build_deployment():
    from ray import serve

    from deployments.serial_executor import SerialExecutor

    @serve.deployment(name="TextEncoder", ray_actor_options={"num_cpus": 0.2})
    class TextEncoder:
        def __init__(self, model_path: str, num_threads: int | None = None):
            self.engine = TextEncoderEngine(Path(model_path), num_threads)
            self.executor = SerialExecutor("text-encoder")

        async def encode(self, texts: list[str]) -> torch.Tensor:
            return await self.executor.run(self.engine.encode, texts)

    return TextEncoder
