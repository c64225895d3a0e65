"""Paged cache storage for the text encoder: hashed token blocks, ref counts, LRU, byte budget.

After vLLM's automatic prefix caching (`v1/core/kv_cache_utils.py`, `block_pool.py`):
a full block of `block_size` token ids is named by a hash chained from its parent's hash,
so equal hashes mean equal *prefixes*, not just equal blocks. What a block holds (K/V of
every layer, output rows) is the encoder's business; the pool only counts its bytes.

Rules the pool keeps:
- the bytes of all entries never exceed `max_bytes` (an entry that cannot fit is not
  stored; the caller's result is still correct, only not cached);
- an entry with a positive ref count (in use by a forward, or pinned) is never evicted;
- eviction takes the least recently used free entry that has no cached children, so a
  chain is always cut from its end and every cached block stays reachable from the root;
- with `namespace_shares`, a namespace that reaches its share evicts its own entries.

The pool is not thread-safe: the engine that owns it serialises access.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

import numpy as np
import torch

BlockHash = bytes  # 16-byte digest: stable across processes (routing keys depend on it)
TokenIds = Sequence[int] | torch.Tensor  # a 1-d run of token ids


def hash_block(parent: BlockHash | None, token_ids: TokenIds, extra_keys: Sequence[str] = ()) -> BlockHash:
    """hash(parent hash, this block's token ids, extra keys such as model id and namespace).

    blake2b rather than Python's hash(): the same prefix must hash alike in every replica
    and in the router that picks a replica for it."""
    return _hash(parent, _token_bytes(token_ids), _extra_bytes(extra_keys))


def chain_hashes(token_ids: TokenIds, block_size: int, extra_keys: Sequence[str] = ()) -> list[BlockHash]:
    """Hashes of the full blocks of a token sequence, in order (a partial tail has none)."""
    data, extra = _token_bytes(token_ids), _extra_bytes(extra_keys)
    step = 4 * block_size
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for start in range(0, len(data) - step + 1, step):
        parent = _hash(parent, data[start : start + step], extra)
        hashes.append(parent)
    return hashes


def _token_bytes(token_ids: TokenIds) -> bytes:
    ids = token_ids.numpy() if isinstance(token_ids, torch.Tensor) else token_ids
    return np.asarray(ids, dtype="<i4").tobytes()


def _extra_bytes(extra_keys: Sequence[str]) -> bytes:
    return b"|".join(key.encode() for key in extra_keys) + b"#"


def _hash(parent: BlockHash | None, token_bytes: bytes, extra: bytes) -> BlockHash:
    digest = hashlib.blake2b(parent or b"\x00" * 16, digest_size=16)
    digest.update(extra)
    digest.update(token_bytes)
    return digest.digest()


@dataclass(eq=False)
class CacheEntry:
    """One cached block (or one whole-prompt output). `tensors` are owned by the pool."""

    key: BlockHash
    namespace: str
    tensors: tuple[torch.Tensor, ...]
    parent: CacheEntry | None = None
    nbytes: int = 0
    ref_count: int = 0
    num_children: int = 0


@dataclass
class PoolStats:
    bytes_in_use: int = 0
    evicted: int = 0
    rejected: int = 0  # did not fit: everything evictable was in use


class BlockPool:
    def __init__(self, max_bytes: int, namespace_shares: dict[str, float] | None = None):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self.namespace_max_bytes = {ns: int(share * max_bytes) for ns, share in (namespace_shares or {}).items()}
        self._entries: dict[BlockHash, CacheEntry] = {}  # bounded: every entry counts against max_bytes
        # The free entries (ref_count 0), oldest first. An ordered dict, not cachetools' LRUCache:
        # eviction skips entries with cached children, the parent being extended and (for a
        # namespace's share) other namespaces' entries, where an LRUCache only pops its oldest.
        self._free: OrderedDict[BlockHash, CacheEntry] = OrderedDict()
        self._namespace_bytes: dict[str, int] = {}
        self.stats = PoolStats()

    # -- lookup -------------------------------------------------------------------------
    def __contains__(self, key: BlockHash) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: BlockHash) -> CacheEntry | None:
        """The entry for `key`, marked most recently used; None if absent."""
        entry = self._entries.get(key)
        if entry is not None and entry.ref_count == 0:
            self._free.move_to_end(key)
        return entry

    def acquire_chain(self, keys: Sequence[BlockHash]) -> list[CacheEntry]:
        """The longest cached run of `keys` from the first, each entry's ref count raised
        so it cannot be evicted until `release`d."""
        chain: list[CacheEntry] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                break
            chain.append(entry)
        self.acquire(chain)
        return chain

    def acquire(self, entries: Iterable[CacheEntry]) -> None:
        for entry in entries:
            if entry.ref_count == 0:
                self._free.pop(entry.key, None)
            entry.ref_count += 1

    def release(self, entries: Sequence[CacheEntry]) -> None:
        """Drop one reference from each entry. Released from the chain's end to its root,
        so a child becomes free (and old) before its parent: children are evicted first."""
        for entry in reversed(entries):
            if entry.ref_count <= 0:
                raise RuntimeError("release() of an entry that is not held")
            entry.ref_count -= 1
            if entry.ref_count == 0 and entry.key in self._entries:
                self._free[entry.key] = entry

    # -- insertion and eviction ----------------------------------------------------------
    def insert(
        self,
        key: BlockHash,
        namespace: str,
        tensors: tuple[torch.Tensor, ...],
        parent: CacheEntry | None = None,
    ) -> CacheEntry | None:
        """Store a new free entry (most recently used). Returns the existing entry if `key`
        is cached already, None if it cannot fit without evicting something in use."""
        existing = self._entries.get(key)
        if existing is not None:
            return existing
        if parent is not None and parent.key not in self._entries:
            parent = None  # evicted meanwhile: the entry stands alone
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if not self._make_room(nbytes, namespace, protect=parent):
            self.stats.rejected += 1
            return None
        entry = CacheEntry(key, namespace, tensors, parent, nbytes)
        if parent is not None:
            parent.num_children += 1
        self._entries[key] = entry
        self._free[key] = entry
        self._namespace_bytes[namespace] = self._namespace_bytes.get(namespace, 0) + nbytes
        self.stats.bytes_in_use += nbytes
        return entry

    def _make_room(self, nbytes: int, namespace: str, protect: CacheEntry | None) -> bool:
        cap = self.namespace_max_bytes.get(namespace)
        if nbytes > self.max_bytes or (cap is not None and nbytes > cap):
            return False
        while cap is not None and self._namespace_bytes.get(namespace, 0) + nbytes > cap:
            if not self._evict_one(namespace, protect):
                return False
        while self.stats.bytes_in_use + nbytes > self.max_bytes:
            if not self._evict_one(None, protect):
                return False
        return True

    def _evict_one(self, namespace: str | None, protect: CacheEntry | None) -> bool:
        """Evict the least recently used free leaf (of `namespace` if given)."""
        for entry in self._free.values():
            if entry.num_children or entry is protect:
                continue
            if namespace is not None and entry.namespace != namespace:
                continue
            self._remove(entry)
            self.stats.evicted += 1
            return True
        return False

    def _remove(self, entry: CacheEntry) -> None:
        del self._entries[entry.key]
        self._free.pop(entry.key, None)
        if entry.parent is not None:
            entry.parent.num_children -= 1
        self._namespace_bytes[entry.namespace] -= entry.nbytes
        if not self._namespace_bytes[entry.namespace]:
            del self._namespace_bytes[entry.namespace]
        self.stats.bytes_in_use -= entry.nbytes

    def drop_free(self, namespace: str | None = None, keep: Set[BlockHash] = frozenset()) -> int:
        """Remove every free entry (of `namespace`) not in `keep`, leaves first; returns how many."""
        dropped = 0
        while True:
            victims = [
                e
                for e in self._free.values()
                if not e.num_children and e.key not in keep and (namespace is None or e.namespace == namespace)
            ]
            if not victims:
                return dropped
            for entry in victims:
                self._remove(entry)
                dropped += 1

    def namespace_bytes(self, namespace: str) -> int:
        return self._namespace_bytes.get(namespace, 0)
