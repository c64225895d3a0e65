"""Adherence: the share of a prompt's drawable attributes that the judge finds in an image.

The prompt is read by the prompt optimizer's parser (its attributes, key -> values); each value
the renderer can draw becomes an expectation on one judge head, with the values that satisfy it.
Values nothing draws (a headshot, an office, a tie) are not scored and are listed as such.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deployments.models.portrait.attributes import (
    ACCESSORIES,
    BACKGROUNDS,
    ETHNICITIES,
    EXPRESSIONS,
    FACIAL_HAIR,
    GLASSES,
    HAIR_COLORS,
    HAIR_STYLES,
    LIGHTINGS,
    VIEWS,
    age_group_of,
)
from deployments.models.portrait.judge import Reading

AGE_WORDS = {
    "teenage": "child",
    "young": "young",
    "middle-aged": "middle-aged",
    "middle aged": "middle-aged",
    "older": "old",
    "old": "old",
    "elderly": "old",
    "senior": "old",
}
HAIR_COLOR_ALIASES = {"grey": frozenset({"gray"})}
FACIAL_HAIR_ALIASES = {"full beard": "beard", "goatee": "beard"}
GLASSES_KINDS = frozenset(g for g in GLASSES if g not in ("no glasses", "wearing sunglasses"))
_AGE_NUMBER = re.compile(r"age:(\d+)")
# Background colours the lexicon does not know yet stay loose text in the prompt: read them there.
_PLAIN_BACKGROUND = re.compile(
    r"\b(" + "|".join(b.removesuffix(" background") for b in BACKGROUNDS if b.endswith(" background")) + r")"
    r" (?:background|backdrop)\b"
)


@dataclass(frozen=True)
class Expectation:
    """One asked attribute: the judge head that shows it and the values that satisfy it."""

    asked: str  # as the prompt said it
    head: str  # a judge head, or "accessory"
    accepted: frozenset[str]

    def met_by(self, reading: Reading) -> bool:
        if self.head == "accessory":
            return self.accepted <= reading.accessories
        return reading.values[self.head] in self.accepted


@dataclass(frozen=True)
class PromptExpectations:
    expected: tuple[Expectation, ...]
    not_drawable: tuple[str, ...]  # asked, but nothing the renderer draws shows it

    def adherence(self, reading: Reading) -> float | None:
        """Share of the expectations the reading meets; None when the prompt asks nothing drawable."""
        if not self.expected:
            return None
        return sum(e.met_by(reading) for e in self.expected) / len(self.expected)

    def misses(self, reading: Reading) -> list[str]:
        return [e.asked for e in self.expected if not e.met_by(reading)]


def expectations(attributes: Mapping[str, Sequence[str]], prompt: str = "") -> PromptExpectations:
    """What an image of `attributes` (the optimizer's key -> values) must show; `prompt`, the
    prompt text, supplies what the lexicon leaves loose (plain background colours)."""
    expected: list[Expectation] = []
    skipped: list[str] = []
    for key, values in attributes.items():
        for value in values:
            found = _expectations_of(key, value)
            expected.extend(found)
            if not found:
                skipped.append(value)
    if not attributes.get("background"):
        for colour in _PLAIN_BACKGROUND.findall(prompt.lower()):
            expected.append(Expectation(f"{colour} background", "background", frozenset({f"{colour} background"})))
    return PromptExpectations(tuple(expected), tuple(skipped))


def _expectations_of(key: str, value: str) -> list[Expectation]:
    if key == "identity":
        return _identity(value)
    if key == "age":
        return _age(value)
    if key == "hair":
        return _hair(value)
    if key == "facial_hair":
        kinds = [FACIAL_HAIR_ALIASES.get(kind.strip(), kind.strip()) for kind in value.split(" and ")]
        return [Expectation(value, "facial_hair", frozenset({k})) for k in kinds if k in FACIAL_HAIR]
    if key == "glasses" and value in GLASSES:
        accepted = GLASSES_KINDS if value == "wearing glasses" else frozenset({value})
        return [Expectation(value, "glasses", accepted)]
    if key == "accessories" and value in ACCESSORIES:
        return [Expectation(value, "accessory", frozenset({value}))]
    tables = {"expression": EXPRESSIONS, "view": VIEWS, "lighting": LIGHTINGS, "background": BACKGROUNDS}
    if key in tables and value in tables[key]:
        return [Expectation(value, key, frozenset({value}))]
    return []


def _identity(value: str) -> list[Expectation]:
    found: list[Expectation] = []
    for ethnicity in sorted(ETHNICITIES, key=len, reverse=True):  # "South Asian" before "Asian"
        if value.startswith(ethnicity + " "):
            found.append(Expectation(ethnicity, "ethnicity", frozenset({ethnicity})))
            value = value.removeprefix(ethnicity + " ")
            break
    if value in ("man", "woman", "boy", "girl"):
        found.append(Expectation(value, "identity", frozenset({value})))
    return found


def _age(value: str) -> list[Expectation]:
    number = _AGE_NUMBER.fullmatch(value)
    group = age_group_of(int(number.group(1))) if number else AGE_WORDS.get(value)
    return [Expectation(value, "age", frozenset({group}))] if group else []


def _hair(value: str) -> list[Expectation]:
    if value == "bald":
        return [Expectation(value, "hair_style", frozenset({"bald"}))]
    words = value.removesuffix(" hair").split()
    found = []
    for word in words:
        if word in HAIR_STYLES:
            found.append(Expectation(word, "hair_style", frozenset({word})))
        elif word in HAIR_COLORS or word in HAIR_COLOR_ALIASES:
            found.append(Expectation(word, "hair_color", HAIR_COLOR_ALIASES.get(word, frozenset({word}))))
    return found
