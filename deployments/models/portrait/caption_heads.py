"""Linear read-outs of a caption's attributes from the text encoder's pooled state: a training
aid, never shipped. Trained from scratch beside the UNet, the text encoder kept only the words
whose effect on the picture is large: "smiling" and "sad" in the same caption changed its
output by 5% at the word and by nothing after it (hair colours: 137%), so the UNet had nothing
to draw an expression from. Asking the pooled state to name every attribute of a fully named
caption keeps each word distinguishable, as a pretrained CLIP's would be."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deployments.models.portrait.attributes import ATTRIBUTE_VALUES, PortraitAttributes
from deployments.models.portrait.captions import sentence_caption, structured_caption
from deployments.models.portrait.held_out import training_attributes

UNSAID = -100  # cross_entropy's ignore_index: the caption does not say this attribute
# The attributes read out, with their values (each a class): all single-valued ones but the
# background, the one word the encoder already passed on most strongly.
HEAD_VALUES: dict[str, tuple[str, ...]] = {k: v for k, v in ATTRIBUTE_VALUES.items() if k != "background"}


class CaptionHeads(nn.Module):
    """One linear classifier per attribute on the pooled text state."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(values)) for name, values in HEAD_VALUES.items()})

    def loss(self, pooled: torch.Tensor, captions: Sequence[NamedCaption]) -> torch.Tensor:
        """Mean cross-entropy over the heads of the true values each caption says."""
        losses = []
        for name, values in HEAD_VALUES.items():
            target = [values.index(getattr(c.attributes, name)) if name in c.says else UNSAID for c in captions]
            if any(t != UNSAID for t in target):
                logits = self.heads[name](pooled)
                losses.append(nn.functional.cross_entropy(logits, torch.tensor(target), ignore_index=UNSAID))
        return torch.stack(losses).mean()


@dataclass(frozen=True)
class NamedCaption:
    """A caption and the attributes whose value it says (by naming it, or by the full form's
    silence: no glasses, a clean-shaven man)."""

    attributes: PortraitAttributes
    text: str
    says: frozenset[str]


def named_captions(rng: random.Random, count: int) -> list[NamedCaption]:
    """`count` fresh training portraits, each with a caption that names all it can (half
    structured, half sentences). What a full caption leaves out has one value (no glasses, a
    clean-shaven man, a child's age); the structured form never names the face shape or eye
    colour, and a headscarf hides the hair."""
    captions = []
    for i in range(count):
        a = training_attributes(rng)
        structured = i % 2 == 0
        text = structured_caption(a) if structured else sentence_caption(a, rng, keep=1.0)
        unsaid = {"face_shape", "eye_color"} if structured else set()
        if "headscarf" in a.accessories:
            unsaid |= {"hair_color", "hair_style"}
        captions.append(NamedCaption(a, text, frozenset(HEAD_VALUES) - unsaid))
    return captions
