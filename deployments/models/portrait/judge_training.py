"""Training the judge on renders made on the fly, with checkpoints that resume exactly.

Batch `step` is a pure function of (seed, step): a run cut off at any point and resumed from
its last checkpoint sees the same batches as an uninterrupted one and ends with the same
weights. Evaluation renders use seeds from a range training never draws from.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import ImageFilter
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from deployments.models.portrait.attributes import ACCESSORIES, CHILDREN, PortraitAttributes, sample_attributes
from deployments.models.portrait.judge import HEADS, IGNORE, Judge, JudgeNet, to_tensor, visible_labels
from deployments.models.portrait.renderer import hidden_accessories, render_portrait
from deployments.models.portrait.training_loop import Phase, run_phase

EVAL_SEED_OFFSET = 2**40  # render seeds of evaluation images; training seeds stay below 2**31


@dataclass(frozen=True)
class JudgeTrainingConfig:
    steps: int = 8000
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16
    seed: int = 0
    checkpoint_every: int = 200
    threads: int = 1  # torch threads of the trainer; one data worker renders beside it
    # Half of each batch is blurred (Gaussian, sigma up to this many pixels): a smile or an
    # earring is a few pixels, and a judge trained on sharp renders alone read a sigma-1 blur
    # of them 8 points worse, so it scored how sharp a picture is, not what it shows.
    max_blur: float = 1.2


def drawn_attributes(rng: random.Random) -> PortraitAttributes:
    """A random portrait whose identity is what the picture shows (a person is drawn as one
    of man, woman, boy, girl): the judge learns the four it can see."""
    attributes = sample_attributes(rng)
    if attributes.identity != "person":
        return attributes
    if attributes.age == "child":
        return replace(attributes, identity=rng.choice(sorted(CHILDREN)))
    return replace(attributes, identity=rng.choice(("man", "woman")), facial_hair="clean shaven")


@dataclass(frozen=True)
class LabelledBatch:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    labels: torch.Tensor  # (N, len(HEADS)) class indices, IGNORE where not visible
    accessories: torch.Tensor  # (N, len(ACCESSORIES)) 0/1
    accessories_shown: torch.Tensor  # (N, len(ACCESSORIES)) 1 where the picture can tell, else 0


def render_batch(
    attributes: list[PortraitAttributes], seeds: list[int], blurs: list[float] | None = None
) -> LabelledBatch:
    """Renders with their labels; `blurs`: a Gaussian blur radius per image (0: sharp)."""
    renders = [render_portrait(a, s) for a, s in zip(attributes, seeds)]
    hidden = [hidden_accessories(a, s, image) for a, s, image in zip(attributes, seeds, renders)]
    if blurs is not None:
        renders = [im.filter(ImageFilter.GaussianBlur(b)) if b else im for im, b in zip(renders, blurs)]
    labels = torch.tensor([[visible_labels(a)[name] for name in HEADS] for a in attributes], dtype=torch.long)
    worn = torch.tensor([[float(x in a.accessories) for x in ACCESSORIES] for a in attributes])
    shown = torch.tensor([[float(x not in h) for x in ACCESSORIES] for h in hidden])
    return LabelledBatch(to_tensor(renders), labels, worn, shown)


def training_batch(config: JudgeTrainingConfig, step: int) -> LabelledBatch:
    rng = random.Random(f"judge-train:{config.seed}:{step}")
    attributes = [drawn_attributes(rng) for _ in range(config.batch_size)]
    seeds = [rng.randrange(2**31) for _ in attributes]
    blurs = [rng.uniform(0.3, config.max_blur) if rng.random() < 0.5 else 0.0 for _ in attributes]
    return render_batch(attributes, seeds, blurs if config.max_blur > 0 else None)


class _Batches(IterableDataset):
    def __init__(self, config: JudgeTrainingConfig, start: int):
        self.config, self.start = config, start

    def __iter__(self) -> Iterator[LabelledBatch]:
        for step in range(self.start, self.config.steps):
            yield training_batch(self.config, step)


def judge_loss(net: JudgeNet, batch: LabelledBatch) -> torch.Tensor:
    logits, accessory_logits = net(batch.images)
    loss = sum(
        (
            nn.functional.cross_entropy(logits[name], batch.labels[:, i], ignore_index=IGNORE)
            for i, name in enumerate(HEADS)
        ),
        start=torch.zeros(()),
    )
    # an accessory the picture hides (earrings under hair) teaches nothing either way
    return loss + nn.functional.binary_cross_entropy_with_logits(
        accessory_logits, batch.accessories, weight=batch.accessories_shown
    )


def _judge_phase(config: JudgeTrainingConfig, net: JudgeNet) -> Phase:
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=config.steps)
    return Phase("judge", {"net": net}, optimizer, schedule, config.steps)


def train_judge(
    config: JudgeTrainingConfig,
    directory: Path,
    *,
    stop_after: int | None = None,
    progress: bool = True,
    workers: int = 1,
) -> Judge:
    """Train (or resume) in `directory` (checkpoint + loss log); `stop_after` steps of this
    call simulate a cut-off run. Returns the judge as it stands."""
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    net = JudgeNet(config.width)
    phase = _judge_phase(config, net)
    phase.restore(directory)
    end = config.steps if stop_after is None else min(config.steps, phase.step + stop_after)
    batches = DataLoader(
        _Batches(config, phase.step), batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None
    )
    run_phase(
        phase,
        batches,
        lambda batch, _step: judge_loss(net, batch),
        directory,
        checkpoint_every=config.checkpoint_every,
        end=end,
        progress=progress,
        clip_grad_norm=None,
        log_every=20,
    )
    return Judge(net)


def evaluation_set(
    count: int, seed: int = 0, sampler: Callable[[random.Random], PortraitAttributes] = drawn_attributes
) -> tuple[list[PortraitAttributes], list[int]]:
    """`count` portraits with render seeds training never draws (held-out renders)."""
    rng = random.Random(f"judge-eval:{seed}")
    attributes = [sampler(rng) for _ in range(count)]
    return attributes, [EVAL_SEED_OFFSET + rng.randrange(2**31) for _ in attributes]


def judge_accuracy(judge: Judge, attributes: list[PortraitAttributes], seeds: list[int]) -> dict[str, float]:
    """Accuracy per head (over the images that show it) and per accessory (present or not,
    over the images where it is absent or shown: not earrings the hair hides)."""
    images = [render_portrait(a, s) for a, s in zip(attributes, seeds)]
    readings = judge.read(images)
    correct: dict[str, list[bool]] = {}
    for truth, seed, image, reading in zip(attributes, seeds, images, readings):
        for name, label in visible_labels(truth).items():
            if label != IGNORE:
                correct.setdefault(name, []).append(reading.values[name] == HEADS[name][label])
        hidden = hidden_accessories(truth, seed, image)
        for accessory in ACCESSORIES:
            if accessory not in hidden:
                correct.setdefault(accessory, []).append(
                    (accessory in truth.accessories) == (accessory in reading.accessories)
                )
    return {name: sum(flags) / len(flags) for name, flags in correct.items()}
