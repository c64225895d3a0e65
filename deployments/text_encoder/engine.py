"""Stage 2: CLIP text encoder -> per-token hidden states (`last_hidden_state`) for the UNet,
with a paged prefix cache: a prefix already encoded is never encoded again, exactly.

Per text: tokens padded to the 77-token window, cut into blocks (16 tokens by default)
named by a hash chain (`block_pool`). A repeated window is an *exact hit* (its stored
output, no model call); otherwise the longest cached chain of blocks gives the K/V and
outputs of a prefix and only the rest runs (`clip_prefix_forward`), bit-identical to a
forward from scratch. New full blocks and the whole output are written back.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from deployments.models import loading
from deployments.text_encoder.block_pool import BlockPool, CacheEntry, chain_hashes, hash_block
from deployments.text_encoder.prefix_forward import CachedPrefix, PrefixReuseForward
from deployments.text_encoder.watchdog import HitRateWatchdog

logger = logging.getLogger(__name__)

MAX_NAMESPACES = 256  # namespaces with their own figures and pins; older ones are forgotten


def check_texts(texts, namespace) -> None:
    """Refuse a malformed request on its own, before it joins a batch with others."""
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    if not isinstance(namespace, str) or not namespace:
        raise ValueError("namespace must be a non-empty string")


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
    block_size: int = Field(16, ge=1, le=76)
    max_mib: float = Field(1024, ge=0, description="byte budget of blocks + exact-prompt outputs")
    exact_prompts: bool = Field(True, description="a repeated window returns its stored output")
    isolate_namespaces: bool = Field(True, description="equal text in two namespaces shares no block")
    namespace_shares: dict[str, Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=dict, description="namespace -> max fraction of the budget"
    )
    watchdog: WatchdogSettings = WatchdogSettings()


@dataclass
class NamespaceStats:
    texts: int = 0
    exact_hits: int = 0
    prefix_hits: int = 0  # computed, but starting after a cached prefix
    misses: int = 0  # computed from position 0
    window_tokens: int = 0  # 77 per text: what a forward from scratch computes
    cached_tokens: int = 0  # of those, served from the cache
    rebuilds: int = 0


@dataclass
class Encoding:
    """One request's encoder output."""

    hidden: torch.Tensor  # [texts, 77, hidden]
    cached_tokens: list[int]  # per text: window positions served from the cache (77: exact hit)


@dataclass
class _Row:
    token_ids: torch.Tensor  # [77]
    namespace: str
    chain: list[bytes]
    exact_key: bytes | None
    prefix: list[CacheEntry] = field(default_factory=list)  # acquired, released after the forward
    output: torch.Tensor | None = None
    cached_tokens: int = 0


class TextEncoderEngine:
    def __init__(
        self, model_path: Path, num_threads: int | None = None, cache: EncoderCacheSettings | dict | None = None
    ):
        model_path = Path(model_path)
        self._setup(
            loading.load_text_encoder(model_path),
            loading.load_tokenizer(model_path),
            loading.model_id(model_path),
            num_threads,
            cache,
        )

    @classmethod
    def from_model(
        cls,
        model,
        tokenizer,
        model_id: str,
        num_threads: int | None = None,
        cache: EncoderCacheSettings | dict | None = None,
    ) -> TextEncoderEngine:
        """Around an already loaded `CLIPTextModel` (the benchmark's SD-1.5-shaped encoder)."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, model_id, num_threads, cache)
        return engine

    def _setup(
        self, model, tokenizer, model_id: str, num_threads: int | None, cache: EncoderCacheSettings | dict | None
    ) -> None:
        self.num_threads = num_threads
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.model = model
        self.forward = PrefixReuseForward(self.model)
        self.settings = EncoderCacheSettings.model_validate(cache or {})
        self.pool = BlockPool(
            int(self.settings.max_mib * 2**20), {ns: share for ns, share in self.settings.namespace_shares.items()}
        )
        watchdog = self.settings.watchdog
        self.watchdog = HitRateWatchdog(watchdog.window, watchdog.min_hit_rate, watchdog.sketch_size)
        self._pinned: dict[str, list[list[CacheEntry]]] = {}  # namespace -> chains held by its last rebuild
        # Namespaces come from requests: keep figures for the most recent MAX_NAMESPACES only.
        self.stats: OrderedDict[str, NamespaceStats] = OrderedDict()
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

    def encode(self, texts: list[str], namespace: str = "default", routing_key: str | None = None) -> Encoding:
        """Hidden states [len(texts), 77, hidden] (float32, after the final layer norm).
        `routing_key` is for the served router (which replica); an engine ignores it."""
        return self.encode_many([(texts, namespace)])[0]

    def encode_many(self, requests: list[tuple[list[str], str]]) -> list[Encoding]:
        """Several requests (texts, namespace) in one forward; one Encoding per request."""
        for texts, namespace in requests:
            check_texts(texts, namespace)
        texts = [text for request_texts, _ in requests for text in request_texts]
        namespaces = [namespace for request_texts, namespace in requests for _ in request_texts]
        hidden, cached = self.encode_token_ids(self.token_ids(texts), namespaces)
        outputs, offset = [], 0
        for request_texts, _ in requests:
            end = offset + len(request_texts)
            outputs.append(Encoding(hidden[offset:end], cached[offset:end]))
            offset = end
        return outputs

    @torch.inference_mode()
    def encode_token_ids(self, token_ids: torch.Tensor, namespaces: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Hidden states of [batch, 77] token ids, and per row the positions served from the cache."""
        with self._lock:
            loading.set_torch_threads(self.num_threads)
            return self._encode(token_ids, namespaces)

    # -- the cached forward -----------------------------------------------------------------
    def _keys(self, namespace: str) -> tuple[str, ...]:
        return (self.model_id, namespace if self.settings.isolate_namespaces else "")

    def _namespace_stats(self, namespace: str) -> NamespaceStats:
        stats = self.stats.get(namespace)
        if stats is None:
            stats = self.stats[namespace] = NamespaceStats()
            if len(self.stats) > MAX_NAMESPACES:
                self.stats.popitem(last=False)
        self.stats.move_to_end(namespace)
        return stats

    def _encode(self, token_ids: torch.Tensor, namespaces: list[str]) -> tuple[torch.Tensor, list[int]]:
        cache = self.settings
        window = token_ids.shape[1]
        # A prefix hit must leave at least one position to compute.
        max_blocks = (window - 1) // cache.block_size
        rows: list[_Row] = []  # to compute
        unique: dict[tuple[bytes, str], _Row] = {}  # identical (ids, namespace) rows in one batch run once
        order: list[_Row] = []
        cached_tokens: list[int] = []
        for ids, namespace in zip(token_ids, namespaces):
            key = (ids.numpy().tobytes(), namespace)
            stats = self._namespace_stats(namespace)
            stats.texts += 1
            stats.window_tokens += window
            if key in unique:
                stats.exact_hits += 1
                stats.cached_tokens += window
                order.append(unique[key])
                cached_tokens.append(window)
                continue
            extra = self._keys(namespace)
            chain = chain_hashes(ids, cache.block_size, extra)[:max_blocks] if cache.enabled else []
            exact_key = None
            if cache.enabled and cache.exact_prompts:
                exact_key = hash_block(chain[-1] if chain else None, ids, (*extra, "window"))
            row = _Row(ids, namespace, chain, exact_key)
            unique[key] = row
            order.append(row)
            cached_tokens.append(-1)  # filled in below
            entry = self.pool.get(exact_key) if exact_key else None
            if entry is not None:
                row.output = entry.tensors[0]
                row.cached_tokens = window
                stats.exact_hits += 1
                stats.cached_tokens += window
            else:
                rows.append(row)

        if rows:
            self._compute(rows)
            for row in rows:
                self._account(row, window)
        cached_tokens = [row.cached_tokens if n < 0 else n for row, n in zip(order, cached_tokens)]
        return torch.stack([row.output for row in order]), cached_tokens

    def _compute(self, rows: list[_Row]) -> None:
        """One forward for `rows`, each from its longest cached prefix; new blocks written back."""
        enabled = self.settings.enabled
        try:
            prefixes = []
            for row in rows:
                row.prefix = self.pool.acquire_chain(row.chain) if enabled else []
                prefixes.append(self._cached_prefix(row.prefix))
            result = self.forward(torch.stack([row.token_ids for row in rows]), prefixes)
            for i, row in enumerate(rows):
                row.output = result.hidden[i]
                if enabled:
                    self._write_back(row, result.kv[i], result.hidden[i])
        finally:
            for row in rows:
                self.pool.release(row.prefix)

    def _cached_prefix(self, chain: list[CacheEntry]) -> CachedPrefix | None:
        if not chain:
            return None
        return CachedPrefix([entry.tensors[0] for entry in chain], [entry.tensors[1] for entry in chain])

    def _write_back(self, row: _Row, kv: torch.Tensor, hidden: torch.Tensor) -> None:
        size = self.settings.block_size
        parent = row.prefix[-1] if row.prefix else None
        for index in range(len(row.prefix), len(row.chain)):
            span = slice(index * size, (index + 1) * size)
            block = (kv[:, :, :, span].clone(), hidden[span].clone())
            parent = self.pool.insert(row.chain[index], row.namespace, block, parent)
            if parent is None:
                break  # budget full of blocks in use: the rest of this chain is not cached
        if row.exact_key is not None:
            self.pool.insert(row.exact_key, row.namespace, (hidden.clone(),), parent)

    def _account(self, row: _Row, window: int) -> None:
        stats = self._namespace_stats(row.namespace)
        cached = row.cached_tokens = len(row.prefix) * self.settings.block_size
        stats.cached_tokens += cached
        if cached:
            stats.prefix_hits += 1
        else:
            stats.misses += 1
        watchdog = self.settings.watchdog
        if (
            self.settings.enabled
            and watchdog.enabled
            and self.watchdog.observe(row.namespace, cached, window, row.chain, row.token_ids.tolist())
        ):
            try:
                self._rebuild(row.namespace)
            except Exception:  # the cache stays correct either way; the request must not fail for it
                logger.exception("text encoder cache rebuild for namespace %r failed", row.namespace)

    # -- watchdog rebuild ---------------------------------------------------------------------
    def _rebuild(self, namespace: str) -> None:
        """Drop the namespace's stale free blocks, re-encode its most frequent recent prefixes
        and pin them (until the next rebuild) so a burst of one-off prompts cannot evict them."""
        settings = self.settings.watchdog
        rate = self.watchdog.rate(namespace)
        frequent = self.watchdog.frequent_prefixes(namespace, settings.warm_prefixes)
        for chain in self._pinned.pop(namespace, []):
            self.pool.release(chain)
        keep = {key for entry in frequent for key in entry.chain}
        dropped = self.pool.drop_free(namespace, keep)
        pinned, pinned_bytes = [], 0
        pinned_elsewhere = sum(e.nbytes for chains in self._pinned.values() for chain in chains for e in chain)
        budget = settings.max_pinned_fraction * self.pool.max_bytes - pinned_elsewhere
        for entry in frequent:
            chain = self.pool.acquire_chain(entry.chain)
            if len(chain) < len(entry.chain):  # not cached: compute it (writes its blocks back)
                self.pool.release(chain)
                self._compute([_Row(torch.tensor(entry.token_ids), namespace, list(entry.chain), None)])
                chain = self.pool.acquire_chain(entry.chain)
            size = sum(e.nbytes for e in chain)
            if pinned_bytes + size > budget:
                self.pool.release(chain)
                break
            pinned.append(chain)
            pinned_bytes += size
        if pinned:
            self._pinned[namespace] = pinned
        self.watchdog.rebuilt(namespace)
        self._namespace_stats(namespace).rebuilds += 1
        logger.warning(
            "text encoder cache rebuilt for namespace %r: rolling prefix hit rate %.2f < %.2f over %d prompts; "
            "dropped %d stale blocks, pinned %d frequent prefixes (%d blocks, %.1f MiB)",
            namespace,
            rate,
            settings.min_hit_rate,
            settings.window,
            dropped,
            len(pinned),
            sum(len(c) for c in pinned),
            pinned_bytes / 2**20,
        )

    # -- figures ---------------------------------------------------------------------------
    def cache_info(self) -> dict:
        """Counters per namespace and for the pool, as plain data (the deployment exports them as metrics)."""
        pool = self.pool.stats
        return {
            "enabled": self.settings.enabled,
            "block_size": self.settings.block_size,
            "max_bytes": self.pool.max_bytes,
            "bytes_in_use": pool.bytes_in_use,
            "entries": pool.entries,
            "evictions": pool.evicted,
            "rejected": pool.rejected,
            "kv_bytes_per_token": self.forward.kv_bytes_per_token(),
            "namespaces": {ns: asdict(stats) for ns, stats in self.stats.items()},
        }

    def clear_cache(self) -> None:
        with self._lock:
            for chains in self._pinned.values():
                for chain in chains:
                    self.pool.release(chain)
            self._pinned.clear()
            self.pool.drop_free()


class EncoderBatchSettings(BaseModel):
    """`@serve.batch` of the TextEncoder deployment (serve_config.yaml: args.text_encoder.batch)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, description="requests (of 2 texts each) per forward")
    batch_wait_timeout_s: float = Field(0.002, ge=0.0, description="how long the first request waits for company")


class TextEncoderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cache: EncoderCacheSettings = EncoderCacheSettings()
    batch: EncoderBatchSettings = EncoderBatchSettings()
    image_prompt_cache_entries: int = Field(
        256, ge=1, description="reference-image embeddings kept (LRU, by pixel hash); each is a few KB"
    )


def build_deployment():
    from ray import serve

    from deployments.common.serial_executor import SerialExecutor
    from deployments.text_encoder.image_prompt import LazyImagePromptEncoder
    from deployments.text_encoder.metrics import CacheMetrics

    @serve.deployment(name="TextEncoder", ray_actor_options={"num_cpus": 0.2})
    class TextEncoder:
        def __init__(self, model_path: str, num_threads: int | None = None, settings: dict | None = None):
            settings = TextEncoderSettings.model_validate(settings or {})
            self.engine = TextEncoderEngine(Path(model_path), num_threads, settings.cache)
            self.executor = SerialExecutor("text-encoder")
            self.metrics = CacheMetrics()
            self._encode_batch.set_max_batch_size(settings.batch.max_batch_size)
            self._encode_batch.set_batch_wait_timeout_s(settings.batch.batch_wait_timeout_s)
            self.image_prompts = LazyImagePromptEncoder(
                Path(model_path), num_threads, settings.image_prompt_cache_entries
            )

        async def encode_image_prompt(self, image, routing_key: str | None = None):
            """A reference image's IP-Adapter embedding (deployments/image_prompt_encoder.py).
            `routing_key` (the image's hash) sends one face to one replica, where it is cached."""
            return await self.executor.run(self.image_prompts.encode_image_prompt, image)

        async def encode(
            self, texts: list[str], namespace: str = "default", routing_key: str | None = None
        ) -> Encoding:
            """`routing_key` is read by the request router (prefix affinity), not here."""
            check_texts(texts, namespace)  # a bad request fails alone, not its whole batch
            return await self._encode_batch(texts, namespace)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
        async def _encode_batch(self, texts: list[list[str]], namespaces: list[str]) -> list[Encoding]:
            outputs = await self.executor.run(self.engine.encode_many, list(zip(texts, namespaces)))
            self.metrics.update(await self.cache_info())
            return outputs

        async def cache_info(self) -> dict:
            return await self.executor.run(self.engine.cache_info)  # on the engine's thread: no torn reads

    return TextEncoder
