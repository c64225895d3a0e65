"""Step-level continuous batching for the UNet (Orca / vLLM iteration-level scheduling).

One loop thread owns the UNet. Between two forwards it admits waiting jobs (FIFO, up to
`max_batch_size` images, one latent size per batch), runs a single forward for every
image in the batch (conditional and unconditional halves together, each image at its own
timestep), advances each job's own scheduler, and retires the jobs that are done. A job
therefore waits for at most one step of the others, never for their whole loops; a
cancelled job leaves at the next step boundary and its slots go to the next in line.

Background jobs (the quality guard's shadow renders) run only while no foreground job runs
or waits: they pause at the next step boundary when one arrives, keeping their state, so a
user's request waits at most one background step. A batch holds one UNet variant too
(`UNetVariant`: the served one, the quality guard's baseline, or the image-prompt adapter
at one scale).

A step is planned (`_plan_step`: which jobs, their inputs), run (`_run_unet`: one forward),
then applied (`_apply_step_output`: each job's guidance, scheduler step and inpaint blend)
and the finished jobs retired (`_retire`), as vLLM separates `schedule()` from
`update_from_output()`.

Feature caching across steps (DeepCache, per job, `cache_interval` 1 = off): on a job's
full step the UNet runs whole and the job keeps its deep features; on the next
`cache_interval - 1` steps only the UNet's outer levels run, on those features
(`deep_cache.py`). Jobs at different phases share a loop iteration: the rows on a full step
go through one forward, the rows on a cached step through one shallow forward per branch.

Convergence early stop (per job, off by default): a job ends when its predicted clean
latent x0 changes by less than a threshold between two steps, and returns that x0.
Live previews: after the steps a job names, its predicted x0 goes to the job's `on_preview`
(the streaming API decodes it into a partial image).

`admit_between_steps=False` turns the same loop into request-level batching (what
`@serve.batch` gives: a batch is formed while the loop is idle and runs until its slowest
job ends) so that benchmarks compare the two policies on the same code.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from deployments.denoiser.clean_latent import predicted_clean_latent
from deployments.denoiser.edit_latents import InpaintState
from deployments.denoiser.variant import UNetVariant, VariantKind

logger = logging.getLogger(__name__)

# One UNet forward: (sample, timesteps, context[, image_embeds]) -> noise prediction.
UNetForward = Callable[..., torch.Tensor]


class FeatureCache(Protocol):
    """A UNet run whole keeping its deep features, or shallow from them (backends.TorchFeatureCache,
    backends.OnnxFeatureCache)."""

    def supports(self, branch_id: int) -> bool:
        """Can it cache this branch? (else the job runs every step whole)"""
        ...

    def full(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        branch_ids: Iterable[int],
        image_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]: ...

    def shallow(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        deep_features: torch.Tensor,
        branch_id: int,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@functools.cache
def _step_takes_generator(scheduler_cls: Any) -> bool:
    """Does this scheduler's step draw noise (DDPM, Euler ancestral, DDIM with eta > 0)? As
    diffusers' pipelines ask it (prepare_extra_step_kwargs)."""
    return "generator" in inspect.signature(scheduler_cls.step).parameters


class JobCancelled(Exception):
    """The caller went away; the job stopped at a step boundary."""


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a job's future unless its caller cancelled it meanwhile (asyncio.wrap_future
    cancels it when the awaiting request is cancelled): that must not kill the loop."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


@dataclass
class ActiveJob:
    """A job's own denoising state: it is all a step needs, whatever else is in the batch."""

    scheduler: Any  # a diffusers scheduler instance, the job's own
    latents: torch.Tensor  # [images, C, h, w]
    context: torch.Tensor  # [2 * images or images, 77, hidden]: unconditional half first
    guidance_scale: float
    timesteps: torch.Tensor
    step: int = 0
    early_stop: float | None = None  # relative change of predicted x0 under which the job ends
    early_stop_min_steps: int = 0
    previous_x0: torch.Tensor | None = None
    inpaint: InpaintState | None = None  # edits with a mask: keep the image outside it after each step
    image_embeds: torch.Tensor | None = None  # [rows, 1, dim]: the image-prompt adapter's input
    extra_channels: torch.Tensor | None = None  # [images, 5, h, w]: a 9-channel UNet's mask + masked image
    generators: list[torch.Generator] | None = None  # one per image: a stochastic scheduler's step noise
    preview_after: frozenset[int] = frozenset()  # steps done after which the job shows its predicted x0
    preview: torch.Tensor | None = None  # that x0, set by the step that made it, taken by the step loop
    cache_interval: int = 1  # a full UNet step every this many steps; the others reuse its deep features
    cache_branch_id: int = 0  # which deep features (deep_cache.py): 0 = only the outermost level reruns
    deep_features: torch.Tensor | None = None  # [rows, C, h, w] from the job's last full step

    @property
    def caches_features(self) -> bool:
        return self.cache_interval > 1

    @property
    def cached_step(self) -> bool:
        """Does this step reuse the deep features of the job's last full step?"""
        return self.deep_features is not None and self.step % self.cache_interval != 0

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0  # diffusers skips the unconditional half at <= 1

    @property
    def images(self) -> int:
        return int(self.latents.shape[0])

    @property
    def rows(self) -> int:
        return self.images * (2 if self.guided else 1)

    @property
    def steps_left(self) -> int:
        return len(self.timesteps) - self.step

    def unet_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's UNet sample [rows, C(+5), h, w] and timesteps [rows]."""
        t = self.timesteps[self.step]
        sample = torch.cat([self.latents] * 2) if self.guided else self.latents
        sample = self.scheduler.scale_model_input(sample, t)
        if self.extra_channels is not None:
            extra_channels = torch.cat([self.extra_channels] * 2) if self.guided else self.extra_channels
            sample = torch.cat([sample, extra_channels], dim=1)
        return sample, t.reshape(1).expand(self.rows)

    def guided_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance over this job's rows of the forward's output."""
        if not self.guided:
            return noise
        uncond, cond = noise.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def advance(self, noise: torch.Tensor) -> bool:
        """Apply one step's (guided) model output; True when the job converged and ended early."""
        wants_preview = self.step + 1 in self.preview_after and self.step + 1 < len(self.timesteps)
        x0 = None
        if self.early_stop is not None or wants_preview:
            x0 = predicted_clean_latent(self.scheduler, self.latents, noise, self.timesteps[self.step])
        if wants_preview:
            self.preview = x0
        if self.early_stop is not None and x0 is not None and self._converged(x0, self.early_stop):
            self.latents, self.step = x0, len(self.timesteps)
            return True
        takes_generator = self.generators and _step_takes_generator(self.scheduler.__class__)
        extra_step = {"generator": self.generators} if takes_generator else {}
        self.latents = self.scheduler.step(
            noise, self.timesteps[self.step], self.latents, return_dict=False, **extra_step
        )[0]
        self.step += 1
        if self.inpaint is not None:
            following = self.timesteps[self.step] if self.step < len(self.timesteps) else None
            self.latents = self.inpaint.blend(self.scheduler, self.latents, following)
        return False

    def _converged(self, x0: torch.Tensor, threshold: float) -> bool:
        """Did the predicted clean latent move less than `threshold` (relative L2) since the
        previous step?"""
        previous, self.previous_x0 = self.previous_x0, x0
        if previous is None or self.step + 1 < self.early_stop_min_steps:
            return False
        return float((x0 - previous).norm() / x0.norm().clamp_min(1e-12)) < threshold

    def take_preview(self) -> torch.Tensor | None:
        preview, self.preview = self.preview, None
        return preview


@dataclass
class _Ticket:
    prepare: Callable[[], ActiveJob]  # runs on the loop thread at admission
    images: int
    latent_shape: tuple[int, int]
    steps: int
    future: Future
    on_step: Callable[[int, int], None] | None
    cancelled: threading.Event | None
    variant: UNetVariant = field(default_factory=UNetVariant.production)  # which UNet runs it
    on_preview: Callable[[int, int, torch.Tensor], None] | None = None  # (steps done, total, x0)
    background: bool = False  # runs only when no foreground job runs or waits
    state: ActiveJob | None = None  # set at admission

    @property
    def group(self) -> tuple[tuple[int, int], UNetVariant]:
        """Jobs of one batch share a latent size and a UNet."""
        return self.latent_shape, self.variant

    @property
    def steps_left(self) -> int:
        return self.state.steps_left if self.state is not None else self.steps

    @property
    def job(self) -> ActiveJob:
        """The admitted job's state (the step loop steps only admitted jobs)."""
        if self.state is None:
            raise RuntimeError("the job has not been admitted yet")
        return self.state


@dataclass
class LoadSnapshot:
    """What a step controller or an autoscaler needs to know about this replica now."""

    waiting_jobs: int
    active_jobs: int
    active_images: int
    queued_steps: int  # steps still to run, waiting and active jobs, per image
    queued_work: float  # the same in latent pixels x steps (a 512x512 step = 4096)
    steps_run: int  # UNet forwards
    cancelled_jobs: int
    waiting_images: int = 0
    max_batch_size: int = 1
    # latent size "HxW" -> images in the batch -> median ms of a step: the step
    # controller's cost model (serve_app/flow/steps.py)
    step_ms_by_shape: dict[str, dict[int, float]] = field(default_factory=dict)
    background_jobs: int = 0  # shadow renders, not counted above: they never delay foreground work
    early_stops: int = 0
    recent_occupancy: float = 0.0  # mean images per step lately (0 when idle)
    image_steps: int = 0  # images stepped, summed over the forwards (over steps_run: the mean occupancy)
    cached_image_steps: int = 0  # of image_steps, those that ran shallow on cached deep features
    backend: str = ""  # the UNet backend now in use (filled in by the engine)
    backend_fallbacks: int = 0


@dataclass
class StepPlan:
    """One step of the running batch: its jobs, the UNet they share and each job's inputs."""

    tickets: list[_Ticket]
    jobs: list[ActiveJob]  # the tickets' states, in the same order
    variant: UNetVariant
    samples: list[torch.Tensor]
    timesteps: list[torch.Tensor]
    contexts: list[torch.Tensor]
    image_embeds: list[torch.Tensor]  # one variant per batch: every job has them, or none
    started: float  # a step's cost counts the inputs, the forward and every job's scheduler step
    cached: list[bool]  # per job: does this step run shallow on its cached features (fixed at planning)
    feature_cache: FeatureCache | None  # the variant's feature caching this step; None: every row whole

    @property
    def images(self) -> int:
        return sum(job.images for job in self.jobs)

    @property
    def cached_images(self) -> int:
        return sum(job.images for job, cached in zip(self.jobs, self.cached) if cached)

    def forwards(self) -> Iterator[tuple[int | None, list[int]]]:
        """The forwards this step takes: (None, the jobs on a full step), then (branch id, the
        jobs on a cached step of that branch) per branch; job indices into `jobs`."""
        full = [i for i, cached in enumerate(self.cached) if not cached]
        if full:
            yield None, full
        cached_jobs = [i for i, cached in enumerate(self.cached) if cached]
        for branch_id in sorted({self.jobs[i].cache_branch_id for i in cached_jobs}):
            yield branch_id, [i for i in cached_jobs if self.jobs[i].cache_branch_id == branch_id]

    def inputs(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The batched UNet inputs of these jobs: sample, timesteps, context[, image_embeds]."""
        extra = [torch.cat([self.image_embeds[i] for i in indices])] if self.image_embeds else []
        return (
            torch.cat([self.samples[i] for i in indices]),
            torch.cat([self.timesteps[i] for i in indices]),
            torch.cat([self.contexts[i] for i in indices]),
            extra,
        )

    def by_job(self, noise: list[torch.Tensor]) -> Iterator[tuple[_Ticket, ActiveJob, torch.Tensor]]:
        """Each job with its rows of the step's output."""
        yield from zip(self.tickets, self.jobs, noise)


class StepTimings:
    """ms of one batched step (inputs, UNet forward, the jobs' scheduler steps) by latent
    size and images in the batch: the median of the last few forwards, robust to the
    seconds-long stalls a shared CPU (or the first forwards' one-time set-up) throws in,
    which a moving average would carry for dozens of steps. Not thread-safe: the
    StepBatcher uses it under its condition lock."""

    SAMPLES = 9
    OCCUPANCY_STEPS = 32

    def __init__(self) -> None:
        self._samples: dict[tuple[str, int], collections.deque[float]] = {}
        self._occupancy: collections.deque[int] = collections.deque(maxlen=self.OCCUPANCY_STEPS)

    def record(self, shape: str, images: int, ms: float) -> None:
        self._samples.setdefault((shape, images), collections.deque(maxlen=self.SAMPLES)).append(ms)
        self._occupancy.append(images)

    def recent_occupancy(self) -> float:
        """Mean images per step over the last OCCUPANCY_STEPS steps: under steady load, how full
        the batch a new job joins will be while it runs (not just at the moment it arrives)."""
        return statistics.fmean(self._occupancy) if self._occupancy else 0.0

    def by_shape(self) -> dict[str, dict[int, float]]:
        table: dict[str, dict[int, float]] = {}
        for (shape, images), samples in list(self._samples.items()):
            table.setdefault(shape, {})[images] = statistics.median(samples)
        return table


class StepBatcher:
    def __init__(
        self,
        unet_for: Callable[[UNetVariant], UNetForward],
        num_threads_setter: Callable[[], None],
        max_batch_size: int = 8,
        admit_between_steps: bool = True,
        feature_cache_for: Callable[[UNetVariant], FeatureCache | None] | None = None,
    ):
        """`unet_for(variant)`: the forward (any backend) that runs the jobs of that variant;
        `feature_cache_for(variant)`: its feature caching, None where the backend has none (then
        every step of every job runs whole)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.unet_for = unet_for
        self.feature_cache_for = feature_cache_for or (lambda variant: None)
        self.max_batch_size = max_batch_size
        self.admit_between_steps = admit_between_steps
        self._set_threads = num_threads_setter
        self._waiting: collections.deque[_Ticket] = collections.deque()
        self._background: collections.deque[_Ticket] = collections.deque()
        self._active: list[_Ticket] = []
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._timings = StepTimings()
        self._steps_run = 0
        self._image_steps = 0
        self._cached_image_steps = 0
        self._cancelled = 0
        self._early_stops = 0

    # -- the callers' side ---------------------------------------------------------------
    def submit(
        self,
        prepare: Callable[[], ActiveJob],
        images: int,
        latent_shape: tuple[int, int],
        steps: int,
        on_step: Callable[[int, int], None] | None = None,
        cancelled: threading.Event | None = None,
        variant: UNetVariant | None = None,
        background: bool = False,
        on_preview: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> Future:
        """Queue a job (on the production UNet unless `variant` says otherwise); the future
        gets its final latents, or the job's own error. `on_preview(done, total, x0)` gets the
        predicted clean latents after the steps the job's `preview_after` names."""
        variant = variant or UNetVariant.production()
        ticket = _Ticket(
            prepare, images, latent_shape, steps, Future(), on_step, cancelled, variant, on_preview, background
        )
        with self._condition:
            (self._background if background else self._waiting).append(ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="denoiser-steps", daemon=True)
                self._thread.start()
            self._condition.notify()
        return ticket.future

    def wake(self) -> None:
        """Make the loop look at cancellations now (a cancelled waiting job leaves at once)."""
        with self._condition:
            self._condition.notify()

    def snapshot(self) -> LoadSnapshot:
        with self._condition:
            active = [t for t in self._active if not t.background]
            tickets = [*self._waiting, *active]
            return LoadSnapshot(
                waiting_jobs=len(self._waiting),
                active_jobs=len(active),
                active_images=sum(t.images for t in active),
                queued_steps=sum(t.steps_left * t.images for t in tickets),
                queued_work=float(
                    sum(t.steps_left * t.images * t.latent_shape[0] * t.latent_shape[1] for t in tickets)
                ),
                steps_run=self._steps_run,
                cancelled_jobs=self._cancelled,
                waiting_images=sum(t.images for t in self._waiting),
                max_batch_size=self.max_batch_size,
                step_ms_by_shape=self._timings.by_shape(),
                background_jobs=len(self._background) + len(self._active) - len(active),
                early_stops=self._early_stops,
                recent_occupancy=self._timings.recent_occupancy() if active or self._waiting else 0.0,
                image_steps=self._image_steps,
                cached_image_steps=self._cached_image_steps,
            )

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        self._set_threads()  # OpenMP keeps its thread count per OS thread: set it in this one
        while True:
            try:
                self._iteration()
            except Exception:  # never let the loop die: every later job would hang
                logger.exception("denoiser step loop iteration failed")

    def _iteration(self) -> None:
        with self._condition:
            self._drop_cancelled()
            while not self._active and not self._waiting and not self._background:
                self._condition.wait()
                self._drop_cancelled()
            admitted = self._admit()
        for ticket in admitted:
            if ticket.state is not None:
                continue  # a paused background job resumes where it stopped
            try:
                ticket.state = ticket.prepare()
            except Exception as error:  # a bad job fails alone
                _settle(ticket.future, error=error)
                with self._condition:
                    self._active.remove(ticket)
        if self._active:
            self._step()

    def _drop_cancelled(self) -> None:
        for queue in (self._waiting, self._background, self._active):
            for ticket in [
                t for t in queue if t.future.cancelled() or (t.cancelled is not None and t.cancelled.is_set())
            ]:
                queue.remove(ticket)
                self._cancelled += 1
                _settle(ticket.future, error=JobCancelled())

    def _admit(self) -> list[_Ticket]:
        """FIFO: only the head of the queue may join, so nothing overtakes a waiting job.
        Background jobs pause while foreground ones wait and run when none do."""
        paused = [t for t in self._active if t.background] if self._waiting else []
        for ticket in reversed(paused):
            self._active.remove(ticket)
            self._background.appendleft(ticket)  # keeps its state: resumes at the same step
        if self._active and not self.admit_between_steps:
            return []
        queue = self._waiting if self._waiting or any(not t.background for t in self._active) else self._background
        admitted = []
        used = sum(t.images for t in self._active)
        group = self._active[0].group if self._active else None
        while queue:
            head = queue[0]
            if group is not None and head.group != group:
                break  # the next batch will be of its size and UNet
            if used and used + head.images > self.max_batch_size:
                break  # a job larger than the batch runs alone rather than never
            queue.popleft()
            self._active.append(head)
            admitted.append(head)
            used += head.images
            group = head.group
        return admitted

    # -- one step: plan, forward, apply, retire --------------------------------------------
    @torch.inference_mode()
    def _step(self) -> None:
        plan = self._plan_step()
        noise = self._run_unet(plan)
        if noise is None:
            return
        finished = self._apply_step_output(plan, noise)
        self._retire(plan, finished)

    def _plan_step(self) -> StepPlan:
        """The running batch's jobs and each one's UNet inputs for its current step."""
        started = time.perf_counter()
        tickets = list(self._active)
        jobs = [ticket.job for ticket in tickets]
        feature_cache = self.feature_cache_for(tickets[0].variant)
        if feature_cache is None:  # e.g. the backend fell back to one without feature caching
            for job in jobs:
                job.deep_features = None
        samples, timesteps = [], []
        for job in jobs:
            sample, t = job.unet_input()
            samples.append(sample)
            timesteps.append(t)
        return StepPlan(
            tickets,
            jobs,
            tickets[0].variant,
            samples,
            timesteps,
            [job.context for job in jobs],
            [job.image_embeds for job in jobs if job.image_embeds is not None],
            started,
            [job.cached_step for job in jobs],
            feature_cache,
        )

    def _run_unet(self, plan: StepPlan) -> list[torch.Tensor] | None:
        """The step's forwards for every image of the plan: each job's rows of noise; None when
        one failed (e.g. out of memory): then the plan's jobs fail with its error and the loop
        goes on."""
        noise: list[torch.Tensor | None] = [None] * len(plan.jobs)
        try:
            for branch_id, indices in plan.forwards():
                sample, timesteps, context, extra = plan.inputs(indices)
                if branch_id is None:
                    output = self._full_forward(plan, indices, sample, timesteps, context, extra)
                else:
                    cache = plan.feature_cache
                    assert cache is not None, "_plan_step drops deep features where the backend has no cache"
                    deep = torch.cat([plan.jobs[i].deep_features for i in indices])  # type: ignore[misc]
                    output = cache.shallow(sample, timesteps, context, deep, branch_id, *extra)
                offset = 0
                for i in indices:
                    noise[i] = output[offset : offset + plan.jobs[i].rows]
                    offset += plan.jobs[i].rows
        except Exception as error:
            logger.exception("UNet forward failed for a batch of %d jobs", len(plan.tickets))
            with self._condition:
                for ticket in plan.tickets:
                    self._active.remove(ticket)
                    _settle(ticket.future, error=error)
            return None
        self._steps_run += 1
        self._image_steps += plan.images
        self._cached_image_steps += plan.cached_images
        return [part for part in noise if part is not None]  # every job is in exactly one forward

    def _full_forward(
        self,
        plan: StepPlan,
        indices: list[int],
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        extra: list[torch.Tensor],
    ) -> torch.Tensor:
        """The whole UNet for these jobs; the ones that cache features keep theirs."""
        cache = plan.feature_cache
        caching = [
            i
            for i in indices
            if plan.jobs[i].caches_features and cache is not None and cache.supports(plan.jobs[i].cache_branch_id)
        ]
        if cache is None or not caching:  # a branch the backend cannot cache runs every step whole
            return self.unet_for(plan.variant)(sample, timesteps, context, *extra)
        branch_ids = {plan.jobs[i].cache_branch_id for i in caching}
        output, features = cache.full(sample, timesteps, context, branch_ids, *extra)
        offset = 0
        for i in indices:
            job = plan.jobs[i]
            if i in caching:  # a copy: a view would keep the whole batch's features alive
                job.deep_features = features[job.cache_branch_id][offset : offset + job.rows].clone()
            offset += job.rows
        return output

    def _apply_step_output(self, plan: StepPlan, noise: list[torch.Tensor]) -> list[_Ticket]:
        """Each job's guidance, scheduler step (or early stop) and inpaint blend; its progress
        callback. Returns the tickets whose jobs are done."""
        finished = []
        for ticket, job, part in plan.by_job(noise):
            if job.advance(job.guided_noise(part)):
                self._early_stops += 1
            preview = job.take_preview()
            try:  # a callback must not stop the batch
                if ticket.on_step is not None:
                    ticket.on_step(job.step, len(job.timesteps))
                if preview is not None and ticket.on_preview is not None:
                    ticket.on_preview(job.step, len(job.timesteps), preview)
            except Exception:
                logger.exception("a job's step callback failed")
            if job.steps_left == 0:
                finished.append(ticket)
        return finished

    def _retire(self, plan: StepPlan, finished: list[_Ticket]) -> None:
        """Record the step's cost; the finished jobs leave the batch with their latents."""
        with self._condition:  # snapshot() reads the timings from other threads
            # the cost model is about the served UNet's whole steps
            if plan.variant.kind is VariantKind.PRODUCTION and plan.cached_images == 0:
                shape = "{}x{}".format(*plan.tickets[0].latent_shape)
                self._timings.record(shape, plan.images, (time.perf_counter() - plan.started) * 1000.0)
            for ticket in finished:
                self._active.remove(ticket)
        for ticket in finished:
            _settle(ticket.future, ticket.job.latents)
