"""The samplers a request may ask for by name, each a diffusers scheduler with its settings.

Multistep solvers (DPM-Solver++ 2M, UniPC) reuse the previous steps' model outputs, so they
reach at 15-20 steps what DDIM needs more for; their state lives in the job's own scheduler
instance, so requests with different solvers and step counts share one UNet forward per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SolverName = Literal["ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]


@dataclass(frozen=True)
class Solver:
    scheduler_class: str  # a diffusers class name
    settings: dict[str, Any] = field(default_factory=dict)  # over the model's scheduler config


SOLVERS: dict[str, Solver] = {
    "ddim": Solver("DDIMScheduler"),
    "dpmpp_2m": Solver("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": Solver(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
    ),
    "unipc": Solver("UniPCMultistepScheduler", {"solver_order": 2}),
}


def make_scheduler(name: str | None, model_class: Any, model_config: Any, num_inference_steps: int) -> Any:
    """A fresh scheduler for one job: `name` a solver of SOLVERS or a diffusers scheduler class
    name; None: the model's own scheduler."""
    import diffusers

    settings: dict[str, Any] = {}
    scheduler_class = model_class
    if name in SOLVERS:
        solver = SOLVERS[name]
        scheduler_class, settings = getattr(diffusers, solver.scheduler_class), solver.settings
    elif name is not None and name != model_class.__name__:
        scheduler_class = getattr(diffusers, name, None)
        if scheduler_class is None or not name.endswith("Scheduler"):
            raise ValueError(f"unknown scheduler {name!r}; the solvers: {', '.join(SOLVERS)}")
    scheduler = scheduler_class.from_config(model_config, **settings)
    scheduler.set_timesteps(num_inference_steps)
    if hasattr(scheduler, "set_begin_index"):
        # The job walks the timesteps from the first. Without this, a multistep solver finds its
        # first step by looking the timestep up, and Karras sigmas can repeat a timestep (50 steps
        # on a 1000-step schedule): the lookup takes the second one and the last step overruns.
        scheduler.set_begin_index(0)
    return scheduler
