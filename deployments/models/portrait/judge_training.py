"""Training the judge on renders made on the fly, with checkpoints that resume exactly.

Batch `step` is a pure function of (seed, step): a run cut off at any point and resumed from
its last checkpoint sees the same batches as an uninterrupted one and ends with the same
weights. Evaluation renders use seeds from a range training never draws from.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import ImageFilter
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from deployments.models.portrait.attributes import ACCESSORIES, CHILDREN, PortraitAttributes, sample_attributes
from deployments.models.portrait.judge import (
    DETAIL_ACCESSORIES,
    DETAIL_COLUMNS,
    HEADS,
    IGNORE,
    DetailNet,
    Judge,
    JudgeNet,
    to_tensor,
    visible_labels,
)
from deployments.models.portrait.renderer import (
    accessory_pixels,
    hidden_accessories,
    render_portrait,
    shown_too_little,
)
from deployments.models.portrait.training_loop import Phase, run_phase

EXPRESSION_COLUMN = list(HEADS).index("expression")

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
    # Then the detail network (judge.DetailNet), apart from the coarse one, for earrings: the
    # coarse network, trained with them, found 1 of 108 on held-out renders.
    detail_steps: int = 1500
    detail_learning_rate: float = 2e-3
    # shown earrings are ~11% of renders: weighted up so that they are not learnt as noise
    detail_positive_weight: float = 4.0
    # Then the expression network (judge.ExpressionNet), apart from both: the coarse network's
    # expression head got 90.9% of held-out renders right.
    expression_steps: int = 3000
    expression_learning_rate: float = 2e-3


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
    detail_cells: torch.Tensor  # (N, len(DETAIL_ACCESSORIES), H / CELL, W / CELL) 1 where drawn, else 0


def render_batch(
    attributes: list[PortraitAttributes], seeds: list[int], blurs: list[float] | None = None
) -> LabelledBatch:
    """Renders with their labels; `blurs`: a Gaussian blur radius per image (0: sharp)."""
    renders = [render_portrait(a, s) for a, s in zip(attributes, seeds)]
    pixels = [accessory_pixels(a, s, image) for a, s, image in zip(attributes, seeds, renders)]
    hidden = [shown_too_little(p) for p in pixels]
    if blurs is not None:
        renders = [im.filter(ImageFilter.GaussianBlur(b)) if b else im for im, b in zip(renders, blurs)]
    labels = torch.tensor([[visible_labels(a)[name] for name in HEADS] for a in attributes], dtype=torch.long)
    worn = torch.tensor([[float(x in a.accessories) for x in ACCESSORIES] for a in attributes])
    shown = torch.tensor([[float(x not in h) for x in ACCESSORIES] for h in hidden])
    return LabelledBatch(to_tensor(renders), labels, worn, shown, _cells(pixels, renders[0].size[::-1]))


def _cells(pixels: list[dict[str, np.ndarray]], size: tuple[int, int]) -> torch.Tensor:
    """The detail accessories' pixel masks as DetailNet's cells: 1 where any pixel of the cell shows one."""
    masks = torch.tensor(
        np.stack([[p.get(name, np.zeros(size, dtype=bool)) for name in DETAIL_ACCESSORIES] for p in pixels]),
        dtype=torch.float32,
    )
    return nn.functional.max_pool2d(masks, DetailNet.CELL)


def training_batch(config: JudgeTrainingConfig, step: int, stream: str = "judge-train") -> LabelledBatch:
    """Batch `step` of a phase's `stream` of renders (each phase draws its own)."""
    rng = random.Random(f"{stream}:{config.seed}:{step}")
    attributes = [drawn_attributes(rng) for _ in range(config.batch_size)]
    seeds = [rng.randrange(2**31) for _ in attributes]
    blurs = [rng.uniform(0.3, config.max_blur) if rng.random() < 0.5 else 0.0 for _ in attributes]
    return render_batch(attributes, seeds, blurs if config.max_blur > 0 else None)


class _Batches(IterableDataset):
    def __init__(self, config: JudgeTrainingConfig, start: int, end: int, stream: str):
        self.config, self.start, self.end, self.stream = config, start, end, stream

    def __iter__(self) -> Iterator[LabelledBatch]:
        for step in range(self.start, self.end):
            yield training_batch(self.config, step, self.stream)


def judge_loss(net: JudgeNet, batch: LabelledBatch) -> torch.Tensor:
    """The coarse network's loss: every head and accessory."""
    logits, accessory_logits = net.coarse(batch.images)
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


def detail_loss(net: JudgeNet, batch: LabelledBatch, *, positive_weight: float) -> torch.Tensor:
    """The detail network's loss: per cell, where the renderer drew the accessory (cells that
    show one and cells that do not weigh the same in all: a few in a thousand show one), plus
    per image on its most confident cell, what the judge reports (hidden earrings left out)."""
    cell_logits = net.details.cell_logits(batch.images)
    drawn = batch.detail_cells
    cell_loss = nn.functional.binary_cross_entropy_with_logits(cell_logits, drawn, reduction="none")
    balanced = (cell_loss * drawn).sum() / drawn.sum().clamp(min=1) + (cell_loss * (1 - drawn)).sum() / (
        1 - drawn
    ).sum().clamp(min=1)
    return balanced + nn.functional.binary_cross_entropy_with_logits(
        cell_logits.amax(dim=(2, 3)),
        batch.accessories[:, DETAIL_COLUMNS],
        weight=batch.accessories_shown[:, DETAIL_COLUMNS],
        pos_weight=torch.full((len(DETAIL_COLUMNS),), positive_weight),
    )


def expression_loss(net: JudgeNet, batch: LabelledBatch) -> torch.Tensor:
    """The expression network's loss: cross-entropy on the face's expression."""
    return nn.functional.cross_entropy(net.expression(batch.images), batch.labels[:, EXPRESSION_COLUMN])


def _phase(
    name: str, modules: dict[str, nn.Module], parameters: list[nn.Parameter], lr: float, wd: float, steps: int
) -> Phase:
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=wd)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1))
    return Phase(name, modules, optimizer, schedule, steps)


def initial_net(config: JudgeTrainingConfig) -> JudgeNet:
    """The JudgeNet a run of `config` starts from (seeded: every run starts alike)."""
    torch.manual_seed(config.seed)
    return JudgeNet(config.width)


def train_judge(
    config: JudgeTrainingConfig,
    directory: Path,
    *,
    stop_after: int | None = None,
    progress: bool = True,
    workers: int = 1,
) -> Judge:
    """Train (or resume) in `directory` (checkpoints + loss logs): the coarse network, then the
    detail network, then the expression network. `stop_after` steps of this call (all phases
    counted) simulate a cut-off run. Returns the judge as it stands."""
    torch.set_num_threads(config.threads)
    net = initial_net(config)
    coarse = _phase(
        "judge", {"net": net}, net.coarse_parameters(), config.learning_rate, config.weight_decay, config.steps
    )
    coarse.restore(directory)
    loss = functools.partial(judge_loss, net)
    budget = _run(coarse, config, "judge-train", loss, directory, stop_after, progress, workers)
    if coarse.step < config.steps:
        return Judge(net)
    for part in PARTS:
        budget = train_judge_part(part, config, net, directory, stop_after=budget, progress=progress, workers=workers)
        if budget == 0:
            break
    return Judge(net)


@dataclass(frozen=True)
class JudgePart:
    """A network of the judge trained on its own after the coarse one (which it neither reads nor changes)."""

    module: str  # JudgeNet's attribute
    phase: str  # the checkpoint's name
    stream: str  # its renders
    loss: Callable[[JudgeNet, JudgeTrainingConfig, LabelledBatch], torch.Tensor]
    steps: Callable[[JudgeTrainingConfig], int]
    learning_rate: Callable[[JudgeTrainingConfig], float]


PARTS = (
    JudgePart(
        "details",
        "judge_details",
        "judge-details",
        lambda net, config, batch: detail_loss(net, batch, positive_weight=config.detail_positive_weight),
        lambda config: config.detail_steps,
        lambda config: config.detail_learning_rate,
    ),
    JudgePart(
        "expression",
        "judge_expression",
        "judge-expression",
        lambda net, _config, batch: expression_loss(net, batch),
        lambda config: config.expression_steps,
        lambda config: config.expression_learning_rate,
    ),
)


def train_judge_part(
    part: JudgePart,
    config: JudgeTrainingConfig,
    net: JudgeNet,
    directory: Path,
    *,
    stop_after: int | None = None,
    progress: bool = True,
    workers: int = 1,
) -> int | None:
    """One part's phase alone: `net`'s `part` network trained (or resumed); the rest of the
    judge is neither changed nor updates its statistics (eval mode). Returns the budget left."""
    torch.set_num_threads(config.threads)
    net.eval()
    module = getattr(net, part.module)
    phase = _phase(
        part.phase,
        {part.module: module},
        list(module.parameters()),
        part.learning_rate(config),
        config.weight_decay,
        part.steps(config),
    )
    phase.restore(directory)
    loss = functools.partial(part.loss, net, config)
    return _run(phase, config, part.stream, loss, directory, stop_after, progress, workers)


def _run(
    phase: Phase,
    config: JudgeTrainingConfig,
    stream: str,
    loss: Callable[[LabelledBatch], torch.Tensor],
    directory: Path,
    budget: int | None,
    progress: bool,
    workers: int,
) -> int | None:
    """Steps `phase` on its stream of renders until its end or `budget` steps; returns the budget left."""
    end = phase.steps if budget is None else min(phase.steps, phase.step + budget)
    start = phase.step
    if start < end:
        batches = DataLoader(
            _Batches(config, start, end, stream),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=2 if workers else None,
        )
        run_phase(
            phase,
            batches,
            lambda batch, _step: loss(batch),
            directory,
            checkpoint_every=config.checkpoint_every,
            end=end,
            progress=progress,
            clip_grad_norm=None,
            log_every=20,
        )
    return None if budget is None else budget - (end - start)


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
