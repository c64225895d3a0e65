"""Attribute values as the code holds them, and as the prompt and the HTTP API say them.

Inside the code every key (identity, age, expression, glasses, hair, facial_hair, view,
lighting, background, accessories) maps to a list of values in the order the instruction
named them. The prompt says a key as one term: its values comma-separated, except the kinds
of facial hair, which are one phrase ("beard and mustache"); accessories are terms of their
own. The HTTP API (`/v1/prompts/optimize`) shows each key's term, and accessories as a list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Attributes = dict[str, list[str]]

ACCESSORIES = "accessories"  # each accessory is a term of its own
FACIAL_HAIR = "facial_hair"  # the kinds are one phrase: "beard and mustache"


def phrases(key: str, values: Sequence[str]) -> list[str]:
    """The key's values as the prompt words them: facial hair kinds joined into one phrase."""
    return [" and ".join(values)] if key == FACIAL_HAIR and values else list(values)


def term(key: str, values: Sequence[str]) -> str:
    """The key as one prompt term: "outdoors, blurred background"."""
    return ", ".join(phrases(key, values))


def terms(attributes: Mapping[str, Sequence[str]]) -> list[str]:
    """Every key's term, each accessory apart."""
    return [t for key, values in attributes.items() if values for t in _key_terms(key, values)]


def _key_terms(key: str, values: Sequence[str]) -> list[str]:
    return list(values) if key == ACCESSORIES else [term(key, values)]


def as_text(attributes: Mapping[str, Sequence[str]]) -> dict[str, str | list[str]]:
    """The HTTP shape: key -> its term, accessories -> a list."""
    return {key: list(values) if key == ACCESSORIES else term(key, values) for key, values in attributes.items()}
