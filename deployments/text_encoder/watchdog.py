"""Hit-rate watchdog for the text encoder's prefix cache.

Plain LRU loses a namespace's hot template blocks when a burst of one-off prompts
flows through a full cache, and keeps missing on them for as long as the burst lasts.
The watchdog keeps, per namespace, the rolling prefix hit rate of the prompts that had
to be computed (exact hits excluded: the default negative prompt would hide everything)
and a small frequency sketch of block hashes (Space-Saving: a fixed number of counters,
the least counted one replaced by a newcomer). When the rolling rate stays below the
threshold for a whole window, it asks for a rebuild: the engine drops the namespace's
stale free blocks and re-warms and pins the most frequent recent prefixes. Counts are
halved every window, so "frequent" means frequent lately; a rebuild that does not lift
the rate doubles the wait before the next one (up to 8 windows), so a workload with no
reuse to find does not rebuild over and over.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from cachetools import LRUCache


@dataclass
class SketchEntry:
    count: int
    chain: tuple[bytes, ...]  # block hashes from the root to this block
    token_ids: tuple[int, ...]  # a recent full window that starts with this prefix (to re-encode it)


class SpaceSavingSketch:
    """Approximate top-k counter (Metwally et al., 2005) over a fixed number of slots."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: dict[bytes, SketchEntry] = {}  # at most `capacity`

    def add(self, key: bytes, chain: tuple[bytes, ...], token_ids: tuple[int, ...]) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            entry.count += 1
            entry.token_ids = token_ids
            return
        count = 1
        if len(self.entries) >= self.capacity:
            victim = min(self.entries, key=lambda k: self.entries[k].count)
            count += self.entries.pop(victim).count  # Space-Saving: inherit the evicted count
        self.entries[key] = SketchEntry(count, chain, token_ids)

    def decay(self) -> None:
        """Halve every count so that what was frequent long ago fades."""
        for key in list(self.entries):
            self.entries[key].count //= 2
            if not self.entries[key].count:
                del self.entries[key]

    def top_prefixes(self, limit: int, min_count: int = 2) -> list[SketchEntry]:
        """The most counted prefixes (seen at least `min_count` times: once is not a pattern),
        deepest first among equals, skipping any prefix a chosen deeper one contains."""
        chosen: list[SketchEntry] = []
        covered: set[bytes] = set()
        for entry in sorted(self.entries.values(), key=lambda e: (-e.count, -len(e.chain))):
            if entry.count < min_count:
                break
            if entry.chain[-1] in covered:
                continue
            chosen.append(entry)
            covered.update(entry.chain)
            if len(chosen) >= limit:
                break
        return chosen


@dataclass
class NamespaceWindow:
    hit_tokens: deque[int]  # per computed prompt of the window: positions served from the cache
    total_tokens: deque[int]  # and positions asked for
    sketch: SpaceSavingSketch
    observed: int = 0
    since_rebuild: int = 0
    patience: int = 1  # windows to wait between rebuilds

    def rate(self) -> float:
        total = sum(self.total_tokens)
        return sum(self.hit_tokens) / total if total else 1.0


class HitRateWatchdog:
    def __init__(self, window: int, min_hit_rate: float, sketch_size: int, max_namespaces: int):
        """Defaults live in WatchdogSettings (deployments/text_encoder/settings.py)."""
        self.window = window
        self.min_hit_rate = min_hit_rate
        self.sketch_size = sketch_size
        # Namespaces come from requests: the least recently seen are forgotten.
        self._namespaces: LRUCache[str, NamespaceWindow] = LRUCache(maxsize=max_namespaces)

    def _state(self, namespace: str) -> NamespaceWindow:
        state = self._namespaces.get(namespace)
        if state is None:
            state = NamespaceWindow(
                deque(maxlen=self.window), deque(maxlen=self.window), SpaceSavingSketch(self.sketch_size)
            )
            self._namespaces[namespace] = state
        return state

    def observe(
        self, namespace: str, hit_tokens: int, total_tokens: int, chain: Sequence[bytes], token_ids: Sequence[int]
    ) -> bool:
        """Record one computed prompt; True when the namespace's cache should be rebuilt."""
        state = self._state(namespace)
        state.hit_tokens.append(hit_tokens)
        state.total_tokens.append(total_tokens)
        state.observed += 1
        state.since_rebuild += 1
        ids = tuple(token_ids)
        for depth in range(1, len(chain) + 1):
            state.sketch.add(chain[depth - 1], tuple(chain[:depth]), ids)
        if state.observed % self.window == 0:
            state.sketch.decay()
        if len(state.total_tokens) < self.window:
            return False
        if state.rate() >= self.min_hit_rate:
            state.patience = 1
            return False
        return state.since_rebuild >= self.window * state.patience

    def rate(self, namespace: str) -> float:
        state = self._namespaces.get(namespace)
        return state.rate() if state else 1.0

    def frequent_prefixes(self, namespace: str, limit: int) -> list[SketchEntry]:
        state = self._namespaces.get(namespace)
        return state.sketch.top_prefixes(limit) if state else []

    def rebuilt(self, namespace: str) -> None:
        """Start a fresh window; if the last rebuild did not help, wait longer for the next."""
        state = self._state(namespace)
        if state.since_rebuild <= self.window * state.patience and state.observed > state.since_rebuild:
            state.patience = min(2 * state.patience, 8)  # straight after the previous one: it did not help
        state.hit_tokens.clear()
        state.total_tokens.clear()
        state.since_rebuild = 0
