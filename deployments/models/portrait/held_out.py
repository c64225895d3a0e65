"""Attribute combinations held out of training: the portrait model is judged on prompts it
never saw. Fixed by a seed of their own; the training sampler refuses them.
"""

from __future__ import annotations

import random
from functools import cache

from deployments.models.portrait.attributes import PortraitAttributes, sample_attributes

HELD_OUT_COUNT = 300
HELD_OUT_SEED = "portrait-held-out-v1"  # never change: the set is frozen


@cache
def held_out_combinations() -> tuple[PortraitAttributes, ...]:
    rng = random.Random(HELD_OUT_SEED)
    combinations: dict[PortraitAttributes, None] = {}
    while len(combinations) < HELD_OUT_COUNT:
        combinations[sample_attributes(rng)] = None
    return tuple(combinations)


@cache
def _held_out_set() -> frozenset[PortraitAttributes]:
    return frozenset(held_out_combinations())


def is_held_out(attributes: PortraitAttributes) -> bool:
    return attributes in _held_out_set()


def training_attributes(rng: random.Random) -> PortraitAttributes:
    """A random portrait that is not one of the held-out combinations."""
    while True:
        attributes = sample_attributes(rng)
        if not is_held_out(attributes):
            return attributes
