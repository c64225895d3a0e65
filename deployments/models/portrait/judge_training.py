"""Training the judge on renders made on the fly, with checkpoints that resume exactly.

Batch `step` is a pure function of (seed, step): a run cut off at any point and resumed from
its last checkpoint sees the same batches as an uninterrupted one and ends with the same
weights. Evaluation renders use seeds from a range training never draws from.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from deployments.models.portrait.attributes import ACCESSORIES, CHILDREN, PortraitAttributes, sample_attributes
from deployments.models.portrait.judge import HEADS, IGNORE, Judge, JudgeNet, to_tensor, visible_labels
from deployments.models.portrait.renderer import render_portrait

EVAL_SEED_OFFSET = 2**40  # render seeds of evaluation images; training seeds stay below 2**31
CHECKPOINT_NAME = "judge_checkpoint.pt"


@dataclass(frozen=True)
class JudgeTrainingConfig:
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16
    seed: int = 0
    checkpoint_every: int = 200
    threads: int = 1  # torch threads of the trainer; one data worker renders beside it


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


def render_batch(attributes: list[PortraitAttributes], seeds: list[int]) -> LabelledBatch:
    images = to_tensor([render_portrait(a, s) for a, s in zip(attributes, seeds)])
    labels = torch.tensor([[visible_labels(a)[name] for name in HEADS] for a in attributes], dtype=torch.long)
    worn = torch.tensor([[float(x in a.accessories) for x in ACCESSORIES] for a in attributes])
    return LabelledBatch(images, labels, worn)


def training_batch(config: JudgeTrainingConfig, step: int) -> LabelledBatch:
    rng = random.Random(f"judge-train:{config.seed}:{step}")
    attributes = [drawn_attributes(rng) for _ in range(config.batch_size)]
    return render_batch(attributes, [rng.randrange(2**31) for _ in attributes])


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
    return loss + nn.functional.binary_cross_entropy_with_logits(accessory_logits, batch.accessories)


@dataclass
class _State:
    net: JudgeNet
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    step: int


def _new_state(config: JudgeTrainingConfig) -> _State:
    torch.manual_seed(config.seed)
    net = JudgeNet(config.width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=config.steps)
    return _State(net, optimizer, schedule, 0)


def _save_checkpoint(state: _State, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / (CHECKPOINT_NAME + ".partial")
    torch.save(
        {
            "net": state.net.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "schedule": state.schedule.state_dict(),
            "step": state.step,
        },
        partial,
    )
    partial.replace(directory / CHECKPOINT_NAME)  # atomic: a cut-off run never leaves half a checkpoint


def _load_checkpoint(config: JudgeTrainingConfig, directory: Path) -> _State:
    state = _new_state(config)
    path = directory / CHECKPOINT_NAME
    if path.exists():
        saved = torch.load(path, weights_only=True)
        state.net.load_state_dict(saved["net"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.schedule.load_state_dict(saved["schedule"])
        state.step = int(saved["step"])
    return state


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
    state = _load_checkpoint(config, directory)
    state.net.train()
    end = config.steps if stop_after is None else min(config.steps, state.step + stop_after)
    batches = DataLoader(
        _Batches(config, state.step), batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None
    )
    log_path = directory / "judge_loss.jsonl"
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (
        log_path.open("a") as log,
        tqdm(total=config.steps, initial=state.step, disable=not progress, desc="judge") as bar,
    ):
        for batch in batches:
            if state.step >= end:
                break
            loss = judge_loss(state.net, batch)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            state.schedule.step()
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if state.step % 20 == 0:
                log.write(
                    json.dumps(
                        {
                            "step": state.step,
                            "loss": round(loss.item(), 5),
                            "seconds": round(time.perf_counter() - started, 1),
                        }
                    )
                    + "\n"
                )
                log.flush()
            if state.step % config.checkpoint_every == 0 or state.step == end:
                _save_checkpoint(state, directory)
    return Judge(state.net)


def evaluation_set(
    count: int, seed: int = 0, sampler: Callable[[random.Random], PortraitAttributes] = drawn_attributes
) -> tuple[list[PortraitAttributes], list[int]]:
    """`count` portraits with render seeds training never draws (held-out renders)."""
    rng = random.Random(f"judge-eval:{seed}")
    attributes = [sampler(rng) for _ in range(count)]
    return attributes, [EVAL_SEED_OFFSET + rng.randrange(2**31) for _ in attributes]


def judge_accuracy(judge: Judge, attributes: list[PortraitAttributes], seeds: list[int]) -> dict[str, float]:
    """Accuracy per head (over the images that show it) and per accessory (present or not)."""
    images = [render_portrait(a, s) for a, s in zip(attributes, seeds)]
    readings = judge.read(images)
    correct: dict[str, list[bool]] = {}
    for truth, reading in zip(attributes, readings):
        for name, label in visible_labels(truth).items():
            if label != IGNORE:
                correct.setdefault(name, []).append(reading.values[name] == HEADS[name][label])
        for accessory in ACCESSORIES:
            correct.setdefault(accessory, []).append(
                (accessory in truth.accessories) == (accessory in reading.accessories)
            )
    return {name: sum(flags) / len(flags) for name, flags in correct.items()}
