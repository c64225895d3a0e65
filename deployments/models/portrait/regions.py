"""Where a render's face and hair, its hair, or its eyes are: the masks a user paints in the
playground for a face fusion, a hair-colour or an "add glasses" edit, found from the renderer itself (benchmarks and
tests paint them this way). The render is drawn again at the same seed with other face traits
(or with glasses): the pixels that change, widened by a few pixels."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageFilter

from deployments.models.portrait.attributes import Ethnicity, Expression, FacialHair, Glasses, PortraitAttributes
from deployments.models.portrait.renderer import render_portrait

CHANGE_THRESHOLD = 24  # summed |RGB| difference that counts as "this pixel changed"
WIDEN_PX = 4
# The values a fine-feature region is drawn with: no glasses, dark lenses and thin frames; the
# mouth open and shut and the brows (at most three of these, the target's own left out).
FINE_GLASSES: tuple[Glasses, ...] = ("no glasses", "wearing sunglasses", "wearing round glasses")
FINE_EXPRESSIONS: tuple[Expression, ...] = (
    "laughing expression",
    "surprised expression",
    "angry expression",
    "sad expression",
)


def changed_region(base: PortraitAttributes, variants: list[PortraitAttributes], seed: int) -> Image.Image:
    """The mask (L, white = may change) of the pixels where any variant's render differs from
    `base`'s at the same seed, widened by WIDEN_PX."""
    pixels = np.asarray(render_portrait(base, seed), np.int32)
    changed = np.zeros(pixels.shape[:2], bool)
    for variant in variants:
        other = np.asarray(render_portrait(variant, seed), np.int32)
        changed |= np.abs(other - pixels).sum(-1) > CHANGE_THRESHOLD
    mask = Image.fromarray((changed * 255).astype(np.uint8), "L")
    return mask.filter(ImageFilter.MaxFilter(2 * WIDEN_PX + 1))


def latent_cell_shares(mask: Image.Image, cell_px: int = 8) -> np.ndarray:
    """(h / cell_px, w / cell_px): the share of each latent cell's pixels that `mask` covers (the
    VAE maps each 8x8 block of pixels to one cell)."""
    pixels = np.asarray(mask, np.float32) / 255
    rows, cols = pixels.shape[0] // cell_px, pixels.shape[1] // cell_px
    return pixels.reshape(rows, cell_px, cols, cell_px).mean(axis=(1, 3))


def head_region(target: PortraitAttributes, seed: int, face: PortraitAttributes) -> Image.Image:
    """Where `face` goes on the target: the target's skin (redrawn with a contrasting skin tone),
    its hair, and the hair and face shape of `face` drawn at the target's place."""
    from deployments.models.portrait.adapter_training import IDENTITY_TRAITS

    contrast: Ethnicity = "White" if target.ethnicity in ("Black", "South Asian") else "Black"
    variants = [
        dataclasses.replace(target, ethnicity=contrast),
        dataclasses.replace(target, **{t: getattr(face, t) for t in IDENTITY_TRAITS}),
    ]
    return changed_region(target, variants, seed)


def eyes_region(target: PortraitAttributes, seed: int) -> Image.Image:
    """Where glasses go on the target's face."""
    variants = [dataclasses.replace(target, glasses=g) for g in ("wearing round glasses", "wearing square glasses")]
    return changed_region(target, variants, seed)


def hair_region(target: PortraitAttributes, seed: int) -> Image.Image:
    """The target's hair (for a hair-colour edit)."""
    variants = [dataclasses.replace(target, hair_color=c) for c in ("red", "white")]
    return changed_region(target, variants, seed)


def fine_feature_region(target: PortraitAttributes, seed: int) -> Image.Image:
    """Where the face's small features are drawn: the pixels that change when the glasses, the
    expression or (for a man) the facial hair change. The prompt's words for them move a few
    latent cells, which a loss averaged over the whole picture barely sees. (Not the view: it
    moves the whole face, a quarter of the picture, which the face box already weighs.)"""
    variants = [dataclasses.replace(target, glasses=g) for g in FINE_GLASSES if g != target.glasses]
    expressions = [e for e in FINE_EXPRESSIONS if e != target.expression][:3]
    variants += [dataclasses.replace(target, expression=e) for e in expressions]
    if target.identity == "man":
        other: FacialHair = "beard" if target.facial_hair == "clean shaven" else "clean shaven"
        variants.append(dataclasses.replace(target, facial_hair=other))
    return changed_region(target, variants, seed)
