"""The judge: a small CNN that reads a portrait's attributes back from any image.

Trained on renders only (never on generated images), so it measures whether a picture shows
what its prompt asked without having learnt the generator's habits. One softmax head per
attribute, one sigmoid per accessory; its pooled features feed a Fréchet distance. What is a few
pixels across (earrings) a second, full-resolution network reads, and the expression (3-5 px of
lips) a third, from the face's part of the picture at full resolution.

Attributes the picture cannot show are not scored: hair colour and style under a headscarf,
hair colour of a bald head, eye colour behind sunglasses, earrings under hair worn down
(renderer.hidden_accessories: more than a third of the earrings drawn). A `person` is drawn as a man, woman,
boy or girl, so the identity head knows those four.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from deployments.models.portrait.attributes import ACCESSORIES, ATTRIBUTE_VALUES, PortraitAttributes

JUDGE_SIZE = 128
JUDGE_WEIGHTS = "judge.safetensors"  # shipped in this package's data/ folder
DRAWN_IDENTITIES = ("man", "woman", "boy", "girl")
# Head name -> the values it tells apart (PortraitAttributes' fields; a person is drawn as one of four).
HEADS: dict[str, tuple[str, ...]] = {**ATTRIBUTE_VALUES, "identity": DRAWN_IDENTITIES}
IGNORE = -100  # torch's cross-entropy ignore_index: an attribute the picture cannot show


def visible_labels(attributes: PortraitAttributes) -> dict[str, int]:
    """The class index per head, IGNORE where the picture cannot show the attribute."""
    labels = {name: values.index(getattr(attributes, name)) for name, values in HEADS.items() if name != "identity"}
    labels["identity"] = DRAWN_IDENTITIES.index(attributes.identity) if attributes.identity != "person" else IGNORE
    if "headscarf" in attributes.accessories:
        labels["hair_style"] = IGNORE
    if not attributes.hair_visible:
        labels["hair_color"] = IGNORE
    if not attributes.eyes_visible:
        labels["eye_color"] = IGNORE
    return labels


# Accessories a few pixels across (an earring is a ring ~4 px wide): the coarse network's first
# stage halves the picture and its average pooling dilutes them: trained with them, it found 1
# of 108 on held-out renders. DetailNet reads them at full resolution instead.
DETAIL_ACCESSORIES = ("earrings",)
DETAIL_COLUMNS = [ACCESSORIES.index(a) for a in DETAIL_ACCESSORIES]


def conv_stack(channels: list[int], strides: list[int]) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU from each channel count to the next, at these strides."""
    layers: list[nn.Module] = []
    for c_in, c_out, stride in zip(channels, channels[1:], strides):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out)]
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DetailNet(nn.Module):
    """Convolutions from full resolution to a 32 x 32 map of cells, a logit per cell (is the
    thing in these 4 x 4 pixels?), and the image's logit the largest of them. It trains on
    where the renderer drew each earring, not only whether: told only "somewhere in this
    picture", learning was hit or miss (two runs had found none after 600 and 1,000 steps). It
    has its own input path, so it trains after the coarse network, which it leaves as it was."""

    CELL = 4  # pixels per cell side: 128 -> 32

    def __init__(self, width: int = 16):
        super().__init__()
        channels = [3, width, width, width * 2, width * 2, width * 2]
        self.features = conv_stack(channels, strides=[1, 1, 2, 1, 2])
        self.cells = nn.Conv2d(channels[-1], len(DETAIL_ACCESSORIES), 1)

    def cell_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(N, len(DETAIL_ACCESSORIES), H / CELL, W / CELL): a logit per accessory and cell."""
        return self.cells(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Detail accessory logits, (N, len(DETAIL_ACCESSORIES)): the most confident cell's."""
        return self.cell_logits(images).amax(dim=(2, 3))


# Where a face's expression is drawn in a JUDGE_SIZE picture, (left, top, right, bottom): the
# pixels that change when the same portrait is drawn with another expression (mouth, eyes, brows)
# fell in x 33-92, y 39-84 over 300 renders of every view; 5 px of margin. Renders place the head
# within a few pixels of the centre, and generated pictures learnt that placement.
FACE_BOX = (28, 30, 100, 94)


class ExpressionNet(nn.Module):
    """The expression read from the face at full resolution: a smile, a frown or a sad mouth is
    3-5 px of lips, and the coarse network, whose first convolution halves the picture, got
    90.9% of held-out renders right (most misses side profiles, where the mouth is smallest).
    Two stride-1 convolutions, then four stride-2 stages (72 x 64 -> 5 x 4), global pooling,
    one linear layer."""

    def __init__(self, width: int = 16):
        super().__init__()
        channels = [3, width, width, width * 2, width * 4, width * 8, width * 8]
        self.features = conv_stack(channels, strides=[1, 1, 2, 2, 2, 2])
        self.head = nn.Linear(channels[-1], len(HEADS["expression"]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Expression logits, (N, len(HEADS["expression"])), of JUDGE_SIZE images."""
        left, top, right, bottom = FACE_BOX
        return self.head(self.features(images[:, :, top:bottom, left:right]).mean(dim=(2, 3)))


# The expression's log-probabilities are ExpressionNet's plus this share of the coarse head's:
# on 1,000 training-range validation renders (not the held-out ones), ExpressionNet alone 96.8%,
# the coarse head 91.5%, together with weight 0.25 / 0.5 / 1: 97.3 / 97.8 / 97.7%. The coarse
# head sees the whole head, and so its size, which a mouth's length is judged against (neutral vs
# serious: 13 of ExpressionNet's 32 misses).
COARSE_EXPRESSION_WEIGHT = 0.5


class JudgeNet(nn.Module):
    """Five stride-2 conv stages (128 -> 4), global average pooling, one linear head each (the
    coarse network); DetailNet beside it for what is a few pixels across, ExpressionNet for the
    face's expression."""

    def __init__(self, width: int = 16, detail_width: int = 16, expression_width: int = 16):
        super().__init__()
        # Channels double as the resolution halves, so each stage costs about the same.
        channels = [3, width, width * 2, width * 4, width * 8, width * 16]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.feature_dim = channels[-1]
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(v)) for name, v in HEADS.items()})
        self.accessories = nn.Linear(self.feature_dim, len(ACCESSORIES))
        # made last, in the order they were added, so the coarse network's initial weights are
        # those of a judge without them (and the detail network's of one without ExpressionNet)
        self.details = DetailNet(detail_width)
        self.expression = ExpressionNet(expression_width)

    def coarse_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith(("details.", "expression."))]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of images in [-1, 1], (N, 3, H, W) -> (N, feature_dim)."""
        return self.features(images).mean(dim=(2, 3))

    def coarse(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The coarse network's (logits per head, accessory logits)."""
        pooled = self.embed(images)
        return {name: head(pooled) for name, head in self.heads.items()}, self.accessories(pooled)

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(logits per head, accessory logits): the coarse network's, with the detail network's
        accessories in place of the coarse ones and the expression both networks' together."""
        logits, accessory_logits = self.coarse(images)
        accessory_logits = accessory_logits.clone()
        accessory_logits[:, DETAIL_COLUMNS] = self.details(images)
        expression = self.expression(images).log_softmax(-1)
        expression = expression + COARSE_EXPRESSION_WEIGHT * logits["expression"].log_softmax(-1)
        return {**logits, "expression": expression}, accessory_logits


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, JUDGE_SIZE, JUDGE_SIZE) in [-1, 1], resized if needed."""
    arrays = [
        np.asarray(
            im.convert("RGB").resize((JUDGE_SIZE, JUDGE_SIZE), Image.Resampling.BICUBIC)
            if im.size != (JUDGE_SIZE,) * 2
            else im.convert("RGB"),
            dtype=np.float32,
        )
        for im in images
    ]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0


@dataclass(frozen=True)
class Reading:
    """What the judge sees in one image: a value per head (with its probability) and the
    accessories it finds."""

    values: dict[str, str]
    confidence: dict[str, float]
    accessories: frozenset[str]


class Judge:
    """A trained JudgeNet with its weights; `read` images, `embed` them for a Fréchet distance."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @classmethod
    def packaged(cls) -> Judge:
        """The judge trained by `fusionserve train-judge` and shipped with the package."""
        return cls.load(Path(str(resources.files("deployments.models.portrait") / "data" / JUDGE_WEIGHTS)))

    @classmethod
    def load(cls, path: Path) -> Judge:
        state = {k: v.float() if v.dtype.is_floating_point else v for k, v in load_file(str(path)).items()}
        for network, reads in (("details", "earrings"), ("expression", "expression")):
            if f"{network}.features.0.weight" not in state:
                raise ValueError(
                    f"{path} is a judge from before its {network} network ({reads}): "
                    "train one with `fusionserve train-judge`, or leave --weights out for the packaged judge"
                )
        widths = (state[f"{prefix}features.0.weight"].shape[0] for prefix in ("", "details.", "expression."))
        net = JudgeNet(*widths)
        net.load_state_dict(state)
        return cls(net)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.net.state_dict()
        save_file(
            {k: (v.to(torch.float16) if v.dtype.is_floating_point else v).contiguous() for k, v in state.items()},
            str(path),
        )

    @torch.inference_mode()
    def read(self, images: list[Image.Image], batch_size: int = 64) -> list[Reading]:
        readings: list[Reading] = []
        for start in range(0, len(images), batch_size):
            logits, accessory_logits = self.net(to_tensor(images[start : start + batch_size]))
            probs = {name: torch.softmax(x, dim=-1) for name, x in logits.items()}
            worn = torch.sigmoid(accessory_logits) > 0.5
            for i in range(worn.shape[0]):
                best = {name: int(p[i].argmax()) for name, p in probs.items()}
                readings.append(
                    Reading(
                        values={name: HEADS[name][k] for name, k in best.items()},
                        confidence={name: round(float(probs[name][i, k]), 4) for name, k in best.items()},
                        accessories=frozenset(a for a, on in zip(ACCESSORIES, worn[i].tolist()) if on),
                    )
                )
        return readings

    @torch.inference_mode()
    def embed(self, images: list[Image.Image], batch_size: int = 64) -> np.ndarray:
        chunks = [self.net.embed(to_tensor(images[s : s + batch_size])) for s in range(0, len(images), batch_size)]
        return torch.cat(chunks).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, on judge
    features). tr sqrt(Ca Cb) is computed as the trace of sqrt(Ca^1/2 Cb Ca^1/2), a symmetric
    matrix, so symmetric eigensolvers suffice."""
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
