"""TextEncoder prefix-affinity router: rendezvous hashing (pure) and the router's choices
through Serve's own routing loop, with in-memory replicas (no Ray cluster started)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from deployments.text_encoder.router import (
    DEFAULT_BUSY_THRESHOLD,
    PrefixAffinityRouter,
    rendezvous_choice,
    rendezvous_rank,
    rendezvous_weight,
)
from deployments.text_encoder.settings import MAX_BATCH_SIZE

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"

KEYS = [f"studio-portrait:{i:04d}" for i in range(1000)]


# ------------------------------------------------------------------ rendezvous (pure)


def test_weight_is_a_fixed_function_of_key_and_replica():
    # Pinned: the mapping must be the same in every process and release (no salted
    # hash(), no seed), or every router would disagree and every cache would go cold.
    # The value is the first 8 bytes (big-endian) of BLAKE2b-64 over b"ns:1,2,3\x00replica-a".
    w = rendezvous_weight("ns:1,2,3", "replica-a")
    assert w == 0x3FE2A7239E1EC384
    assert w != rendezvous_weight("ns:1,2,3", "replica-b")
    assert w != rendezvous_weight("ns:1,2,4", "replica-a")


def test_same_key_same_replica_whatever_the_order():
    ids = ["r-a", "r-b", "r-c", "r-d"]
    rng = random.Random(0)
    for key in KEYS[:200]:
        expected = rendezvous_choice(key, ids)
        for _ in range(3):
            shuffled = ids[:]
            rng.shuffle(shuffled)
            assert rendezvous_choice(key, shuffled) == expected
        assert rendezvous_rank(key, ids)[0] == expected
        assert sorted(rendezvous_rank(key, ids)) == sorted(ids)


def test_no_replicas_no_choice():
    assert rendezvous_choice("k", []) is None
    assert rendezvous_rank("k", []) == []


@pytest.mark.parametrize("n", [2, 3, 4])
def test_keys_spread_evenly(n):
    ids = [f"replica-{i}" for i in range(n)]
    counts = Counter(rendezvous_choice(k, ids) for k in KEYS)
    assert set(counts) == set(ids)
    for rid in ids:
        share = counts[rid] / len(KEYS)
        assert 0.7 / n < share < 1.3 / n, (rid, share)
    if n == 2:
        assert all(0.35 <= counts[rid] / len(KEYS) <= 0.65 for rid in ids)


def test_adding_a_replica_moves_only_about_one_nth_and_only_to_it():
    old = ["replica-0", "replica-1"]
    new = old + ["replica-2"]
    before = {k: rendezvous_choice(k, old) for k in KEYS}
    after = {k: rendezvous_choice(k, new) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "replica-2" for k in moved)  # nothing shuffles between old ones
    assert 0.25 < len(moved) / len(KEYS) < 0.42  # ~1/3


def test_removing_a_replica_moves_only_its_keys():
    old = ["replica-0", "replica-1", "replica-2"]
    new = ["replica-0", "replica-2"]
    before = {k: rendezvous_choice(k, old) for k in KEYS}
    after = {k: rendezvous_choice(k, new) for k in KEYS}
    for k in KEYS:
        if before[k] != "replica-1":
            assert after[k] == before[k]
        else:
            assert after[k] in new


# ------------------------------------------------------- the router, in Serve's loop

from ray.serve._private.common import (  # noqa: E402
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve._private.request_router.common import ReplicaQueueLengthCache  # noqa: E402
from ray.serve.request_router import PendingRequest, RunningReplica  # noqa: E402

DEPLOYMENT = DeploymentID(name="TextEncoder", app_name="test")


class FakeReplica(RunningReplica):
    """In-memory replica, after Ray's own FakeRunningReplica (serve/_private/test_utils):
    answers queue-length probes with a set value, or never (``unresponsive``)."""

    def __init__(self, unique_id: str, queue_len: int = 0, max_ongoing_requests: int = 16):
        # RunningReplica.__init__ wants a live actor handle; skip it on purpose.
        self._replica_id = ReplicaID(unique_id=unique_id, deployment_id=DEPLOYMENT)
        self.queue_len = queue_len
        self.unresponsive = False
        self.probe_delay_s = 0.0
        self._max_ongoing_requests = max_ongoing_requests

    @property
    def replica_id(self) -> ReplicaID:
        return self._replica_id

    @property
    def node_id(self) -> str:
        return ""

    @property
    def availability_zone(self):
        return None

    @property
    def multiplexed_model_ids(self):
        return set()

    @property
    def max_ongoing_requests(self) -> int:
        return self._max_ongoing_requests

    async def get_queue_len(self, *, deadline_s: float) -> int:
        if self.unresponsive:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.probe_delay_s)
        return self.queue_len

    def push_proxy_handle(self, handle):
        pass


def _request(routing_key=None, internal_request_id=None) -> PendingRequest:
    kwargs = {"namespace": "studio-portrait"}
    if routing_key is not None:
        kwargs["routing_key"] = routing_key
    rid = uuid.uuid4().hex
    return PendingRequest(
        args=[["a portrait"]],
        kwargs=kwargs,
        metadata=RequestMetadata(request_id=rid, internal_request_id=internal_request_id or rid, call_method="encode"),
    )


async def _router(replicas, **router_kwargs) -> PrefixAffinityRouter:
    router = PrefixAffinityRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.UNKNOWN,
        use_replica_queue_len_cache=True,  # what Serve passes outside Ray Client
    )
    router.initialize_state(**router_kwargs)
    router.update_replicas(replicas)
    # update_replicas probes the new replicas in a background task; let it finish, or
    # its late cache writes would undo the loads that a test sets next.
    for _ in range(500):
        if all(router.replica_queue_len_cache.get(r.replica_id) is not None for r in replicas):
            return router
        await asyncio.sleep(0.01)
    raise AssertionError("queue-length probes of the fake replicas never landed")


async def _route(router, request) -> str:
    """Route through Serve's real loop (routing task, ranks, queue-length selection)."""
    replica = await asyncio.wait_for(router._choose_replica_for_request(request), timeout=5)
    return replica.replica_id.unique_id


def _set_load(router, replica, queue_len):
    replica.queue_len = queue_len
    router.replica_queue_len_cache.update(replica.replica_id, queue_len)


def test_idle_preferred_replica_gets_its_keys():
    async def main():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = await _router([a, b])
        keys = KEYS[:40]
        routed = []
        for k in keys:
            routed.append(await _route(router, _request(k)))
            _set_load(router, a, 0)  # the request completed
            _set_load(router, b, 0)
        assert routed == [rendezvous_choice(k, ["a", "b"]) for k in keys]
        assert set(routed) == {"a", "b"}  # both owners occur, so this is not luck

    asyncio.run(main())


def test_busy_preferred_replica_spills_to_the_idle_one():
    async def main():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = await _router([a, b], busy_threshold=2)
        by_id = {"a": a, "b": b}
        for key in KEYS[:20]:
            owner = rendezvous_choice(key, ["a", "b"])
            other = "b" if owner == "a" else "a"
            _set_load(router, by_id[owner], 2)
            _set_load(router, by_id[other], 0)
            assert await _route(router, _request(key)) == other
            # Just under the threshold it stays.
            _set_load(router, by_id[owner], 1)
            assert await _route(router, _request(key)) == owner

    asyncio.run(main())


def test_threshold_comes_from_router_kwargs():
    async def main():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = await _router([a, b], busy_threshold=3)
        key = KEYS[0]
        owner = rendezvous_choice(key, ["a", "b"])
        other = "b" if owner == "a" else "a"
        by_id = {"a": a, "b": b}
        _set_load(router, by_id[owner], 4)  # busy at 3, not under the default
        _set_load(router, by_id[other], 0)
        assert await _route(router, _request(key)) == other

    assert DEFAULT_BUSY_THRESHOLD > 4
    asyncio.run(main())


def test_default_threshold_is_the_encoder_batch_size_the_served_config_sets():
    # One source: the router spills at the encoder's batch size (measured in README), and
    # serve_config.yaml, which names it explicitly, says the same.
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    app = config["applications"][0]
    encoder = next(d for d in app["deployments"] if d["name"] == "TextEncoder")
    assert encoder["request_router_config"]["request_router_kwargs"]["busy_threshold"] == DEFAULT_BUSY_THRESHOLD
    assert app["args"]["text_encoder"]["batch"]["max_batch_size"] == DEFAULT_BUSY_THRESHOLD == MAX_BATCH_SIZE


def test_busy_preferred_keeps_the_request_when_others_are_as_busy():
    async def main():
        replicas = [FakeReplica(x) for x in "abc"]
        router = await _router(replicas, busy_threshold=2)
        for key in KEYS[:20]:
            for r in replicas:
                _set_load(router, r, 3)
            assert await _route(router, _request(key)) == rendezvous_choice(key, "abc")

    asyncio.run(main())


def test_unresponsive_preferred_replica_is_skipped():
    async def main():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = await _router([a, b])
        key = KEYS[0]
        owner = {"a": a, "b": b}[rendezvous_choice(key, ["a", "b"])]
        owner.unresponsive = True
        router.replica_queue_len_cache.invalidate_key(owner.replica_id)
        assert await _route(router, _request(key)) != owner.replica_id.unique_id

    asyncio.run(main())


def test_full_preferred_replica_is_never_chosen():
    # max_ongoing_requests below the threshold still caps it.
    async def main():
        a, b = FakeReplica("a", max_ongoing_requests=1), FakeReplica("b", max_ongoing_requests=1)
        router = await _router([a, b], busy_threshold=4)
        key = KEYS[0]
        owner = rendezvous_choice(key, ["a", "b"])
        _set_load(router, {"a": a, "b": b}[owner], 1)
        assert await _route(router, _request(key)) != owner

    asyncio.run(main())


def test_requests_without_a_key_use_both_replicas():
    async def main():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = await _router([a, b])
        routed = Counter([await _route(router, _request(None)) for _ in range(60)])
        assert routed["a"] > 5 and routed["b"] > 5
        # An empty key counts as none.
        routed = Counter([await _route(router, _request("")) for _ in range(60)])
        assert routed["a"] > 5 and routed["b"] > 5

    asyncio.run(main())


def test_concurrent_requests_each_get_their_own_owner():
    # Many requests in flight at once, and one replica slow to answer probes, so routing
    # tasks finish out of order: each replica found must go to the request it was found
    # for. (With Serve's FIFOMixin it would go to the oldest pending request instead.)
    async def main():
        replicas = [FakeReplica(x) for x in "abcd"]
        router = await _router(replicas, busy_threshold=1000)
        replicas[0].probe_delay_s = 0.03  # well inside the 0.1 s probe deadline
        # Every lookup probes: no cached queue lengths.
        router._replica_queue_len_cache = ReplicaQueueLengthCache(staleness_timeout_s=-1)
        keys = KEYS[:64]
        routed = await asyncio.gather(*(_route(router, _request(k)) for k in keys))
        assert list(routed) == [rendezvous_choice(k, "abcd") for k in keys]

    asyncio.run(main())


def test_concurrent_calls_sharing_an_internal_request_id_all_get_a_replica():
    # Calls that one replica makes while serving one request share its
    # internal_request_id. Serve's exact-match hand-off keeps one of them in its index,
    # so with the base class the others never get a replica (the caller hangs).
    async def main():
        replicas = [FakeReplica(x) for x in "ab"]
        router = await _router(replicas, busy_threshold=1000)
        keys = KEYS[:6] + [None, None]
        routed = await asyncio.gather(*(_route(router, _request(k, "parent-1")) for k in keys))
        assert list(routed[:6]) == [rendezvous_choice(k, "ab") for k in keys[:6]]

    asyncio.run(main())


def test_same_key_burst_spills_once_the_owner_has_threshold_requests():
    # A burst is routed before any of it is sent; each pick must count against the
    # replica at once, or every request of the burst sees the owner idle.
    async def main():
        replicas = [FakeReplica(x) for x in "ab"]
        router = await _router(replicas, busy_threshold=2)
        key = KEYS[0]
        owner = rendezvous_choice(key, "ab")
        routed = await asyncio.gather(*(_route(router, _request(key)) for _ in range(4)))
        assert Counter(routed) == {owner: 2, ("b" if owner == "a" else "a"): 2}
        # The framework's own count on send does not add a second time.
        for rid in routed:
            router.on_send_request(router.curr_replicas[ReplicaID(rid, DEPLOYMENT)].replica_id)
        cache = router.replica_queue_len_cache
        assert [cache.get(r.replica_id) for r in replicas] == [2, 2]
        router.on_send_request(replicas[0].replica_id)  # a send it did not pick: counted
        assert cache.get(replicas[0].replica_id) == 3

    asyncio.run(main())


@pytest.mark.parametrize(
    "kwargs",
    [{"busy_threshold": 0}, {"busy_threshold": True}, {"busy_threshold": "2"}, {"routing_key_kwarg": ""}],
)
def test_bad_router_kwargs_are_rejected(kwargs):
    async def main():
        router = PrefixAffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
        with pytest.raises(ValueError):
            router.initialize_state(**kwargs)

    asyncio.run(main())


def test_unknown_router_kwarg_is_an_error():
    async def main():
        router = PrefixAffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
        with pytest.raises(TypeError):
            router.initialize_state(busy_treshold=3)  # typo must not pass silently

    asyncio.run(main())
