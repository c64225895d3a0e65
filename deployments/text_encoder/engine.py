"""Stage 2: CLIP text encoder -> per-token hidden states (`last_hidden_state`) for the UNet,
with a paged prefix cache: a prefix already encoded is never encoded again, exactly.

Per text: tokens padded to the 77-token window, cut into blocks (16 tokens by default)
named by a hash chain (`block_pool`). A repeated window is an *exact hit* (its stored
output, no model call); otherwise the longest cached chain of blocks gives the K/V and
outputs of a prefix and only the rest runs (`prefix_forward`), bit-identical to a
forward from scratch. New full blocks and the whole output are written back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from cachetools import LRUCache

from deployments.models import loading
from deployments.text_encoder.block_pool import BlockPool, CacheEntry, chain_hashes, hash_block
from deployments.text_encoder.prefix_forward import CachedPrefix, PrefixReuseForward
from deployments.text_encoder.settings import EncoderCacheSettings
from deployments.text_encoder.watchdog import HitRateWatchdog

logger = logging.getLogger(__name__)

MAX_NAMESPACES = 256  # namespaces with their own figures and pins; older ones are forgotten


def check_texts(texts: object, namespace: object) -> None:
    """Refuse a malformed request on its own, before it joins a batch with others."""
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    if not isinstance(namespace, str) or not namespace:
        raise ValueError("namespace must be a non-empty string")


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
    """One distinct (token ids, namespace) of a batch: looked up, or computed once."""

    token_ids: torch.Tensor  # [77]
    namespace: str
    chain: list[bytes]
    exact_key: bytes | None
    prefix: list[CacheEntry] = field(default_factory=list)  # acquired, released after the forward
    output: torch.Tensor | None = None
    cached_tokens: int = 0

    def result(self) -> torch.Tensor:
        if self.output is None:
            raise RuntimeError("text encoder row read before it was looked up or computed")
        return self.output


@dataclass(frozen=True)
class _PlannedText:
    """One text of a batch: its row, and whether an earlier text of the batch had the same
    row (then it is served by that text's result and counts as an exact hit)."""

    row: _Row
    repeat: bool

    def cached_tokens(self, window: int) -> int:
        return window if self.repeat else self.row.cached_tokens


@dataclass
class _BatchPlan:
    texts: list[_PlannedText]  # in the batch's order
    to_compute: list[_Row]  # distinct rows with no exact hit: one forward for all of them


class TextEncoderEngine:
    def __init__(
        self,
        model_path: Path,
        num_threads: int | None = None,
        cache: EncoderCacheSettings | dict[str, Any] | None = None,
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
        model: Any,
        tokenizer: Any,
        model_id: str,
        num_threads: int | None = None,
        cache: EncoderCacheSettings | dict[str, Any] | None = None,
    ) -> TextEncoderEngine:
        """Around an already loaded `CLIPTextModel` and its tokenizer (no model folder)."""
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, model_id, num_threads, cache)
        return engine

    def _setup(
        self,
        model: Any,
        tokenizer: Any,
        model_id: str,
        num_threads: int | None,
        cache: EncoderCacheSettings | dict[str, Any] | None,
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
        self.watchdog = HitRateWatchdog(watchdog.window, watchdog.min_hit_rate, watchdog.sketch_size, MAX_NAMESPACES)
        self._pinned: dict[str, list[list[CacheEntry]]] = {}  # namespace -> chains held by its last rebuild
        # Namespaces come from requests: keep figures for the most recent MAX_NAMESPACES only.
        self.stats: LRUCache[str, NamespaceStats] = LRUCache(maxsize=MAX_NAMESPACES)
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

    def encode_many(self, requests: Sequence[tuple[list[str], str]]) -> list[Encoding]:
        """Several requests (texts, namespace) in one forward; one Encoding per request."""
        for texts, namespace in requests:
            check_texts(texts, namespace)
        texts = [text for request_texts, _ in requests for text in request_texts]
        namespaces = [namespace for request_texts, namespace in requests for _ in request_texts]
        hidden, cached = self.encode_token_ids(self.token_ids(texts), namespaces)
        outputs: list[Encoding] = []
        offset = 0
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
        return stats

    def _encode(self, token_ids: torch.Tensor, namespaces: list[str]) -> tuple[torch.Tensor, list[int]]:
        window = token_ids.shape[1]
        plan = self._plan(token_ids, namespaces)
        if plan.to_compute:
            self._compute(plan.to_compute)
            for row in plan.to_compute:
                self._account(row, window)
        hidden = torch.stack([text.row.result() for text in plan.texts])
        return hidden, [text.cached_tokens(window) for text in plan.texts]

    def _plan(self, token_ids: torch.Tensor, namespaces: list[str]) -> _BatchPlan:
        """Each text's row: a repeat of an earlier text of the batch, an exact hit (its stored
        output), or a row to compute. Counts texts and exact hits."""
        window = token_ids.shape[1]
        plan = _BatchPlan([], [])
        rows: dict[tuple[bytes, str], _Row] = {}  # identical (ids, namespace) texts in one batch run once
        for ids, namespace in zip(token_ids, namespaces):
            key = (ids.numpy().tobytes(), namespace)
            stats = self._namespace_stats(namespace)
            stats.texts += 1
            stats.window_tokens += window
            row = rows.get(key)
            repeat = row is not None
            if row is None:
                row = rows[key] = self._new_row(ids, namespace)
            if repeat or self._exact_hit(row, window):
                stats.exact_hits += 1
                stats.cached_tokens += window
            else:
                plan.to_compute.append(row)
            plan.texts.append(_PlannedText(row, repeat))
        return plan

    def _new_row(self, ids: torch.Tensor, namespace: str) -> _Row:
        """The row's block hashes (a prefix hit must leave at least one position to compute)
        and the key of its whole window."""
        cache = self.settings
        if not cache.enabled:
            return _Row(ids, namespace, [], None)
        extra = self._keys(namespace)
        max_blocks = (len(ids) - 1) // cache.block_size
        chain = chain_hashes(ids, cache.block_size, extra)[:max_blocks]
        exact_key = hash_block(chain[-1] if chain else None, ids, (*extra, "window")) if cache.exact_prompts else None
        return _Row(ids, namespace, chain, exact_key)

    def _exact_hit(self, row: _Row, window: int) -> bool:
        """Serve the row from its window's stored output, if the cache has it."""
        entry = self.pool.get(row.exact_key) if row.exact_key else None
        if entry is None:
            return False
        row.output = entry.tensors[0]
        row.cached_tokens = window
        return True

    def _compute(self, rows: list[_Row]) -> None:
        """One forward for `rows`, each from its longest cached prefix; new blocks written back."""
        enabled = self.settings.enabled
        try:
            prefixes: list[CachedPrefix | None] = []
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
        pinned: list[list[CacheEntry]] = []
        pinned_bytes = 0
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
    def cache_info(self) -> dict[str, Any]:
        """Counters per namespace and for the pool, as plain data (the deployment exports them as metrics)."""
        pool = self.pool.stats
        return {
            "enabled": self.settings.enabled,
            "block_size": self.settings.block_size,
            "max_bytes": self.pool.max_bytes,
            "bytes_in_use": pool.bytes_in_use,
            "entries": len(self.pool),
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
