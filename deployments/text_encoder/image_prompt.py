"""The image-prompt encoder: a reference face -> the embedding the IP-Adapter UNet attends to.

CLIP vision tower + projection (the model folder's `image_encoder/`, fed by its
`feature_extractor/`), as diffusers' `encode_image` runs it. Embeddings are cached by a
hash of the decoded pixels: one source face is typically fused into many targets, and the
same face uploaded as PNG or re-encoded losslessly still hits.

It lives in the TextEncoder deployment (not a fifth one): it is a conditioning encoder like
the text encoder, small next to the UNet, and every reference-image edit needs both, so it
scales with the text encoder and costs no extra replica, actor or memory reservation.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from cachetools import LRUCache
from PIL import Image

from deployments.models import loading


@dataclass
class ImagePromptEmbedding:
    embeds: torch.Tensor  # [1, projection_dim]
    cache_hit: bool
    image_hash: str


def image_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ImagePromptEncoderEngine:
    def __init__(self, model_path: Path, num_threads: int | None = None, cache_entries: int = 256):
        if not loading.has_image_prompt_adapter(model_path):
            raise ValueError(
                f"{model_path} has no image-prompt adapter (image_encoder/, feature_extractor/, "
                f"{loading.IP_ADAPTER_FILE})"
            )
        self.num_threads = num_threads
        self.encoder, self.feature_extractor = loading.load_image_encoder(Path(model_path))
        self._cache: LRUCache[str, torch.Tensor] = LRUCache(maxsize=cache_entries)  # by image_hash
        self._lock = threading.Lock()

    @torch.inference_mode()
    def encode(self, image: Image.Image) -> ImagePromptEmbedding:
        key = image_hash(image)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                return ImagePromptEmbedding(cached, True, key)
            loading.set_torch_threads(self.num_threads)
            pixels = self.feature_extractor(image, return_tensors="pt").pixel_values
            embeds = self.encoder(pixels.to(torch.float32)).image_embeds
            self._cache[key] = embeds
        return ImagePromptEmbedding(embeds, False, key)


class LazyImagePromptEncoder:
    """The encoder, loaded by the first reference image (models without an adapter, and
    servers that never see a reference, never load it). The TextEncoder deployment and the
    in-process pipeline both call it through `encode_image_prompt`."""

    def __init__(self, model_path: Path, num_threads: int | None = None, cache_entries: int = 256):
        self._args = (Path(model_path), num_threads, cache_entries)
        self.engine: ImagePromptEncoderEngine | None = None

    def encode_image_prompt(self, image: Image.Image, routing_key: str | None = None) -> ImagePromptEmbedding:
        """`routing_key` is for the request router (a face goes to the replica that cached it)."""
        if self.engine is None:
            self.engine = ImagePromptEncoderEngine(*self._args)
        return self.engine.encode(image)
