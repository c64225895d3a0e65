"""Captions for rendered portraits: the prompt optimizer's structured form, varied English
sentences with attributes randomly left out, and an empty caption for classifier-free guidance.

A caption never names what the picture does not show; leaving an attribute out teaches the
model that an unnamed attribute may take any value.
"""

from __future__ import annotations

import random
from typing import Literal

from deployments.models.portrait.attributes import AGE_YEARS, PortraitAttributes

CaptionForm = Literal["structured", "sentence", "empty"]
IdentityTerm = Literal["ethnicity", "hair"]  # the structured caption's terms naming a face's own traits

EMPTY_SHARE = 0.1
STRUCTURED_SHARE = 0.45  # of the non-empty captions
KEEP_SHARE = 0.75  # each attribute's chance to be named in a caption

EXPRESSION_WORDS = {
    "smiling expression": ("smiling", "with a smile"),
    "laughing expression": ("laughing", "laughing out loud"),
    "neutral": ("with a neutral expression", "expressionless"),
    "serious expression": ("serious", "with a stern look"),
    "sad expression": ("sad", "looking sad"),
    "surprised expression": ("surprised", "looking astonished"),
    "angry expression": ("angry", "frowning angrily"),
}
AGE_WORDS = {"child": "young", "young": "young", "middle-aged": "middle-aged", "old": "elderly"}
VIEW_WORDS = {
    "front view": "facing the camera",
    "three quarter view": "in three quarter view",
    "side profile": "in side profile",
}
BACKGROUND_WORDS = {"outdoors": "outdoors", "studio background": "in a photo studio"}


def caption_form(rng: random.Random) -> CaptionForm:
    roll = rng.random()
    if roll < EMPTY_SHARE:
        return "empty"
    return "structured" if roll < EMPTY_SHARE + (1 - EMPTY_SHARE) * STRUCTURED_SHARE else "sentence"


def caption(attributes: PortraitAttributes, rng: random.Random) -> str:
    """A random caption of `attributes` in a random form."""
    form = caption_form(rng)
    if form == "empty":
        return ""
    if form == "structured":
        return structured_caption(attributes, rng, keep=KEEP_SHARE)
    return sentence_caption(attributes, rng, keep=KEEP_SHARE)


def hair_phrase(attributes: PortraitAttributes) -> str:
    """The hair as the optimizer spells it: `bald`, or `<style> <colour> hair` (`long red hair`,
    `bob black hair`; it reads nothing from "black hair, bob")."""
    if attributes.hair_style == "bald":
        return "bald"
    return f"{attributes.hair_style} {attributes.hair_color} hair"


def structured_caption(
    attributes: PortraitAttributes,
    rng: random.Random | None = None,
    keep: float = 1.0,
    *,
    leave_out: frozenset[IdentityTerm] = frozenset(),
    always: frozenset[IdentityTerm] = frozenset(),
) -> str:
    """`Asian woman, age:70, smiling expression, wearing round glasses, short white hair, ...`:
    the optimizer's key order; each attribute kept with probability `keep` (all with keep=1).
    `leave_out` and `always` override the draw for the identity terms (the image-prompt
    adapter's captions leave a face's traits to the reference image); the random draws are the
    same either way."""
    a = attributes

    def kept(term: IdentityTerm | None = None) -> bool:
        drawn = rng is None or rng.random() < keep
        return term not in leave_out and (drawn or term in always)

    terms: list[str] = []
    identity = f"{a.ethnicity} {a.identity}" if kept("ethnicity") else a.identity
    terms.append(identity)
    if kept():
        low, high = AGE_YEARS[a.age]
        terms.append(f"age:{(low + high) // 2 if rng is None else rng.randint(low, high)}")
    if kept():
        terms.append(a.expression)
    if a.glasses != "no glasses" and kept():
        terms.append(a.glasses)
    if "headscarf" not in a.accessories and kept("hair"):
        terms.append(hair_phrase(a))
    if a.identity == "man" and kept():
        terms.append(a.facial_hair)
    for value in (a.view, a.lighting, a.background):
        if kept():
            terms.append(value)
    terms.extend(sorted(x for x in a.accessories if kept()))
    return ", ".join(terms)


def sentence_caption(attributes: PortraitAttributes, rng: random.Random, keep: float = KEEP_SHARE) -> str:
    """A natural English sentence naming a random subset of the attributes."""
    a = attributes

    def kept() -> bool:
        return rng.random() < keep

    noun = a.identity
    words = [AGE_WORDS[a.age]] if kept() and a.age != "child" else []
    if kept():
        words.append(a.ethnicity)
    subject = " ".join([*words, noun])
    details: list[str] = []
    if kept():
        details.append(rng.choice(EXPRESSION_WORDS[a.expression]))
    withs: list[str] = []
    if "headscarf" not in a.accessories and kept():
        withs.append(f"{a.hair_style} {a.hair_color} hair" if a.hair_style != "bald" else "a bald head")
    if a.identity == "man" and a.facial_hair != "clean shaven" and kept():
        withs.append(f"a {a.facial_hair}" if a.facial_hair != "stubble" else "stubble")
    if a.glasses != "no glasses" and kept():
        withs.append(a.glasses.removeprefix("wearing "))
    if kept():
        withs.append(f"{a.eye_color} eyes")
    if kept():
        withs.append(f"{'an' if a.face_shape == 'oval' else 'a'} {a.face_shape} face")
    accessories = [x for x in sorted(a.accessories) if kept()]
    if accessories:
        withs.append("a " + " and a ".join("pair of earrings" if x == "earrings" else x for x in accessories))
    if withs:
        details.append("with " + ", ".join(withs[:-1]) + (" and " if len(withs) > 1 else "") + withs[-1])
    if kept():
        details.append(VIEW_WORDS[a.view])
    if kept():
        details.append(a.lighting if a.lighting != "backlit" else "backlit by the sun")
    if kept():
        details.append(BACKGROUND_WORDS.get(a.background, "against a plain " + a.background))
    opener = rng.choice(("a portrait of", "a photo of", "a picture of", "", "headshot of"))
    article = "an" if subject[0].lower() in "aeiou" else "a"
    head = f"{opener} {article} {subject}".strip()
    return ", ".join([head, *details])
