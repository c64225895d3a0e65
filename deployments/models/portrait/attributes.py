"""The attributes a rendered portrait has: the ground truth the renderer draws, captions
describe and the judge reads back.

Values are spelled as the prompt optimizer's canonical vocabulary spells them (its lexicon),
so that what the optimizer emits can be drawn and checked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Literal, get_args

Identity = Literal["man", "woman", "boy", "girl", "person"]
Ethnicity = Literal["Asian", "South Asian", "Black", "White", "Hispanic", "Middle Eastern"]
AgeGroup = Literal["child", "young", "middle-aged", "old"]
Expression = Literal[
    "smiling expression",
    "laughing expression",
    "neutral",
    "serious expression",
    "sad expression",
    "surprised expression",
    "angry expression",
]
Glasses = Literal[
    "no glasses", "wearing glasses", "wearing round glasses", "wearing square glasses", "wearing sunglasses"
]
HairColor = Literal["black", "brown", "blonde", "red", "gray", "white"]
HairStyle = Literal["short", "long", "curly", "bald", "ponytail", "bob", "afro"]
FacialHair = Literal["clean shaven", "beard", "mustache", "stubble"]
View = Literal["front view", "three quarter view", "side profile"]
Lighting = Literal[
    "soft lighting", "studio lighting", "dramatic lighting", "natural lighting", "backlit", "golden hour"
]
Background = Literal[
    "blue background",
    "green background",
    "red background",
    "yellow background",
    "white background",
    "black background",
    "gray background",
    "orange background",
    "purple background",
    "pink background",
    "outdoors",
    "studio background",
]
Accessory = Literal["earrings", "hat", "necklace", "headscarf"]
FaceShape = Literal["oval", "round", "square", "long"]
EyeColor = Literal["brown", "blue", "green", "gray"]

IDENTITIES: tuple[Identity, ...] = get_args(Identity)
ETHNICITIES: tuple[Ethnicity, ...] = get_args(Ethnicity)
AGE_GROUPS: tuple[AgeGroup, ...] = get_args(AgeGroup)
EXPRESSIONS: tuple[Expression, ...] = get_args(Expression)
GLASSES: tuple[Glasses, ...] = get_args(Glasses)
HAIR_COLORS: tuple[HairColor, ...] = get_args(HairColor)
HAIR_STYLES: tuple[HairStyle, ...] = get_args(HairStyle)
FACIAL_HAIR: tuple[FacialHair, ...] = get_args(FacialHair)
VIEWS: tuple[View, ...] = get_args(View)
LIGHTINGS: tuple[Lighting, ...] = get_args(Lighting)
BACKGROUNDS: tuple[Background, ...] = get_args(Background)
ACCESSORIES: tuple[Accessory, ...] = get_args(Accessory)
FACE_SHAPES: tuple[FaceShape, ...] = get_args(FaceShape)
EYE_COLORS: tuple[EyeColor, ...] = get_args(EyeColor)

CHILDREN: frozenset[Identity] = frozenset({"boy", "girl"})
# A typical age said for each group, for the structured caption's `age:N`.
AGE_YEARS: dict[AgeGroup, tuple[int, int]] = {
    "child": (6, 12),
    "young": (20, 32),
    "middle-aged": (40, 55),
    "old": (68, 85),
}


def age_group_of(years: int) -> AgeGroup:
    """The group an age in years falls in (the bounds sit between AGE_YEARS' ranges)."""
    if years < 16:
        return "child"
    if years < 36:
        return "young"
    if years < 62:
        return "middle-aged"
    return "old"


@dataclass(frozen=True)
class PortraitAttributes:
    """Everything the renderer draws that a prompt can ask for or a face keeps.

    `face_shape`, `eye_color`, skin tone (from `ethnicity`) and hair are the identity traits
    a face keeps across pictures. `facial_hair` is drawn on men only; `headscarf` hides the
    hair; `wearing sunglasses` hides the eye colour (the judge is told so by `visible`)."""

    identity: Identity = "person"
    ethnicity: Ethnicity = "White"
    age: AgeGroup = "young"
    expression: Expression = "neutral"
    glasses: Glasses = "no glasses"
    hair_color: HairColor = "brown"
    hair_style: HairStyle = "short"
    facial_hair: FacialHair = "clean shaven"
    view: View = "front view"
    lighting: Lighting = "soft lighting"
    background: Background = "gray background"
    accessories: frozenset[Accessory] = field(default_factory=frozenset)
    face_shape: FaceShape = "oval"
    eye_color: EyeColor = "brown"

    def __post_init__(self) -> None:
        for f in fields(self):
            allowed = ATTRIBUTE_VALUES.get(f.name)
            value = getattr(self, f.name)
            if f.name == "accessories":
                unknown = set(value) - set(ACCESSORIES)
                if unknown:
                    raise ValueError(f"unknown accessories {sorted(unknown)}; known: {list(ACCESSORIES)}")
            elif allowed is not None and value not in allowed:
                raise ValueError(f"{f.name}={value!r} is not one of {list(allowed)}")
        if self.identity in CHILDREN and self.age != "child":
            raise ValueError(f"a {self.identity} is a child; age={self.age!r} contradicts it")
        if self.identity in ("man", "woman") and self.age == "child":
            raise ValueError(f"a {self.identity} is an adult; use boy or girl for a child")
        if self.facial_hair != "clean shaven" and self.identity != "man":
            raise ValueError("facial hair is drawn on men only")
        if {"hat", "headscarf"} <= self.accessories:
            raise ValueError("a hat and a headscarf cannot both be worn")

    @property
    def is_male(self) -> bool:
        """Drawn with male cues (a person's sex is decided by the renderer's seed instead)."""
        return self.identity in ("man", "boy")

    @property
    def hair_visible(self) -> bool:
        return self.hair_style != "bald" and "headscarf" not in self.accessories

    @property
    def eyes_visible(self) -> bool:
        return self.glasses != "wearing sunglasses"


# Field name -> its values, for every single-valued attribute (accessories are a set).
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "identity": IDENTITIES,
    "ethnicity": ETHNICITIES,
    "age": AGE_GROUPS,
    "expression": EXPRESSIONS,
    "glasses": GLASSES,
    "hair_color": HAIR_COLORS,
    "hair_style": HAIR_STYLES,
    "facial_hair": FACIAL_HAIR,
    "view": VIEWS,
    "lighting": LIGHTINGS,
    "background": BACKGROUNDS,
    "face_shape": FACE_SHAPES,
    "eye_color": EYE_COLORS,
}


def sample_attributes(rng: random.Random) -> PortraitAttributes:
    """A random portrait, every value of every attribute reachable, contradictions avoided."""
    identity: Identity = rng.choice(IDENTITIES)
    if identity in CHILDREN:
        age: AgeGroup = "child"
    elif identity == "person":
        age = rng.choice(AGE_GROUPS)
    else:
        age = rng.choice(AGE_GROUPS[1:])
    # Grey and white hair are mostly (not only) the old's, as in life.
    hair_colors = HAIR_COLORS if age == "old" or rng.random() < 0.15 else HAIR_COLORS[:4]
    facial_hair: FacialHair = "clean shaven"
    if identity == "man" and rng.random() < 0.6:
        facial_hair = rng.choice(FACIAL_HAIR[1:])
    accessories = {a for a in ACCESSORIES if rng.random() < 0.18}
    if {"hat", "headscarf"} <= accessories:
        accessories.discard(rng.choice(("hat", "headscarf")))
    return PortraitAttributes(
        identity=identity,
        ethnicity=rng.choice(ETHNICITIES),
        age=age,
        expression=rng.choice(EXPRESSIONS),
        glasses=rng.choice(GLASSES),
        hair_color=rng.choice(hair_colors),
        hair_style=rng.choice(HAIR_STYLES),
        facial_hair=facial_hair,
        view=rng.choice(VIEWS),
        lighting=rng.choice(LIGHTINGS),
        background=rng.choice(BACKGROUNDS),
        accessories=frozenset(accessories),
        face_shape=rng.choice(FACE_SHAPES),
        eye_color=rng.choice(EYE_COLORS),
    )
