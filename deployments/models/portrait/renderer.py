"""A procedural portrait renderer: attributes + seed in, a stylised head-and-shoulders picture out.

Plain Pillow/numpy, deterministic for (attributes, seed, size), a few milliseconds a picture,
so training data is made on the fly. The seed varies what no prompt names (position, scale,
clothing, colour jitter, light direction): the model learns a distribution, not a template.
Shapes are drawn at 4x and box-filtered down, which anti-aliases them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from deployments.models.portrait.attributes import (
    AgeGroup,
    Background,
    EyeColor,
    FaceShape,
    HairColor,
    PortraitAttributes,
    View,
)

RGB = tuple[int, int, int]
SUPERSAMPLE = 4

# Apart in hue as well as in lightness, so a tone stays readable under coloured light.
SKIN_TONES: dict[str, RGB] = {
    "White": (242, 208, 188),
    "Asian": (238, 202, 140),
    "Hispanic": (222, 146, 98),
    "Middle Eastern": (192, 168, 120),
    "South Asian": (158, 106, 68),
    "Black": (98, 62, 40),
}
HAIR_RGB: dict[HairColor, RGB] = {
    "black": (28, 24, 22),
    "brown": (104, 64, 34),
    "blonde": (226, 192, 112),
    "red": (172, 62, 28),
    "gray": (146, 146, 146),
    "white": (236, 236, 230),
}
EYE_RGB: dict[EyeColor, RGB] = {
    "brown": (92, 54, 26),
    "blue": (60, 118, 206),
    "green": (58, 142, 70),
    "gray": (128, 138, 150),
}
PLAIN_BACKGROUNDS: dict[Background, RGB] = {
    "blue background": (58, 108, 222),
    "green background": (56, 168, 76),
    "red background": (212, 48, 48),
    "yellow background": (242, 212, 58),
    "white background": (246, 246, 246),
    "black background": (18, 18, 18),
    "gray background": (128, 128, 128),
    "orange background": (242, 140, 36),
    "purple background": (128, 66, 182),
    "pink background": (242, 150, 192),
}
# Clothing and hat colours: nuisance, chosen by the seed.
CLOTHING: tuple[RGB, ...] = (
    (40, 52, 84),
    (92, 92, 96),
    (150, 40, 46),
    (46, 96, 70),
    (200, 196, 184),
    (70, 50, 40),
    (120, 100, 150),
    (30, 30, 34),
    (176, 140, 90),
)
# (width, height) factors of the head ellipse per face shape.
FACE_SHAPE_FACTORS: dict[FaceShape, tuple[float, float]] = {
    "oval": (1.0, 1.0),
    "round": (1.12, 0.92),
    "square": (1.06, 0.97),
    "long": (0.88, 1.12),
}
VIEW_TURN: dict[View, float] = {"front view": 0.0, "three quarter view": 0.5, "side profile": 1.0}


def render_portrait(attributes: PortraitAttributes, seed: int, size: int = 128) -> Image.Image:
    """The portrait for `attributes`; the same (attributes, seed, size) gives the same pixels."""
    if size < 32 or size % 8:
        raise ValueError(f"size must be a multiple of 8 and at least 32, not {size}")
    rng = random.Random(f"{seed}:{size}")
    background = _background(attributes.background, size, rng)
    # Shapes are drawn at 4x and box-filtered down (premultiplied, so edges do not darken);
    # the background and the lighting are smooth and cost 16x less at the final size.
    figure = Image.new("RGBA", (size * SUPERSAMPLE, size * SUPERSAMPLE), (0, 0, 0, 0))
    _FigurePainter(attributes, rng, size * SUPERSAMPLE).paint(ImageDraw.Draw(figure))
    figure = figure.convert("RGBa").reduce(SUPERSAMPLE).convert("RGBA")
    background.alpha_composite(_apply_lighting(figure, attributes.lighting, rng))
    return background.convert("RGB")


# Accessories another part of the picture can cover: earrings are drawn with the ears, and hair
# worn down falls over them (73 of 181 held-out renders with earrings; a bob seen from the front, always).
COVERABLE_ACCESSORIES = ("earrings",)
MIN_SHOWN_PIXELS = 4  # an earring is a ring ~4 px across; a sliver under the hair is not one


def accessory_pixels(
    attributes: PortraitAttributes, seed: int, image: Image.Image | None = None
) -> dict[str, np.ndarray]:
    """Where the render (`image`, or drawn here) shows each coverable accessory `attributes`
    asks for: the pixels (a boolean H x W mask) in which the same portrait drawn without it differs."""
    image = image or render_portrait(attributes, seed)
    reference = np.asarray(image, dtype=np.int16)
    pixels: dict[str, np.ndarray] = {}
    for accessory in COVERABLE_ACCESSORIES:
        if accessory in attributes.accessories:
            bare = replace(attributes, accessories=attributes.accessories - {accessory})
            changed = np.abs(np.asarray(render_portrait(bare, seed, image.width), dtype=np.int16) - reference).sum(-1)
            pixels[accessory] = changed > 0
    return pixels


def hidden_accessories(attributes: PortraitAttributes, seed: int, image: Image.Image | None = None) -> frozenset[str]:
    """The accessories `attributes` asks for that its render (`image`, or drawn here) does not
    show: the same portrait drawn without one differs in fewer than `MIN_SHOWN_PIXELS` pixels."""
    return shown_too_little(accessory_pixels(attributes, seed, image))


def shown_too_little(pixels: dict[str, np.ndarray]) -> frozenset[str]:
    """The accessories of `accessory_pixels` that fewer than `MIN_SHOWN_PIXELS` pixels show."""
    return frozenset(name for name, mask in pixels.items() if mask.sum() < MIN_SHOWN_PIXELS)


def _jitter(color: RGB, rng: random.Random, amount: int) -> RGB:
    r, g, b = (min(255, max(0, c + rng.randint(-amount, amount))) for c in color)
    return (r, g, b)


def _scaled(color: RGB, factor: float) -> RGB:
    r, g, b = (min(255, max(0, round(c * factor))) for c in color)
    return (r, g, b)


def _mix(a: RGB, b: RGB, share_of_b: float) -> RGB:
    r, g, bl = (round(x * (1 - share_of_b) + y * share_of_b) for x, y in zip(a, b))
    return (r, g, bl)


# -- background -------------------------------------------------------------------------------


def _background(kind: Background, canvas: int, rng: random.Random) -> Image.Image:
    if kind in PLAIN_BACKGROUNDS:
        return _plain_background(_jitter(PLAIN_BACKGROUNDS[kind], rng, 10), canvas, rng)
    if kind == "outdoors":
        return _outdoor_background(canvas, rng)
    return _studio_background(canvas, rng)


def _plain_background(color: RGB, canvas: int, rng: random.Random) -> Image.Image:
    # A gentle vertical gradient: plain, but not one flat value the model could memorise.
    ramp = np.linspace(1.0 + rng.uniform(0.0, 0.06), 1.0 - rng.uniform(0.0, 0.06), canvas)[:, None, None]
    pixels = np.clip(np.array(color, dtype=np.float32)[None, None, :] * ramp, 0, 255)
    pixels = np.broadcast_to(pixels, (canvas, canvas, 3)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB").convert("RGBA")


def _outdoor_background(canvas: int, rng: random.Random) -> Image.Image:
    horizon = int(canvas * rng.uniform(0.55, 0.7))
    rows = np.arange(canvas, dtype=np.float32)[:, None] / canvas
    sky_top, sky_low = np.array((118, 176, 232), np.float32), np.array((196, 224, 246), np.float32)
    sky = sky_top + (sky_low - sky_top) * rows[..., None]
    grass = np.array(_jitter((78, 138, 58), rng, 12), np.float32)
    pixels = np.where((np.arange(canvas)[:, None] < horizon)[..., None], sky, grass)
    image = Image.fromarray(np.broadcast_to(pixels, (canvas, canvas, 3)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 6)):  # trees on the horizon
        x, r = rng.uniform(0, canvas), canvas * rng.uniform(0.07, 0.14)
        draw.ellipse((x - r, horizon - 1.6 * r, x + r, horizon + 0.2 * r), fill=_jitter((44, 98, 48), rng, 12))
    # Out of focus, as behind a portrait.
    return image.filter(ImageFilter.GaussianBlur(canvas / 90)).convert("RGBA")


def _studio_background(canvas: int, rng: random.Random) -> Image.Image:
    # A studio backdrop: a warm grey pool of light behind the head, dark towards the edges.
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float32) / canvas
    cx, cy = rng.uniform(0.4, 0.6), rng.uniform(0.3, 0.45)
    distance = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    glow = np.clip(1.0 - distance / 0.75, 0.0, 1.0)[..., None]
    centre, edge = np.array(_jitter((150, 138, 124), rng, 8), np.float32), np.array((34, 32, 32), np.float32)
    pixels = edge + (centre - edge) * glow
    return Image.fromarray(pixels.astype(np.uint8), "RGB").convert("RGBA")


# -- lighting ---------------------------------------------------------------------------------


def _apply_lighting(figure: Image.Image, lighting: str, rng: random.Random) -> Image.Image:
    """Shade the figure (never the background, whose named colour must stay what was asked)."""
    pixels = np.asarray(figure).astype(np.float32)
    canvas = pixels.shape[0]
    x = np.linspace(-1.0, 1.0, canvas, dtype=np.float32)[None, :, None]
    y = np.linspace(-1.0, 1.0, canvas, dtype=np.float32)[:, None, None]
    side = rng.choice((-1.0, 1.0))  # which side the light comes from: nuisance
    tint = np.ones(3, np.float32)
    if lighting == "soft lighting":
        gain = 1.0 + 0.07 * side * x
    elif lighting == "studio lighting":
        gain = np.full_like(x, 1.1)
    elif lighting == "dramatic lighting":
        gain = 0.28 + 0.85 / (1.0 + np.exp(-7.0 * side * x))
    elif lighting == "natural lighting":  # daylight from above, slightly warm
        gain = 1.12 - 0.22 * (y + 1.0) / 2 + 0.0 * x
        tint = np.array((1.06, 1.02, 0.86), np.float32)
    elif lighting == "golden hour":
        gain = 1.02 + 0.1 * side * x
        tint = np.array((1.16, 0.94, 0.66), np.float32)
    elif lighting == "backlit":
        gain = np.full_like(x, 0.5)
    else:
        raise ValueError(f"unknown lighting {lighting!r}")
    rgb = np.clip(pixels[..., :3] * gain * tint, 0, 255)
    if lighting == "backlit":
        alpha = figure.getchannel("A")
        inner = np.asarray(alpha.filter(ImageFilter.MinFilter(3)), np.float32)
        rim = np.clip((np.asarray(alpha, np.float32) - inner) / 255.0, 0.0, 1.0)[..., None]
        rgb = rgb * (1 - rim) + np.array((255, 246, 222), np.float32) * rim
    out = np.concatenate([rgb, pixels[..., 3:]], axis=-1).astype(np.uint8)
    return Image.fromarray(out, "RGBA")


# -- the figure -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Head:
    """Where the head is on the canvas and which way it looks."""

    cx: float
    cy: float
    rx: float
    ry: float
    turn: float  # 0 front, 0.5 three quarter, 1 profile
    facing: int  # +1: the face turns to the viewer's right

    @property
    def shift(self) -> float:
        """How far the features move towards the side the face turns to."""
        return self.facing * self.turn * self.rx * 0.5


class _FigurePainter:
    """Paints shoulders, head, face, hair and accessories onto a transparent layer."""

    def __init__(self, attributes: PortraitAttributes, rng: random.Random, canvas: int):
        self.a = attributes
        self.rng = rng
        self.canvas = canvas
        self.male = attributes.is_male if attributes.identity != "person" else rng.random() < 0.5
        self.skin = _jitter(SKIN_TONES[attributes.ethnicity], rng, 4)
        self.skin_dark = _scaled(self.skin, 0.78)
        self.line = _scaled(self.skin, 0.55)
        self.hair = _jitter(HAIR_RGB[attributes.hair_color], rng, 8)
        self.clothing = _jitter(rng.choice(CLOTHING), rng, 10)
        self.scarf = _jitter(rng.choice(CLOTHING[2:]), rng, 12)
        self.head = self._place_head(attributes.age, attributes.face_shape, attributes.view)

    def _place_head(self, age: AgeGroup, shape: FaceShape, view: View) -> _Head:
        c, rng = self.canvas, self.rng
        scale = rng.uniform(0.92, 1.08) * (1.04 if age == "child" else 1.0)
        wf, hf = FACE_SHAPE_FACTORS[shape]
        rx = c * 0.19 * scale * wf * (0.96 if not self.male else 1.0)
        ry = c * (0.22 if age == "child" else 0.24) * scale * hf
        return _Head(
            cx=c * (0.5 + rng.uniform(-0.04, 0.04)),
            cy=c * (0.43 + rng.uniform(-0.025, 0.025)),
            rx=rx,
            ry=ry,
            turn=VIEW_TURN[view],
            facing=rng.choice((-1, 1)),
        )

    def paint(self, draw: ImageDraw.ImageDraw) -> None:
        a = self.a
        covered = "headscarf" in a.accessories
        if a.hair_visible:
            self._hair_back(draw)
        self._torso(draw)
        if a.hair_visible and a.hair_style == "long":
            self._long_hair_over_shoulders(draw)
        self._neck(draw)
        if covered:
            self._headscarf_back(draw)
        self._head_shape(draw)
        if not covered:
            self._ears(draw)
        self._age_lines(draw)
        self._facial_hair(draw)
        self._nose(draw)
        self._mouth(draw)
        self._eyes(draw)
        self._brows(draw)
        if covered:
            self._headscarf_front(draw)
        elif a.hair_visible:
            self._hair_front(draw)
        elif a.hair_style == "bald":
            self._bald_shine(draw)
        self._glasses(draw)
        if "necklace" in a.accessories:
            self._necklace(draw)
        if "hat" in a.accessories:
            self._hat(draw)

    # -- body ---------------------------------------------------------------------------------
    def _torso(self, draw: ImageDraw.ImageDraw) -> None:
        h, c = self.head, self.canvas
        width = c * (0.5 if self.a.age == "child" else 0.74 if self.male else 0.64) * self.rng.uniform(0.95, 1.05)
        top = h.cy + h.ry * 1.25
        draw.ellipse((h.cx - width / 2, top, h.cx + width / 2, top + c * 0.7), fill=self.clothing)
        # The neckline: a V of skin, so the neck meets the clothes.
        v = h.rx * 0.38
        draw.polygon(
            [(h.cx - v, top + c * 0.005), (h.cx + v, top + c * 0.005), (h.cx, top + h.ry * 0.55)], fill=self.skin
        )

    def _neck(self, draw: ImageDraw.ImageDraw) -> None:
        h = self.head
        half = h.rx * (0.42 if self.male else 0.36)
        x = h.cx - h.facing * h.turn * h.rx * 0.15
        draw.rectangle((x - half, h.cy + h.ry * 0.5, x + half, h.cy + h.ry * 1.45), fill=self.skin_dark)

    def _head_shape(self, draw: ImageDraw.ImageDraw) -> None:
        h = self.head
        box = (h.cx - h.rx, h.cy - h.ry, h.cx + h.rx, h.cy + h.ry)
        if self.a.face_shape == "square":
            draw.rounded_rectangle(box, radius=h.rx * 0.55, fill=self.skin)
        else:
            draw.ellipse(box, fill=self.skin)

    def _ears(self, draw: ImageDraw.ImageDraw) -> None:
        h = self.head
        y = h.cy + h.ry * 0.05
        sides = (-1, 1) if h.turn == 0 else (-h.facing,)
        for side in sides:
            x = h.cx + side * h.rx * (0.98 if h.turn == 0 else 0.8 - 0.55 * h.turn)
            w, eh = h.rx * 0.14, h.ry * 0.17
            draw.ellipse((x - w, y - eh, x + w, y + eh), fill=self.skin_dark)
            if "earrings" in self.a.accessories:
                r = h.rx * 0.075
                ey = y + eh + r * 0.6
                draw.ellipse((x - r, ey - r, x + r, ey + r), fill=(232, 190, 60), outline=(150, 110, 20))

    # -- face ---------------------------------------------------------------------------------
    def _eye_positions(self) -> list[tuple[float, float, float]]:
        """(x, y, width factor) of each visible eye, the near one first."""
        h = self.head
        y = h.cy - h.ry * (0.02 if self.a.age == "child" else 0.06)
        near = h.cx + h.shift + h.facing * h.rx * 0.36 * (1 - 0.25 * h.turn)
        if h.turn >= 1.0:
            return [(h.cx + h.facing * h.rx * 0.6, y, 0.8)]
        if h.turn == 0:
            return [(h.cx + h.rx * 0.36, y, 1.0), (h.cx - h.rx * 0.36, y, 1.0)]
        far = h.cx + h.shift - h.facing * h.rx * 0.36 * (1 - 0.6 * h.turn)
        return [(near, y, 1.0), (far, y, 1.0 - 0.45 * h.turn)]

    def _eyes(self, draw: ImageDraw.ImageDraw) -> None:
        h, expression = self.head, self.a.expression
        size = 1.22 if self.a.age == "child" else 1.0
        height = {"surprised expression": 1.45, "laughing expression": 0.55, "angry expression": 0.8}.get(
            expression, 1.0
        )
        for x, y, wf in self._eye_positions():
            w, eh = h.rx * 0.2 * size * wf, h.rx * 0.11 * size * height
            draw.ellipse((x - w, y - eh, x + w, y + eh), fill=(248, 246, 242), outline=self.line)
            r = min(h.rx * 0.11 * size, eh * 1.05)
            ix = x + h.facing * h.turn * w * 0.3
            draw.ellipse((ix - r, y - r, ix + r, y + r), fill=EYE_RGB[self.a.eye_color])
            p = r * 0.45
            draw.ellipse((ix - p, y - p, ix + p, y + p), fill=(12, 10, 10))
            if not self.male:  # lashes: a darker upper lid
                draw.arc((x - w, y - eh, x + w, y + eh), 200, 340, fill=(30, 24, 22), width=max(2, int(h.rx * 0.04)))

    def _brows(self, draw: ImageDraw.ImageDraw) -> None:
        h, expression = self.head, self.a.expression
        lift = {"surprised expression": 0.1, "serious expression": -0.035, "angry expression": -0.02}.get(
            expression, 0.0
        )
        # How much the inner end sits below (+) or above (-) the outer end.
        slant = {"angry expression": 0.09, "sad expression": -0.08}.get(expression, 0.0)
        width = max(2, int(h.rx * (0.075 if self.male else 0.045)))
        color = _scaled(self.hair, 0.85) if self.a.hair_visible else self.line
        for x, y, wf in self._eye_positions():
            by = y - h.ry * (0.2 + lift)
            half = h.rx * 0.17 * wf
            inner = -1 if x > h.cx + h.shift else 1  # the inner end points at the nose
            inner_x, outer_x = x + inner * half, x - inner * half
            draw.line([(outer_x, by), (inner_x, by + slant * h.ry)], fill=color, width=width)

    def _nose(self, draw: ImageDraw.ImageDraw) -> None:
        h = self.head
        top, base = h.cy + h.ry * 0.02, h.cy + h.ry * 0.3
        x = h.cx + h.shift * 1.1
        if h.turn == 0:
            draw.line([(x, top), (x - h.rx * 0.05, base)], fill=self.skin_dark, width=max(2, int(h.rx * 0.03)))
            draw.arc(
                (x - h.rx * 0.12, base - h.ry * 0.06, x + h.rx * 0.12, base + h.ry * 0.05),
                20,
                160,
                fill=self.line,
                width=max(2, int(h.rx * 0.03)),
            )
            return
        tip_x = h.cx + h.facing * h.rx * (0.55 + 0.62 * h.turn)
        base_x = h.cx + h.facing * h.rx * (0.35 + 0.5 * h.turn)
        draw.polygon([(base_x, top), (tip_x, base - h.ry * 0.04), (base_x, base)], fill=self.skin, outline=self.line)

    def _mouth_box(self) -> tuple[float, float, float]:
        """(centre x, y, half width) of the mouth."""
        h = self.head
        y = h.cy + h.ry * (0.5 if self.a.age == "child" else 0.54)
        if h.turn >= 1.0:
            return h.cx + h.facing * h.rx * 0.68, y, h.rx * 0.2
        return h.cx + h.shift * 1.05, y, h.rx * 0.3 * (1 - 0.3 * h.turn)

    def _mouth(self, draw: ImageDraw.ImageDraw) -> None:
        x, y, w = self._mouth_box()
        h, expression = self.head, self.a.expression
        lips = (176, 62, 70) if not self.male else _scaled(self.skin, 0.62)
        width = max(2, int(h.rx * 0.08))
        if expression == "smiling expression":
            draw.arc((x - w, y - h.ry * 0.14, x + w, y + h.ry * 0.1), 15, 165, fill=lips, width=width)
        elif expression == "laughing expression":
            draw.chord((x - w, y - h.ry * 0.1, x + w, y + h.ry * 0.2), 0, 180, fill=(90, 20, 28), outline=lips)
            draw.rectangle((x - w * 0.7, y - h.ry * 0.005, x + w * 0.7, y + h.ry * 0.035), fill=(250, 250, 246))
        elif expression == "sad expression":
            draw.arc((x - w * 0.85, y, x + w * 0.85, y + h.ry * 0.2), 200, 340, fill=lips, width=width)
        elif expression == "surprised expression":
            r = w * 0.38
            draw.ellipse((x - r, y - r * 0.9, x + r, y + r * 1.3), fill=(80, 18, 26), outline=lips)
        elif expression == "angry expression":
            draw.arc((x - w * 0.75, y - h.ry * 0.02, x + w * 0.75, y + h.ry * 0.14), 205, 335, fill=lips, width=width)
            draw.line([(x - w * 0.45, y + h.ry * 0.01), (x + w * 0.45, y + h.ry * 0.01)], fill=(60, 20, 24), width=2)
        elif expression == "serious expression":
            draw.line([(x - w * 0.85, y), (x + w * 0.85, y)], fill=lips, width=width)
        else:  # neutral: a short, relaxed mouth
            draw.line([(x - w * 0.55, y), (x + w * 0.55, y)], fill=lips, width=max(2, int(width * 0.8)))

    def _age_lines(self, draw: ImageDraw.ImageDraw) -> None:
        age = self.a.age
        if age not in ("middle-aged", "old"):
            return
        h = self.head
        old = age == "old"
        color = _scaled(self.skin, 0.6 if old else 0.74)
        width = max(2, int(h.rx * (0.05 if old else 0.035)))
        fx = h.cx + h.shift * 0.5
        for i in range(3 if old else 2):  # the forehead
            y = h.cy - h.ry * (0.42 + 0.08 * i)
            draw.arc(
                (fx - h.rx * 0.45, y - h.ry * 0.05, fx + h.rx * 0.45, y + h.ry * 0.05),
                200,
                340,
                fill=color,
                width=width,
            )
        mx, my, mw = self._mouth_box()
        for side in (-1, 1):  # nose to mouth
            sx = mx + side * (mw + h.rx * 0.08)
            draw.line([(sx - side * h.rx * 0.12, h.cy + h.ry * 0.22), (sx, my + h.ry * 0.06)], fill=color, width=width)
        if old:
            for x, y, wf in self._eye_positions():  # crow's feet and bags under the eyes
                outer = x + (h.rx * 0.17 * wf if x > h.cx + h.shift else -h.rx * 0.17 * wf)
                for dy in (-0.05, 0.0, 0.05):
                    draw.line([(outer, y), (outer + (outer - x) * 0.35, y + h.ry * dy)], fill=color, width=width)
                draw.arc(
                    (x - h.rx * 0.14, y + h.ry * 0.02, x + h.rx * 0.14, y + h.ry * 0.12),
                    20,
                    160,
                    fill=color,
                    width=width,
                )

    def _facial_hair(self, draw: ImageDraw.ImageDraw) -> None:
        kind = self.a.facial_hair
        if kind == "clean shaven":
            return
        h = self.head
        box = (h.cx - h.rx * 1.02, h.cy - h.ry * 1.0, h.cx + h.rx * 1.02, h.cy + h.ry * 1.1)
        mx, my, mw = self._mouth_box()
        if kind == "beard":
            draw.chord(box, 12, 168, fill=self.hair)
            draw.ellipse((mx - mw * 0.9, my - h.ry * 0.07, mx + mw * 0.9, my + h.ry * 0.08), fill=self.skin_dark)
        elif kind == "stubble":
            layer_color = _mix(self.skin, self.hair if self.a.hair_color in ("black", "brown") else (40, 36, 34), 0.45)
            draw.chord(box, 12, 168, fill=layer_color)
        if kind in ("beard", "mustache"):
            draw.chord((mx - mw * 1.15, my - h.ry * 0.16, mx + mw * 1.15, my + h.ry * 0.05), 180, 360, fill=self.hair)

    # -- hair -----------------------------------------------------------------------------------
    def _hair_back(self, draw: ImageDraw.ImageDraw) -> None:
        h, style = self.head, self.a.hair_style
        back = h.cx - h.facing * h.turn * h.rx * 0.25
        if style == "bob":
            draw.rounded_rectangle(
                (back - h.rx * 1.22, h.cy - h.ry * 0.95, back + h.rx * 1.22, h.cy + h.ry * 0.72),
                radius=h.rx * 0.5,
                fill=self.hair,
            )
        elif style == "curly":
            self._bumpy_blob(draw, back, h.cy - h.ry * 0.15, h.rx * 1.3, h.ry * 1.12, count=22)
        elif style == "afro":
            self._bumpy_blob(draw, back, h.cy - h.ry * 0.35, h.rx * 1.6, h.ry * 1.3, count=28)
        elif style == "ponytail":
            side = -h.facing if h.turn else self.rng.choice((-1, 1))
            x0 = h.cx + side * h.rx * 0.7
            x1 = h.cx + side * h.rx * 1.45
            draw.ellipse((min(x0, x1), h.cy - h.ry * 0.55, max(x0, x1), h.cy + h.ry * 1.25), fill=self.hair)
        elif style == "long":
            draw.rounded_rectangle(
                (back - h.rx * 1.22, h.cy - h.ry * 0.95, back + h.rx * 1.22, h.cy + h.ry * 1.3),
                radius=h.rx * 0.6,
                fill=self.hair,
            )

    def _long_hair_over_shoulders(self, draw: ImageDraw.ImageDraw) -> None:
        h = self.head
        for side in (-1, 1):
            if h.turn >= 1.0 and side == h.facing:
                continue
            x = h.cx + side * h.rx * 0.95
            draw.rounded_rectangle(
                (x - h.rx * 0.3, h.cy, x + h.rx * 0.3, h.cy + h.ry * 1.85), radius=h.rx * 0.25, fill=self.hair
            )

    def _bumpy_blob(self, draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, count: int) -> None:
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=self.hair)
        bump = rx * 0.2
        for i in range(count):
            angle = 2 * math.pi * i / count
            x, y = cx + rx * math.cos(angle), cy + ry * math.sin(angle)
            draw.ellipse((x - bump, y - bump, x + bump, y + bump), fill=self.hair)

    def _hair_front(self, draw: ImageDraw.ImageDraw) -> None:
        h, style = self.head, self.a.hair_style
        back = -h.facing * h.turn * h.rx * 0.18
        fringe = h.ry * self.rng.uniform(-0.04, 0.04)
        cap = (h.cx + back - h.rx * 1.06, h.cy - h.ry * 1.1, h.cx + back + h.rx * 1.06, h.cy + h.ry * 0.38 + fringe)
        draw.chord(cap, 180, 360, fill=self.hair)
        if h.turn > 0:  # the back of the head is hair
            bx, r = h.cx - h.facing * h.rx * (0.5 + 0.3 * h.turn), h.rx * (0.3 + 0.2 * h.turn)
            draw.ellipse((bx - r, h.cy - h.ry * 0.95, bx + r, h.cy + h.ry * 0.35), fill=self.hair)
        if style in ("curly", "afro"):
            for i in range(9):
                x = cap[0] + (cap[2] - cap[0]) * (i + 0.5) / 9
                r = h.rx * 0.16
                y = h.cy - h.ry * 0.3 - math.sqrt(max(0.0, 1 - ((x - h.cx - back) / (h.rx * 1.06)) ** 2)) * h.ry * 0.8
                draw.ellipse((x - r, y - r, x + r, y + r), fill=self.hair)
        if style in ("long", "bob", "curly"):
            bottom = h.cy + h.ry * (0.75 if style == "bob" else 0.95)
            for side in (-1, 1):
                if h.turn > 0 and side == h.facing:
                    continue
                edge = h.cx + side * h.rx
                inner = h.cx + side * h.rx * 0.78
                draw.polygon(
                    [
                        (edge + side * h.rx * 0.12, h.cy - h.ry * 0.4),
                        (inner, h.cy - h.ry * 0.4),
                        (edge - side * h.rx * 0.05, bottom),
                        (edge + side * h.rx * 0.14, bottom),
                    ],
                    fill=self.hair,
                )
        elif style in ("short", "ponytail") and h.turn == 0:
            for side in (-1, 1):  # sideburns
                x = h.cx + side * h.rx * 0.93
                draw.rectangle(
                    (x - h.rx * 0.08, h.cy - h.ry * 0.45, x + h.rx * 0.08, h.cy - h.ry * 0.05), fill=self.hair
                )

    def _bald_shine(self, draw: ImageDraw.ImageDraw) -> None:
        h = self.head
        draw.arc(
            (h.cx - h.rx * 0.6, h.cy - h.ry * 0.9, h.cx + h.rx * 0.2, h.cy - h.ry * 0.2),
            200,
            260,
            fill=_scaled(self.skin, 1.18),
            width=max(2, int(h.rx * 0.06)),
        )

    # -- accessories ----------------------------------------------------------------------------
    def _glasses(self, draw: ImageDraw.ImageDraw) -> None:
        kind = self.a.glasses
        if kind == "no glasses":
            return
        h = self.head
        frame = (24, 22, 22)
        width = max(2, int(h.rx * 0.08))
        eyes = self._eye_positions()
        for x, y, wf in eyes:
            w, gh = h.rx * 0.3 * wf, h.rx * 0.23
            box = (x - w, y - gh, x + w, y + gh)
            if kind == "wearing round glasses":
                r = max(w, gh)
                draw.ellipse((x - r, y - r, x + r, y + r), outline=frame, width=width)
            elif kind == "wearing square glasses":
                draw.rectangle(box, outline=frame, width=width)
            elif kind == "wearing sunglasses":
                draw.rounded_rectangle(box, radius=gh * 0.5, fill=(16, 16, 20), outline=frame, width=width)
            else:
                draw.rounded_rectangle(box, radius=gh * 0.45, outline=frame, width=width)
        if len(eyes) == 2:
            (x0, y0, _), (x1, _, _) = eyes
            left, right = sorted((x0, x1))
            draw.line([(left + h.rx * 0.2, y0), (right - h.rx * 0.2, y0)], fill=frame, width=width)
        if h.turn > 0:  # the arm back to the ear
            x, y, _ = eyes[0] if h.turn >= 1.0 else eyes[-1]
            ear_x = h.cx - h.facing * h.rx * (0.8 - 0.55 * h.turn)
            draw.line([(x - h.facing * h.rx * 0.2, y), (ear_x, y + h.ry * 0.05)], fill=frame, width=width)

    def _necklace(self, draw: ImageDraw.ImageDraw) -> None:
        h = self.head
        metal = self.rng.choice(((232, 190, 60), (214, 214, 222)))
        top = h.cy + h.ry * 1.05
        draw.arc(
            (h.cx - h.rx * 0.62, top, h.cx + h.rx * 0.62, top + h.ry * 0.85),
            20,
            160,
            fill=metal,
            width=max(3, int(h.rx * 0.06)),
        )
        r = h.rx * 0.09
        py = top + h.ry * 0.85 + r * 0.2
        draw.ellipse((h.cx - r, py - r, h.cx + r, py + r), fill=metal)

    def _hat(self, draw: ImageDraw.ImageDraw) -> None:
        h = self.head
        color = _jitter(self.rng.choice(CLOTHING), self.rng, 10)
        x = h.cx - h.facing * h.turn * h.rx * 0.1
        draw.rounded_rectangle(
            (x - h.rx * 0.95, h.cy - h.ry * 1.55, x + h.rx * 0.95, h.cy - h.ry * 0.7), radius=h.rx * 0.3, fill=color
        )
        draw.rectangle(
            (x - h.rx * 0.95, h.cy - h.ry * 0.92, x + h.rx * 0.95, h.cy - h.ry * 0.78), fill=_scaled(color, 0.55)
        )
        draw.ellipse((x - h.rx * 1.6, h.cy - h.ry * 0.86, x + h.rx * 1.6, h.cy - h.ry * 0.64), fill=color)

    def _headscarf_back(self, draw: ImageDraw.ImageDraw) -> None:
        h = self.head
        draw.ellipse((h.cx - h.rx * 1.3, h.cy - h.ry * 1.3, h.cx + h.rx * 1.3, h.cy + h.ry * 1.2), fill=self.scarf)
        draw.polygon(
            [
                (h.cx - h.rx * 1.3, h.cy),
                (h.cx + h.rx * 1.3, h.cy),
                (h.cx + h.rx * 1.6, h.cy + h.ry * 1.9),
                (h.cx - h.rx * 1.6, h.cy + h.ry * 1.9),
            ],
            fill=self.scarf,
        )

    def _headscarf_front(self, draw: ImageDraw.ImageDraw) -> None:
        # The scarf's edge framing the face: a band over the forehead.
        h = self.head
        draw.chord(
            (h.cx - h.rx * 1.12, h.cy - h.ry * 1.2, h.cx + h.rx * 1.12, h.cy + h.ry * 0.1), 180, 360, fill=self.scarf
        )
        for side in (-1, 1):
            if h.turn > 0 and side == h.facing:
                continue
            x = h.cx + side * h.rx * 0.98
            draw.rectangle((x - h.rx * 0.12, h.cy - h.ry * 0.5, x + h.rx * 0.12, h.cy + h.ry * 0.8), fill=self.scarf)
