"""The clean latent x0 a step's model output predicts: what a live preview shows and what the
convergence early stop compares, whatever the model predicts (epsilon, v or the sample).

For the DDPM family of schedulers (DDIM, DDPM, PNDM, DPM-Solver, UniPC: they keep
`alphas_cumprod` and an unscaled x_t), with a_t = alphas_cumprod[t]:
  epsilon: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
  v:       x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v
  sample:  x0 = the output
Sigma-parameterised schedulers (Euler, ...: init_noise_sigma != 1) are not covered: None.
"""

from __future__ import annotations

from typing import Any

import torch


def predicted_clean_latent(
    scheduler: Any, sample: torch.Tensor, model_output: torch.Tensor, timestep: torch.Tensor | int
) -> torch.Tensor | None:
    """x0 predicted at `timestep` from `sample` (x_t) and the (guided) `model_output`; None when
    the scheduler is not of the DDPM family."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        return None
    alpha = alphas[int(timestep)].to(sample.dtype)
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction == "epsilon":
        x0 = (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt().clamp_min(1e-8)
    elif prediction == "v_prediction":
        x0 = alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
    elif prediction == "sample":
        x0 = model_output
    else:
        return None
    if scheduler.config.get("clip_sample", False):  # as the scheduler's own step clips it
        limit = float(scheduler.config.get("clip_sample_range", 1.0))
        x0 = x0.clamp(-limit, limit)
    return x0
