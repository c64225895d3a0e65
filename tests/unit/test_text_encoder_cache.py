"""The text encoder's prefix cache: exact (bit for bit), bounded, isolated, self-healing."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from deployments.text_encoder.block_pool import BlockPool, chain_hashes
from deployments.text_encoder.engine import TextEncoderEngine
from deployments.text_encoder.prefix_forward import CachedPrefix, PrefixReuseForward
from deployments.text_encoder.watchdog import HitRateWatchdog

WINDOW = 77
VOCAB = 49406  # ids below BOS/EOS


@pytest.fixture(scope="module")
def reference_engine(tiny_model_path):
    return TextEncoderEngine(tiny_model_path, num_threads=1, cache={"enabled": False})


def cached_engine(path, **cache) -> TextEncoderEngine:
    return TextEncoderEngine(path, num_threads=1, cache=cache)


def random_rows(rng: random.Random, prefix: list[int], count: int) -> torch.Tensor:
    rows = [prefix + [rng.randrange(VOCAB) for _ in range(WINDOW - len(prefix))] for _ in range(count)]
    return torch.tensor(rows)


def reference(engine, ids) -> torch.Tensor:
    return engine.encode_token_ids(ids, ["default"] * len(ids))[0]


def check_invariants(pool: BlockPool) -> None:
    """The pool's accounting adds up, its free list holds exactly the unreferenced entries, and
    every cached block stays reachable from its root."""
    entries = pool._entries
    assert pool.stats.bytes_in_use == sum(e.nbytes for e in entries.values()) <= pool.max_bytes
    assert set(pool._free) == {k for k, e in entries.items() if e.ref_count == 0}
    for entry in entries.values():
        assert entry.parent is None or entry.parent.key in entries, "orphaned chain"
        assert entry.num_children == sum(1 for e in entries.values() if e.parent is entry)


# -- the forward itself --------------------------------------------------------------------------
def test_prefix_forward_is_bit_identical_to_clip_text_model():
    """Several layers and heads (not the tiny model's shape): the cached path, with rows of
    different start positions in one batch, equals transformers' CLIPTextModel exactly."""
    torch.manual_seed(0)
    model = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=96,
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=6,
            max_position_embeddings=WINDOW,
            hidden_act="quick_gelu",
        )
    ).eval()
    forward = PrefixReuseForward(model)
    ids = torch.randint(0, VOCAB, (5, WINDOW))
    with torch.inference_mode():
        expected = model(ids)[0]
    full = forward(ids, [None] * 5)
    full.kv = [kv.clone() for kv in full.kv]  # views into the forward's workspace, reused by the next call
    assert torch.equal(full.hidden, expected)
    starts = [0, 16, 32, 64, 32]
    prefixes = [
        None if s == 0 else CachedPrefix([full.kv[i][:, :, :, :s].clone()], [full.hidden[i, :s].clone()])
        for i, s in enumerate(starts)
    ]
    resumed = forward(ids, prefixes)
    assert torch.equal(resumed.hidden, expected)
    for row in range(5):
        assert torch.equal(resumed.kv[row], full.kv[row])


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_every_prefix_length_is_bit_identical_on_the_sd15_shape(threads):
    """SD-1.5's text encoder shape (12 layers, width 768; random weights), every prefix length,
    batches of 1 and 2, 1 and 2 torch threads: a hit leaving few new positions used to differ
    by ~1e-6 (MKL's kernels for a handful of rows round differently; MIN_GEMM_ROWS pads them)."""
    torch.manual_seed(0)
    config = CLIPTextConfig(num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12)
    model = CLIPTextModel(config).eval()
    forward = PrefixReuseForward(model)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in (1, 2):
            ids = torch.randint(0, VOCAB, (batch, WINDOW))
            with torch.inference_mode():
                expected = model(ids)[0]
            full = forward(ids, [None] * batch)
            kv = [k.clone() for k in full.kv]
            assert torch.equal(full.hidden, expected)
            for start in range(1, WINDOW, batch):  # batch 2: every other length (CI time)
                prefixes = [CachedPrefix([kv[i][:, :, :, :start]], [expected[i, :start]]) for i in range(batch)]
                resumed = forward(ids, prefixes).hidden
                assert torch.equal(resumed, expected), (batch, start, (resumed - expected).abs().max().item())
    finally:
        torch.set_num_threads(previous)


# -- the engine: exactness -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_random_shared_prefixes_are_bit_exact(tiny_model_path, reference_engine, seed):
    """Property: whatever the prefix length, batch size and order of arrival, every output
    equals the uncached forward exactly, and full blocks of the shared prefix are reused."""
    rng = random.Random(seed)
    engine = cached_engine(tiny_model_path)
    prefix_len = rng.randrange(1, 70)
    prefix = [rng.randrange(VOCAB) for _ in range(prefix_len)]
    warm = random_rows(rng, prefix, 1)
    later = random_rows(rng, prefix, rng.randrange(1, 6))
    unrelated = random_rows(rng, [], 2)
    engine.encode_token_ids(warm, ["default"])
    batch = torch.cat([later, unrelated])
    order = list(range(len(batch)))
    rng.shuffle(order)
    batch = batch[order]
    hidden, cached = engine.encode_token_ids(batch, ["default"] * len(batch))
    assert torch.equal(hidden, reference(reference_engine, batch))
    full_blocks = prefix_len // 16
    for position, row in enumerate(order):
        assert cached[position] == (full_blocks * 16 if row < len(later) else 0)
    check_invariants(engine.pool)


def test_exact_hit_returns_stored_output_without_running_the_model(tiny_model_path, reference_engine):
    engine = cached_engine(tiny_model_path)
    calls = []
    forward = engine.forward
    engine.forward = lambda ids, prefixes: calls.append(len(ids)) or forward(ids, prefixes)
    texts = ["Asian man, age:35, smiling expression, wearing glasses", "blurry, deformed eyes, asymmetrical face"]
    first = engine.encode(texts)
    second = engine.encode(texts)
    assert calls == [2]
    assert second.cached_tokens == [WINDOW, WINDOW]
    assert torch.equal(first.hidden, second.hidden)
    assert torch.equal(second.hidden, reference_engine.encode(texts).hidden)


def test_identical_texts_in_one_batch_run_once(tiny_model_path):
    engine = cached_engine(tiny_model_path, exact_prompts=False, enabled=False)
    calls = []
    forward = engine.forward
    engine.forward = lambda ids, prefixes: calls.append(len(ids)) or forward(ids, prefixes)
    out = engine.encode(["a red hat", "a red hat", "blue"])
    assert calls == [2]
    assert out.cached_tokens == [0, WINDOW, 0]
    assert torch.equal(out.hidden[0], out.hidden[1])


def test_a_batch_serves_repeats_and_exact_hits_and_counts_them(tiny_model_path, reference_engine):
    engine = cached_engine(tiny_model_path)
    rng = random.Random(7)
    stored, new = random_rows(rng, [], 1), random_rows(rng, [], 1)
    engine.encode_token_ids(stored, ["default"])
    batch = torch.cat([new, stored, new, stored])  # a row to compute, an exact hit, and a repeat of each
    hidden, cached = engine.encode_token_ids(batch, ["default"] * 4)
    assert torch.equal(hidden, reference(reference_engine, batch))
    assert cached == [0, WINDOW, WINDOW, WINDOW]
    stats = engine.cache_info()["namespaces"]["default"]
    assert (stats["texts"], stats["exact_hits"], stats["misses"]) == (5, 3, 2)
    assert stats["cached_tokens"] == 3 * WINDOW
    assert engine.cache_info()["entries"] == len(engine.pool) > 0


def test_namespace_figures_are_kept_for_the_most_recent_namespaces(tiny_model_path, monkeypatch):
    monkeypatch.setattr("deployments.text_encoder.engine.MAX_NAMESPACES", 2)
    engine = cached_engine(tiny_model_path)
    for namespace in ("a", "b", "a", "c"):  # "b" is the least recently seen when "c" comes
        engine.encode(["a red hat"], namespace)
    assert set(engine.cache_info()["namespaces"]) == {"a", "c"}


def test_watchdog_forgets_the_least_recently_seen_namespace():
    watchdog = HitRateWatchdog(window=4, min_hit_rate=0.1, sketch_size=8, max_namespaces=2)
    chain = [b"block-1", b"block-2"]
    for namespace in ("a", "b", "b", "a", "c"):  # "b" is the least recently seen when "c" comes
        watchdog.observe(namespace, 0, WINDOW, chain, [1, 2, 3])
    assert watchdog.frequent_prefixes("a", 1) and not watchdog.frequent_prefixes("b", 1)


def test_image_prompt_embeddings_are_cached_by_pixels_least_recently_used_first(tiny_model_path):
    from PIL import Image

    from deployments.text_encoder.image_prompt import ImagePromptEncoderEngine

    engine = ImagePromptEncoderEngine(tiny_model_path, num_threads=1, cache_entries=1)
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    hits = [engine.encode(image).cache_hit for image in (red, red.copy(), blue, red)]
    assert hits == [False, True, False, False]  # one entry: blue evicted red


def test_cache_disabled_never_stores(tiny_model_path):
    engine = cached_engine(tiny_model_path, enabled=False)
    engine.encode(["a", "b"])
    assert engine.encode(["a", "b"]).cached_tokens == [0, 0]
    assert len(engine.pool) == 0


# -- namespaces ------------------------------------------------------------------------------------
def test_namespaces_are_isolated_when_configured(tiny_model_path):
    rng = random.Random(1)
    ids = random_rows(rng, [], 1)
    isolated = cached_engine(tiny_model_path)
    isolated.encode_token_ids(ids, ["tenant-a"])
    assert isolated.encode_token_ids(ids, ["tenant-b"])[1] == [0]
    assert isolated.encode_token_ids(ids, ["tenant-a"])[1] == [WINDOW]
    shared = cached_engine(tiny_model_path, isolate_namespaces=False)
    shared.encode_token_ids(ids, ["tenant-a"])
    assert shared.encode_token_ids(ids, ["tenant-b"])[1] == [WINDOW]
    info = isolated.cache_info()["namespaces"]
    assert (info["tenant-a"]["exact_hits"], info["tenant-b"]["exact_hits"]) == (1, 0)


def test_namespace_share_caps_its_bytes(tiny_model_path):
    engine = cached_engine(tiny_model_path, max_mib=2, namespace_shares={"small": 0.1})
    rng = random.Random(2)
    for _ in range(12):
        engine.encode_token_ids(random_rows(rng, [], 2), ["small", "big"])
        assert engine.pool.namespace_bytes("small") <= 0.1 * engine.pool.max_bytes
        check_invariants(engine.pool)
    assert engine.pool.namespace_bytes("big") > engine.pool.namespace_bytes("small")


# -- the block pool --------------------------------------------------------------------------------
def block(nbytes: int = 100) -> tuple[torch.Tensor]:
    return (torch.zeros(nbytes, dtype=torch.uint8),)


def test_eviction_takes_least_recently_used_leaves_first():
    pool = BlockPool(max_bytes=400)
    a1 = pool.insert(b"a1", "ns", block())
    a2 = pool.insert(b"a2", "ns", block(), parent=a1)
    b1 = pool.insert(b"b1", "ns", block())
    b2 = pool.insert(b"b2", "ns", block(), parent=b1)
    pool.get(b"a1")  # a1 is now the most recent, but its child a2 must go before it
    pool.insert(b"c1", "ns", block())
    assert b"a2" not in pool and {b"a1", b"b1", b"b2"} <= set(k for k in (b"a1", b"b1", b"b2") if k in pool)
    pool.insert(b"d1", "ns", block())  # next oldest leaf: b2 (older than a1, a leaf now that a2 is gone)
    assert b"b2" not in pool and b"a1" in pool
    check_invariants(pool)
    assert pool.stats.evicted == 2
    del a2, b2


def test_blocks_in_use_are_never_evicted_and_inserts_that_cannot_fit_are_refused():
    pool = BlockPool(max_bytes=200)
    first = pool.insert(b"x", "ns", block())
    second = pool.insert(b"y", "ns", block(), parent=first)
    held = pool.acquire_chain([b"x", b"y"])
    assert held == [first, second] and (first.ref_count, second.ref_count) == (1, 1)
    assert pool.insert(b"z", "ns", block()) is None  # everything evictable is in use
    assert pool.stats.rejected == 1 and b"x" in pool and b"y" in pool
    pool.release(held)
    assert pool.insert(b"z", "ns", block()) is not None  # now the free leaf y goes
    assert b"y" not in pool and b"x" in pool
    with pytest.raises(RuntimeError):
        pool.release([first])
    check_invariants(pool)


def test_byte_budget_holds_under_random_operations():
    rng = random.Random(3)
    pool = BlockPool(max_bytes=5_000, namespace_shares={"a": 0.5})
    held = []
    for step in range(2_000):
        op = rng.random()
        if op < 0.6:
            parent_key = rng.choice([None, *list(pool._entries)[:20]])
            parent = pool.get(parent_key) if parent_key else None
            pool.insert(rng.randbytes(16), rng.choice("ab"), block(rng.randrange(50, 700)), parent)
        elif op < 0.8 and len(pool):
            held.append(pool.acquire_chain([rng.choice(list(pool._entries))]))
        elif held:
            pool.release(held.pop(rng.randrange(len(held))))
        assert pool.stats.bytes_in_use <= pool.max_bytes
        assert pool.namespace_bytes("a") <= 2_500
        if step % 100 == 0:
            check_invariants(pool)
    for chain in held:
        pool.release(chain)
    check_invariants(pool)
    assert pool.stats.evicted > 0


def test_chain_hashes_name_prefixes_not_blocks():
    ids = list(range(40))
    other = [99] * 16 + list(range(16, 40))  # same second block, different first block
    assert len(chain_hashes(ids, 16)) == 2
    assert chain_hashes(ids, 16)[0] == chain_hashes(ids[:16] + [5] * 24, 16)[0]
    assert chain_hashes(ids, 16)[1] != chain_hashes(other, 16)[1]
    assert chain_hashes(ids, 16, ("model", "a")) != chain_hashes(ids, 16, ("model", "b"))


# -- the watchdog ----------------------------------------------------------------------------------
def hot_rate(engine, rng, template, rounds, reference_engine) -> float:
    """Each round: 4 one-off prompts, then one prompt on `template`. Returns the fraction of
    template prompts that found the template's 2 full blocks cached. Outputs must stay exact."""
    hits = 0
    for _ in range(rounds):
        for ids in (random_rows(rng, [], 4), random_rows(rng, template, 1)):
            hidden, cached = engine.encode_token_ids(ids, ["default"] * len(ids))
            assert torch.equal(hidden, reference(reference_engine, ids))
        hits += cached[-1] == 32
    return hits / rounds


def test_watchdog_rebuilds_and_recovers_hit_rate_on_a_shifting_workload(tiny_model_path, reference_engine, caplog):
    """The budget holds ~11 blocks; the one-off prompts between two uses of a template bring 16,
    so plain LRU always loses the template. The watchdog sees the rolling hit rate at 0,
    re-warms and pins the frequent prefix, and template prompts hit from then on; when the
    workload shifts to a second template it fires again and moves the pin."""
    engine = cached_engine(
        tiny_model_path,
        max_mib=0.4,
        exact_prompts=False,
        watchdog={"window": 15, "min_hit_rate": 0.05, "warm_prefixes": 1, "sketch_size": 256},
    )
    rng = random.Random(4)
    template_a = [rng.randrange(VOCAB) for _ in range(40)]
    template_b = [rng.randrange(VOCAB) for _ in range(40)]
    rebuilds = lambda: engine.cache_info()["namespaces"]["default"]["rebuilds"]  # noqa: E731
    with caplog.at_level("WARNING", logger="deployments.text_encoder.engine"):
        before = hot_rate(engine, rng, template_a, 2, reference_engine)
        assert before == 0.0 and rebuilds() == 0  # plain LRU: the flood evicts the template
        hot_rate(engine, rng, template_a, 10, reference_engine)  # the rate stays at 0: rebuild
        after_a = hot_rate(engine, rng, template_a, 6, reference_engine)
        rebuilds_a = rebuilds()
        hot_rate(engine, rng, template_b, 12, reference_engine)  # the workload shifts
        after_b = hot_rate(engine, rng, template_b, 6, reference_engine)
    assert rebuilds_a >= 1 and after_a == 1.0  # pinned: every template prompt hits both blocks
    assert rebuilds() > rebuilds_a and after_b == 1.0
    assert "text encoder cache rebuilt" in caplog.text
    check_invariants(engine.pool)
