"""Prefix-cache affinity routing for the TextEncoder deployment.

Each TextEncoder replica keeps its own paged prefix cache, so a prompt only hits the
cache on a replica that has already seen its prefix. The caller passes a short
``routing_key`` with every call (hash of the cache namespace + the first block of token ids):

    text_encoder.encode.remote(texts, namespace=ns, routing_key=key)

and this router sends equal keys to the same replica, chosen by rendezvous
(highest-random-weight) hashing over the live replica ids. Adding or removing a replica
moves only the keys that the changed replica wins or loses (about 1/n of them), so the
other replicas' caches stay warm through autoscaling.

Affinity never outranks load: when the preferred replica has ``busy_threshold`` or more
requests in flight, or does not answer a queue-length probe, the request goes to the
least-loaded of a power-of-two-choices sample (the preferred replica stays in that
sample while it answers, and wins ties). A call without a routing key is routed by
plain power of two choices, as Serve's default router does.

The router runs in the *caller's* process (the ingress replica that holds the
TextEncoder handle), not in the TextEncoder replicas. Serve builds it with the
constructor arguments of ``RequestRouter`` and then calls
``initialize_state(**request_router_kwargs)``. Enable it on the deployment with

    request_router_config:
      request_router_class: deployments.text_encoder.router:PrefixAffinityRouter
      request_router_kwargs: {busy_threshold: 8}

(or ``RequestRouterConfig(...)`` in ``@serve.deployment`` / ``.options()``). The call's
keyword arguments reach the replica unchanged, so ``TextEncoder.encode`` must accept
``routing_key`` (and ignore it).

The rendezvous functions are plain Python and unit-testable without Ray.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from deployments.text_encoder.settings import MAX_BATCH_SIZE

# Default spill-over point, in requests in flight on the preferred replica (as this
# caller sees them: its own sends since the last probe, plus the probed queue length).
# Requests in flight on a TextEncoder replica share one batched forward (up to the
# encoder's max_batch_size), so up to a batch's worth a request on its preferred replica
# costs little more than its own share of that forward, and it gets the prefix-cache hit.
# So spill at the batch size: measured with benchmarks/encoder_routing.py (README), spilling
# at 2 lost the whole affinity gain at concurrency 4, spilling at 8 nearly doubled the
# template hit rate.
DEFAULT_BUSY_THRESHOLD = MAX_BATCH_SIZE
DEFAULT_ROUTING_KEY_KWARG = "routing_key"


# ---------------------------------------------------------------- pure rendezvous hashing


def rendezvous_weight(key: str, replica_id: str) -> int:
    """Weight of ``replica_id`` for ``key``: 64 bits of BLAKE2b over both.

    A keyed cryptographic hash, not Python's ``hash()``: the weight must be the same in
    every process (Python salts ``str`` hashes per process) and independent per pair.
    """
    digest = hashlib.blake2b(key.encode("utf-8") + b"\x00" + replica_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_rank(key: str, replica_ids: Iterable[str]) -> list[str]:
    """All distinct ``replica_ids`` ordered best-first for ``key`` (ties by id)."""
    return sorted(set(replica_ids), key=lambda rid: (rendezvous_weight(key, rid), rid), reverse=True)


def rendezvous_choice(key: str, replica_ids: Iterable[str]) -> str | None:
    """The replica id that owns ``key``: the one with the highest weight (None if none)."""
    best: str | None = None
    best_weight = -1
    for rid in replica_ids:
        weight = rendezvous_weight(key, rid)
        if best is None or weight > best_weight or (weight == best_weight and rid > best):
            best, best_weight = rid, weight
    return best


# ---------------------------------------------------------------------------- the router


class PrefixAffinityRouter(RequestRouter):
    """Rendezvous-hash affinity on ``routing_key``, spilling to power of two choices.

    Subclasses ``RequestRouter`` directly, deliberately without ``FIFOMixin``: with it,
    a replica found for request A is handed to the *oldest* pending request, which
    would send B's prompt to A's replica and break affinity. Two private hooks of the
    base class are overridden (see ``_fulfill_next_pending_request``): the hand-off
    matches the exact request, and a replica's load is counted when it is picked.

    ``request_router_kwargs`` (see ``initialize_state``):
      - ``busy_threshold`` (int >= 1, default ``DEFAULT_BUSY_THRESHOLD``, the encoder's
        batch size): the preferred replica is busy at this many requests in flight; it is
        also capped at the replica's ``max_ongoing_requests``.
      - ``routing_key_kwarg`` (str, default ``"routing_key"``): the call keyword
        argument that carries the key.
    """

    # Serve calls initialize_state right after construction; these defaults cover a
    # router constructed by hand (tests) that never calls it.
    _busy_threshold: int = DEFAULT_BUSY_THRESHOLD
    _routing_key_kwarg: str = DEFAULT_ROUTING_KEY_KWARG

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Picks already added to the queue-length cache whose on_send_request has not
        # come yet (per replica), so that it is not counted twice.
        self._counted_before_send: dict[ReplicaID, int] = defaultdict(int)

    def initialize_state(  # type: ignore[override]  # Serve passes request_router_kwargs as keywords
        self,
        busy_threshold: int = DEFAULT_BUSY_THRESHOLD,
        routing_key_kwarg: str = DEFAULT_ROUTING_KEY_KWARG,
    ) -> None:
        # bool is an int subclass; reject it so `busy_threshold: true` is an error.
        if isinstance(busy_threshold, bool) or not isinstance(busy_threshold, int) or busy_threshold < 1:
            raise ValueError(f"busy_threshold must be an int >= 1, got {busy_threshold!r}")
        if not isinstance(routing_key_kwarg, str) or not routing_key_kwarg:
            raise ValueError(f"routing_key_kwarg must be a non-empty string, got {routing_key_kwarg!r}")
        self._busy_threshold = busy_threshold
        self._routing_key_kwarg = routing_key_kwarg

    def routing_key(self, pending_request: PendingRequest | None) -> str | None:
        """The call's routing key, or None (no request, no kwarg, None or empty)."""
        if pending_request is None or not pending_request.kwargs:
            return None
        value = pending_request.kwargs.get(self._routing_key_kwarg)
        if value is None or value == "":
            return None
        return str(value)

    async def _queue_len(self, replica: RunningReplica) -> int | None:
        """Requests in flight on ``replica``: the cached value (kept current by Serve's
        on_send_request / completion hooks and refreshed by probes), else a probe.
        None when the replica does not answer within the probe deadline."""
        queue_len = self._replica_queue_len_cache.get(replica.replica_id)
        if queue_len is None:
            [(_, queue_len)] = await self._probe_queue_lens([replica], 0)
        return queue_len

    @staticmethod
    def _power_of_two(replicas: list[RunningReplica]) -> list[RunningReplica]:
        """Two distinct random replicas (or all, if fewer); Serve then takes the one
        with the shorter queue that is not full."""
        return random.sample(replicas, min(2, len(replicas)))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of candidates, best first. Serve tries each rank in order (the least
        loaded replica of a rank that has room wins) and, if none accepts, calls this
        again after a backoff."""
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Without this, Serve's retry loop calls us again with no sleep at all
            # when every rank is full (the locality mixin normally sets it).
            pending_request.routing_context.should_backoff = True

        key = self.routing_key(pending_request)
        if key is None:
            return [self._power_of_two(candidate_replicas)]

        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        owner = rendezvous_choice(key, by_id)
        if owner is None:  # not reached: there are candidates
            return [self._power_of_two(candidate_replicas)]
        preferred = by_id[owner]
        others = [r for r in candidate_replicas if r is not preferred]
        if not others:
            return [[preferred]]

        queue_len = await self._queue_len(preferred)
        threshold = min(self._busy_threshold, preferred.max_ongoing_requests)
        if queue_len is not None and queue_len < threshold:
            # Affinity first; if the preferred replica turns out full, the next rank.
            return [[preferred], self._power_of_two(others)]
        if queue_len is None:
            # Not answering (dead, or overloaded past the probe deadline): skip it.
            return [self._power_of_two(others)]
        # Busy: least loaded of the preferred replica and two others; the preferred one
        # goes first so that it keeps the request on a tie.
        return [[preferred] + self._power_of_two(others)]

    # ------------------------------------------------ overrides of private base hooks
    # Checked against Ray 2.60 (ray/serve/_private/request_router/request_router.py);
    # tests/unit/test_encoder_router.py fails if either behaviour regresses.

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Give ``replica`` to the request it was chosen for, and count it now.

        1. The base class finds that request by ``internal_request_id``, but every call
           that one replica makes while serving one request shares that id (the ingress
           encoding several prompts at once, for example). Its index keeps only the
           first, so the others are never handed a replica and their calls hang. The
           metadata object itself is distinct per call, so match on identity.
        2. Serve counts a request against the replica's queue length only once it is
           sent (``on_send_request``), after this hand-off. A burst routed in one go
           would then see the same, stale load, and every same-key request would pass
           the busy check. Count it here instead; ``on_send_request`` skips it later.
        """
        for pr in self._pending_requests_to_fulfill:
            if pr.metadata is request_metadata and not pr.future.done():
                self._cancel_routing_task_for_pending_request(pr)
                self._record_queue_wait_time(pr)
                pr.future.set_result(replica)
                if self._pending_requests_by_id.get(request_metadata.internal_request_id) is pr:
                    self._remove_pending_request_from_indices(pr)
                if self._use_replica_queue_len_cache:
                    super().on_send_request(replica.replica_id)
                    self._counted_before_send[replica.replica_id] += 1
                return

    def on_send_request(self, replica_id: ReplicaID) -> None:
        if self._counted_before_send.get(replica_id, 0) > 0:
            self._counted_before_send[replica_id] -= 1  # counted when it was picked
            return
        super().on_send_request(replica_id)
