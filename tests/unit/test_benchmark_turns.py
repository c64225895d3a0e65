"""benchmarks/turns.py: the ways being timed take turns, each turn opens with an untimed call."""

from __future__ import annotations

from benchmarks.turns import time_in_turns


def test_calls_take_turns_reversed_every_other_round_and_open_each_turn_untimed():
    calls: list[str] = []
    times = time_in_turns(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, per_turn=2, settle_s=0.0
    )
    # round 0: a's turn then b's; round 1 reversed; each turn = one untimed call + 2 timed ones
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert {name: len(values) for name, values in times.items()} == {"a": 4, "b": 4}
    assert all(value >= 0 for values in times.values() for value in values)
