"""Timing several ways of doing one thing in the same process, fairly, on a CPU.

The ways take turns (round after round), so the machine's drift falls on all of them alike.
Each turn starts with a pause and an untimed call: ONNX Runtime's and OpenMP's thread pools
keep spinning for a while after a call, and whatever is timed right after runs on the cores
they are burning (measured: torch fp32 67 ms timed right after an ONNX Runtime forward, 29 ms
settled).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

SETTLE_S = 0.3  # longer than OpenMP's default spin (200 ms) and ONNX Runtime's
PER_TURN = 3  # timed calls per turn


def time_in_turns(
    calls: Mapping[str, Callable[[], object]], rounds: int, per_turn: int = PER_TURN, settle_s: float = SETTLE_S
) -> dict[str, list[float]]:
    """ms of each call, `rounds` x `per_turn` timings each: per round every call gets one turn
    (in reversed order every other round), a pause, an untimed call, then `per_turn` timed ones."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds):
        names = list(calls) if round_index % 2 == 0 else list(reversed(list(calls)))
        for name in names:
            time.sleep(settle_s)
            calls[name]()
            for _ in range(per_turn):
                start = time.perf_counter()
                calls[name]()
                times[name].append((time.perf_counter() - start) * 1000.0)
    return times
