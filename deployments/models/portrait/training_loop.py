"""The training loop both portrait trainings share (the judge's and the model's): modules,
optimizer and schedule saved and restored together, atomic checkpoints, a loss log and a
progress bar. A phase resumes from its checkpoint at the step it reached."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm


@dataclass
class Phase:
    """One trained phase: its modules, optimizer and schedule, saved and restored together."""

    name: str
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    steps: int
    step: int = 0

    @property
    def checkpoint(self) -> str:
        return f"{self.name}_checkpoint.pt"

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        partial = directory / (self.checkpoint + ".partial")
        state: dict[str, Any] = {f"module.{k}": m.state_dict() for k, m in self.modules.items()}
        state |= {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "step": self.step}
        torch.save(state, partial)
        partial.replace(directory / self.checkpoint)  # atomic: a cut-off run never leaves half a checkpoint

    def restore(self, directory: Path) -> None:
        path = directory / self.checkpoint
        if not path.exists():
            return
        state = torch.load(path, weights_only=True)
        for key, module in self.modules.items():
            module.load_state_dict(state[f"module.{key}"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step = int(state["step"])


def run_phase(
    phase: Phase,
    batches: Iterable[Any],
    loss_of: Callable[[Any, int], torch.Tensor],
    directory: Path,
    *,
    checkpoint_every: int,
    end: int,
    progress: bool,
    clip_grad_norm: float | None = 1.0,
    log_every: int = 25,
) -> None:
    """Steps `phase` from its step to `end`, checkpointing every `checkpoint_every` steps and at
    `end`, logging the loss every `log_every` steps; gradients clipped to `clip_grad_norm` (None: not)."""
    for module in phase.modules.values():
        module.train()
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / f"{phase.name}_loss.jsonl"
    started = time.perf_counter()
    with (
        log_path.open("a") as log,
        tqdm(total=phase.steps, initial=phase.step, desc=phase.name, disable=not progress) as bar,
    ):
        for batch in batches:
            if phase.step >= end:
                break
            loss = loss_of(batch, phase.step)
            phase.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_([p for m in phase.modules.values() for p in m.parameters()], clip_grad_norm)
            phase.optimizer.step()
            phase.schedule.step()
            phase.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if phase.step % log_every == 0:
                log.write(
                    json.dumps(
                        {
                            "step": phase.step,
                            "loss": round(loss.item(), 6),
                            "seconds": round(time.perf_counter() - started, 1),
                        }
                    )
                    + "\n"
                )
                log.flush()
            if phase.step % checkpoint_every == 0 or phase.step == end:
                phase.save(directory)
    for module in phase.modules.values():
        module.eval()
