"""The text encoder's settings (serve_config.yaml: args.text_encoder)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Token ids per block. The prompt optimizer's routing key names a window's first block of
# this size, so a router sends a prompt to the replica that caches that block.
DEFAULT_BLOCK_SIZE = 16


# Requests (of 2 texts each: prompt and negative prompt) per batched forward. The prefix-affinity
# router spills at this many requests in flight too (deployments/text_encoder/router.py).
MAX_BATCH_SIZE = 8


class WatchdogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    window: int = Field(64, ge=1, description="computed prompts per namespace in the rolling hit rate")
    min_hit_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="rebuild when the rolling prefix hit rate stays below this"
    )
    sketch_size: int = Field(64, ge=1, description="counters of the frequency sketch of block hashes")
    warm_prefixes: int = Field(4, ge=0, description="frequent prefixes re-warmed and pinned by a rebuild")
    max_pinned_fraction: float = Field(0.25, ge=0.0, le=1.0, description="of the byte budget")


class EncoderCacheSettings(BaseModel):
    """The text encoder's prefix cache (serve_config.yaml: args.text_encoder.cache)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    block_size: int = Field(DEFAULT_BLOCK_SIZE, ge=1, le=76)
    max_mib: float = Field(1024, ge=0, description="byte budget of blocks + exact-prompt outputs")
    exact_prompts: bool = Field(True, description="a repeated window returns its stored output")
    isolate_namespaces: bool = Field(True, description="equal text in two namespaces shares no block")
    namespace_shares: dict[str, Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=dict, description="namespace -> max fraction of the budget"
    )
    watchdog: WatchdogSettings = WatchdogSettings()


class EncoderBatchSettings(BaseModel):
    """`@serve.batch` of the TextEncoder deployment (serve_config.yaml: args.text_encoder.batch)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1, description="requests (of 2 texts each) per forward")
    batch_wait_timeout_s: float = Field(0.002, ge=0.0, description="how long the first request waits for company")


class TextEncoderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cache: EncoderCacheSettings = EncoderCacheSettings()
    batch: EncoderBatchSettings = EncoderBatchSettings()
    image_prompt_cache_entries: int = Field(
        256, ge=1, description="reference-image embeddings kept (LRU, by pixel hash); each is a few KB"
    )
