"""How many denoising steps a request gets, and why.

Policies (serve_config.yaml `steps.policy`, per request `step_policy`):

- `fixed`: `steps.fixed_steps` for every request.
- `complexity`: a score in [0, 1] from the request, mapped linearly onto the quality tier's
  [min, max] range (balanced: 15-30). The score is 0.6 x the recognised attributes (identity,
  age, glasses, hair, ...; 8 or more count as 1) + 0.4 x the prompt's own tokens (template
  excluded; 60 or more count as 1), averaged half and half with the input image's edge
  density for edits. Why: every attribute is a constraint the image must satisfy and a
  long prompt asks for detail, and detail is what the late, low-noise steps refine; a bare
  "portrait" has little of it (on the embedded model 15 steps already reach 30-33 dB PSNR
  against 50, see README). A heuristic, not yet backed by data: on the trained portrait
  model (benchmarks/portrait_quality.py, 2026-12-06) adherence is flat from 10 to 50 steps
  for prompts asking 3 to 10 attributes (within 2 points), because that model does not yet
  draw the details late steps refine; re-measure when it does, then set the mapping.
- `slo`: the largest step count in [min, complexity choice] whose predicted latency meets
  the deadline (request `deadline_ms`, else `steps.deadline_ms`), from the denoiser's live
  load (`LoadSnapshot`): ms per step at the batch occupancy this request would join, and
  the queued work ahead of it, scaled by a factor learned from served requests (actual /
  predicted). With capacity to spare it equals the `complexity` choice;
  when even `min` cannot make it, the request gets `min` and reason `slo:infeasible`.

Edits run only the last `strength` x steps (deployments/edit_latents.py): the cost model
counts those, so at strength 0.3 the slo policy affords the tier's top count where a
generation would be cut; and an edit always gets at least the steps that make one run.

An explicit `num_inference_steps` always wins; `quality` (fast | balanced | best) picks the
range. Plain Python: the ingress calls it between the encoder and the denoiser.

**With a measured table** (`sampler_table.py`: sampler x steps x cache interval, their cost in
whole-UNet-step equivalents and their adherence, written by benchmarks/step_savings.py) the
controller chooses the sampler, the steps and the cache interval together, unless the policy
is `fixed`: the cheapest setting within the tier's `max_adherence_drop` of the table's best
adherence and at least its `min_psnr_db` (reason `table`); under `slo`, if that one misses the
deadline, the setting of highest adherence that meets it (`table:slo`), or the cheapest of all
(`table:slo-infeasible`). A request's own `scheduler` or `cache_interval` narrows the table
to the rows that agree; a request with its own `num_inference_steps` (or whose fields no row
agrees with) gets those steps, its own sampler or the model's, and caching only if it asks.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

import numpy as np

from deployments.common.vae_scale import latent_shape
from deployments.denoiser.edit_latents import denoising_steps
from deployments.denoiser.step_batcher import LoadSnapshot
from deployments.prompt.optimizer import OptimizedPrompt
from serve_app.config import StepPolicy, StepSettings
from serve_app.flow.request import ImageRequest
from serve_app.flow.sampler_table import SamplerSetting, SamplerTable, acceptable

ATTRIBUTES_FOR_FULL_SCORE = 8
TOKENS_FOR_FULL_SCORE = 60
EDGE_THRESHOLD = 0.08  # a gradient step of 8% of the grey range counts as an edge
EDGE_DENSITY_FOR_FULL_SCORE = 0.25  # busy photos (hair, foliage, text) reach ~0.25; studio portraits ~0.05


@dataclass(frozen=True)
class StepDecision:
    steps: int
    reason: str  # explicit | fixed | complexity | slo | slo:reduced | slo:infeasible | slo:no-timings | quality-guard
    policy: str = "explicit"
    complexity: float | None = None
    deadline_ms: float | None = None  # the latency target the request is judged against (slo)
    predicted_ms: float | None = None  # what the cost model expected for the whole request
    predicted_denoise_ms: float | None = None  # the denoise part, before calibration (observe_denoise)
    scheduler: str | None = None  # the sampler (solvers.py); None: the model's own
    cache_interval: int = 1  # feature caching across steps (deep_cache.py); 1: off
    cache_branch_id: int = 0
    sampler_reason: str = "default"  # explicit | default | table | table:slo | table:slo-infeasible | quality-guard


def prompt_complexity(prompt: OptimizedPrompt) -> float:
    """0 (a bare word) to 1 (many attributes, a long prompt)."""
    attributes = prompt.attribute_count()
    own_tokens = max(0, prompt.prompt_tokens - max(0, prompt.prefix_tokens - 1))
    return 0.6 * min(1.0, attributes / ATTRIBUTES_FOR_FULL_SCORE) + 0.4 * min(1.0, own_tokens / TOKENS_FOR_FULL_SCORE)


def image_detail(pixels: np.ndarray) -> float:
    """Edge density of an image ([H, W] or [H, W, C], uint8 or float in [0, 1]) scaled to
    [0, 1]: the share of pixels whose grey-level gradient exceeds EDGE_THRESHOLD."""
    grey = np.asarray(pixels, dtype=np.float64)
    if grey.max(initial=0.0) > 1.0:
        grey = grey / 255.0
    if grey.ndim == 3:
        grey = grey[..., :3].mean(axis=2)
    if grey.shape[0] < 2 or grey.shape[1] < 2:
        return 0.0
    dx = np.abs(np.diff(grey, axis=1))[:-1, :]
    dy = np.abs(np.diff(grey, axis=0))[:, :-1]
    density = float((np.hypot(dx, dy) > EDGE_THRESHOLD).mean())
    return min(1.0, density / EDGE_DENSITY_FOR_FULL_SCORE)


def complexity_score(prompt: OptimizedPrompt, detail: float | None = None) -> float:
    score = prompt_complexity(prompt)
    return score if detail is None else 0.5 * score + 0.5 * detail


def steps_for_score(score: float, low: int, high: int) -> int:
    return low + round(min(1.0, max(0.0, score)) * (high - low))


def _interpolate(table: dict[int, float], images: int) -> float:
    """ms of one forward with `images` in the batch from the measured occupancies. Beyond
    the largest measured it scales linearly with the images (pessimistic: real forwards grow
    slower), below the smallest it takes the smallest's time (also pessimistic)."""
    if images in table:
        return table[images]
    known = sorted(table)
    position = bisect.bisect_left(known, images)
    if position == 0:
        return table[known[0]]
    if position == len(known):
        return table[known[-1]] * images / known[-1]
    low, high = known[position - 1], known[position]
    share = (images - low) / (high - low)
    return table[low] + share * (table[high] - table[low])


def step_ms(load: LoadSnapshot, latent_shape: tuple[int, int], images: int) -> float | None:
    """Predicted ms of one UNet forward for a batch of `images` of this latent size; from
    another size's timings scaled by pixels when this one has none; None with no timings."""
    tables = {shape: table for shape, table in load.step_ms_by_shape.items() if table}
    key = f"{latent_shape[0]}x{latent_shape[1]}"
    if key in tables:
        return _interpolate(tables[key], images)
    if not tables:
        return None
    pixels = latent_shape[0] * latent_shape[1]

    def size_of(name: str) -> int:
        height, width = (int(part) for part in name.split("x"))
        return height * width

    nearest = min(tables, key=lambda name: abs(size_of(name) - pixels))
    return _interpolate(tables[nearest], images) * pixels / size_of(nearest)


def predict_denoise_ms(load: LoadSnapshot, steps: float, images: int, latent_shape: tuple[int, int]) -> float | None:
    """When a job submitted now would finish: the larger of its own chain of steps (each
    as slow as the batch it joins) and the time the replica needs to drain all the work
    queued ahead of it plus its own at full-batch throughput (FIFO: with the batch full,
    it waits for slots)."""
    capacity = max(load.max_batch_size, images)
    # as full as the batch is now with this job, or as it has been lately: jobs arriving
    # after this one join its batch too
    occupancy = min(capacity, max(load.active_images + load.waiting_images + images, round(load.recent_occupancy)))
    per_step, full_batch = step_ms(load, latent_shape, occupancy), step_ms(load, latent_shape, capacity)
    if per_step is None or full_batch is None:
        return None
    work_ahead = load.queued_work / (latent_shape[0] * latent_shape[1])  # image-steps of this size
    drain = (work_ahead + steps * images) * full_batch / capacity
    return max(steps * per_step, drain)


class StepController:
    def __init__(self, settings: StepSettings | None = None, table: SamplerTable | None = None):
        self.settings = settings or StepSettings()
        self.table = table
        self._decode_ms_per_pixel: float | None = None  # moving average, learned from served requests
        self.calibration = 1.0  # actual / predicted denoise time, moving average (observe_denoise)

    def policy_for(self, request: ImageRequest) -> StepPolicy:
        if request.step_policy is not None:
            return request.step_policy
        return "slo" if request.deadline_ms is not None else self.settings.policy

    def range_for(self, request: ImageRequest) -> tuple[int, int]:
        """[min, max] steps of the request's quality tier."""
        return self.settings.ranges[request.quality or self.settings.default_quality]

    def needs_load(self, request: ImageRequest) -> bool:
        """Whether `choose` would use the denoiser's live load (worth a call to fetch it)."""
        return request.num_inference_steps is None and self.policy_for(request) == "slo"

    def slo_deadline_ms(self, request: ImageRequest) -> float:
        """The latency target the `slo` policy judges the request against."""
        return request.deadline_ms or self.settings.deadline_ms

    def choose(
        self,
        request: ImageRequest,
        prompt: OptimizedPrompt,
        load: LoadSnapshot | None = None,
        elapsed_ms: float = 0.0,
        detail: float | None = None,
    ) -> StepDecision:
        """Steps, sampler and cache interval. `elapsed_ms`: time the request has already spent
        (prompt, encoder); `detail`: the input image's `image_detail` for edits."""
        rows = self.table_rows(request)
        if rows:
            return self._choose_from_table(request, rows, load, elapsed_ms)
        decision = self.choose_steps(request, prompt, load, elapsed_ms, detail)
        explicit = request.scheduler is not None or request.cache_interval is not None
        return dataclasses.replace(
            decision,
            scheduler=request.scheduler,
            cache_interval=request.cache_interval or 1,
            cache_branch_id=request.cache_branch_id or 0,
            sampler_reason="explicit" if explicit else "default",
        )

    def table_rows(self, request: ImageRequest) -> list[SamplerSetting]:
        """The table's settings this request may get (none: no table, the fixed policy, steps
        the request fixed itself, or nothing agrees with its scheduler or cache interval)."""
        if self.table is None or self.policy_for(request) == "fixed":
            return []
        if request.num_inference_steps is not None:
            return []  # explicit steps: the request's sampler (or the model's own), no caching unless asked
        if request.cache_branch_id not in (None, 0):
            return []  # the table was measured at branch 0
        return self.table.matching(request.scheduler, None, request.cache_interval)

    def _choose_from_table(
        self, request: ImageRequest, rows: list[SamplerSetting], load: LoadSnapshot | None, elapsed_ms: float
    ) -> StepDecision:
        tier = request.quality or self.settings.default_quality
        candidates = acceptable(rows, self.settings.max_adherence_drop[tier], self.settings.min_psnr_db[tier])
        policy = self.policy_for(request)
        choice, reason, predicted, raw = candidates[0], "table", None, None
        deadline = self.slo_deadline_ms(request) if policy == "slo" else request.deadline_ms
        if deadline is not None and policy == "slo" and load is not None:
            latents = latent_shape(request.height, request.width)
            spent = elapsed_ms + self.decode_estimate_ms(request)

            def predicted_ms(setting: SamplerSetting) -> tuple[float, float] | None:
                work = setting.step_equivalents * self.steps_run(setting.steps, request) / setting.steps
                denoise = predict_denoise_ms(load, work, request.n, latents)
                return None if denoise is None else (spent + denoise * self.calibration, denoise)

            first = predicted_ms(choice)
            if first is not None:
                predicted, raw = first
                if predicted > deadline:  # the best that makes it, else the cheapest of all
                    by_adherence = sorted(rows, key=lambda s: (-s.adherence, s.step_equivalents))
                    estimates = ((s, predicted_ms(s)) for s in by_adherence)
                    fitting = next(((s, e) for s, e in estimates if e is not None and e[0] <= deadline), None)
                    if fitting is not None:
                        (choice, (predicted, raw)), reason = fitting, "table:slo"
                    else:
                        choice = min(rows, key=lambda s: s.step_equivalents)
                        predicted, raw = predicted_ms(choice) or (predicted, raw)
                        reason = "table:slo-infeasible"
        return StepDecision(
            self.at_least_one_step(choice.steps, request),
            reason,
            policy,
            deadline_ms=deadline,
            predicted_ms=None if predicted is None else round(predicted, 1),
            predicted_denoise_ms=raw,
            scheduler=choice.scheduler,
            cache_interval=choice.cache_interval,
            cache_branch_id=choice.cache_branch_id,
            sampler_reason=reason,
        )

    def choose_steps(
        self,
        request: ImageRequest,
        prompt: OptimizedPrompt,
        load: LoadSnapshot | None = None,
        elapsed_ms: float = 0.0,
        detail: float | None = None,
    ) -> StepDecision:
        """The step count alone, from the tier's step range (no table)."""
        if request.num_inference_steps is not None:
            return StepDecision(request.num_inference_steps, "explicit", "explicit", deadline_ms=request.deadline_ms)
        policy = self.policy_for(request)
        if policy == "fixed":
            return StepDecision(self.at_least_one_step(self.settings.fixed_steps, request), "fixed", policy)
        low, high = (self.at_least_one_step(steps, request) for steps in self.range_for(request))
        score = round(complexity_score(prompt, detail), 4)
        target = steps_for_score(score, low, high)
        if policy == "complexity":
            return StepDecision(target, "complexity", policy, score)
        deadline = self.slo_deadline_ms(request)
        if load is None:
            return StepDecision(target, "slo:no-timings", policy, score, deadline)
        latents = latent_shape(request.height, request.width)
        spent = elapsed_ms + self.decode_estimate_ms(request)
        for steps in range(target, low - 1, -1):  # the cost grows with the steps: first fit is the largest
            raw = predict_denoise_ms(load, self.steps_run(steps, request), request.n, latents)
            if raw is None:
                return StepDecision(target, "slo:no-timings", policy, score, deadline)
            predicted = spent + raw * self.calibration
            if predicted <= deadline or steps == low:  # the minimum when nothing fits
                reason = "slo:infeasible" if predicted > deadline else "slo" if steps == target else "slo:reduced"
                return StepDecision(steps, reason, policy, score, deadline, round(predicted, 1), raw)
        raise AssertionError(f"empty step range {low}..{target}")

    @staticmethod
    def steps_run(num_inference_steps: int, request: ImageRequest) -> int:
        """UNet steps the request costs: all of them, or an edit's strength x steps."""
        return denoising_steps(num_inference_steps, request.strength) if request.is_edit else num_inference_steps

    def at_least_one_step(self, num_inference_steps: int, request: ImageRequest) -> int:
        """A schedule long enough that an edit at its strength runs at least one step."""
        if request.is_edit and not 0.0 < request.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {request.strength}")
        while self.steps_run(num_inference_steps, request) < 1:
            num_inference_steps += 1
        return num_inference_steps

    def observe_denoise(self, decision: StepDecision, actual_ms: float) -> None:
        """Learn how far the cost model is off on this machine (CPU shared with the other
        stages, steps of other sizes interleaved, ...): predictions are scaled by the moving
        average of actual / predicted, kept within [0.5, 4]. It rises fast and falls slowly:
        a missed deadline costs more than a step given away."""
        if not decision.predicted_denoise_ms:
            return
        ratio = min(4.0, max(0.5, actual_ms / decision.predicted_denoise_ms))
        weight = 0.5 if ratio > self.calibration else 0.1
        self.calibration = (1 - weight) * self.calibration + weight * ratio

    def decode_estimate_ms(self, request: ImageRequest) -> float:
        rate = self._decode_ms_per_pixel
        return 0.0 if rate is None else rate * request.n * request.width * request.height

    def observe_decode(self, ms: float, pixels: int) -> None:
        """Learn what the stages after the denoiser cost (VAE decode, PNG, hops) per pixel."""
        if pixels <= 0:
            return
        rate = ms / pixels
        previous = self._decode_ms_per_pixel
        self._decode_ms_per_pixel = rate if previous is None else 0.8 * previous + 0.2 * rate
