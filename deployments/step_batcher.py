"""Step-level continuous batching for the UNet (Orca / vLLM iteration-level scheduling).

One loop thread owns the UNet. Between two forwards it admits waiting jobs (FIFO, up to
`max_batch_size` images, one latent size per batch), runs a single forward for every
image in the batch (conditional and unconditional halves together, each image at its own
timestep), advances each job's own scheduler, and retires the jobs that are done. A job
therefore waits for at most one step of the others, never for their whole loops; a
cancelled job leaves at the next step boundary and its slots go to the next in line.

`admit_between_steps=False` turns the same loop into request-level batching (what
`@serve.batch` gives: a batch is formed while the loop is idle and runs until its slowest
job ends) so that benchmarks compare the two policies on the same code.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


class JobCancelled(Exception):
    """The caller went away; the job stopped at a step boundary."""


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
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

    scheduler: Any
    latents: torch.Tensor  # [images, C, h, w]
    context: torch.Tensor  # [2 * images or images, 77, hidden]: unconditional half first
    guidance_scale: float
    timesteps: torch.Tensor
    step: int = 0

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0  # diffusers skips the unconditional half at <= 1

    @property
    def images(self) -> int:
        return self.latents.shape[0]

    @property
    def rows(self) -> int:
        return self.images * (2 if self.guided else 1)

    @property
    def steps_left(self) -> int:
        return len(self.timesteps) - self.step


@dataclass
class _Ticket:
    prepare: Callable[[], ActiveJob]  # runs on the loop thread at admission
    images: int
    latent_shape: tuple[int, int]
    steps: int
    future: Future
    on_step: Callable[[int, int], None] | None
    cancelled: threading.Event | None
    submitted: float = field(default_factory=time.perf_counter)
    state: ActiveJob | None = None


@dataclass
class LoadSnapshot:
    """What a step controller or an autoscaler needs to know about this replica now."""

    waiting_jobs: int
    active_jobs: int
    active_images: int
    queued_steps: int  # steps still to run, waiting and active jobs, per image
    queued_work: float  # the same in latent pixels x steps (a 512x512 step = 4096)
    ms_per_step: dict[int, float]  # images in the batch -> moving average of a forward's ms
    steps_run: int
    cancelled_jobs: int
    backend: str = ""  # the UNet backend now in use (filled in by the engine)
    backend_fallbacks: int = 0


class StepBatcher:
    def __init__(self, run_unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 num_threads_setter: Callable[[], None], max_batch_size: int = 8, admit_between_steps: bool = True):
        """`run_unet(sample, timesteps, context) -> noise`: one UNet forward (any backend)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.run_unet = run_unet
        self.max_batch_size = max_batch_size
        self.admit_between_steps = admit_between_steps
        self._set_threads = num_threads_setter
        self._waiting: collections.deque[_Ticket] = collections.deque()
        self._active: list[_Ticket] = []
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._ms_per_step: dict[int, float] = {}
        self._steps_run = 0
        self._cancelled = 0

    # -- the callers' side ---------------------------------------------------------------
    def submit(self, prepare: Callable[[], ActiveJob], images: int, latent_shape: tuple[int, int], steps: int,
               on_step: Callable[[int, int], None] | None = None,
               cancelled: threading.Event | None = None) -> Future:
        """Queue a job; the future gets its final latents, or the job's own error."""
        ticket = _Ticket(prepare, images, latent_shape, steps, Future(), on_step, cancelled)
        with self._condition:
            self._waiting.append(ticket)
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
            tickets = [*self._waiting, *self._active]
            left = [t.state.steps_left if t.state else t.steps for t in tickets]
            return LoadSnapshot(
                waiting_jobs=len(self._waiting),
                active_jobs=len(self._active),
                active_images=sum(t.images for t in self._active),
                queued_steps=sum(n * t.images for n, t in zip(left, tickets)),
                queued_work=float(sum(n * t.images * t.latent_shape[0] * t.latent_shape[1]
                                      for n, t in zip(left, tickets))),
                ms_per_step=dict(self._ms_per_step),
                steps_run=self._steps_run,
                cancelled_jobs=self._cancelled,
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
            while not self._active and not self._waiting:
                self._condition.wait()
                self._drop_cancelled()
            admitted = self._admit()
        for ticket in admitted:
            try:
                ticket.state = ticket.prepare()
            except Exception as error:  # a bad job fails alone
                _settle(ticket.future, error=error)
                with self._condition:
                    self._active.remove(ticket)
        if self._active:
            self._step()

    def _drop_cancelled(self) -> None:
        for queue in (self._waiting, self._active):
            for ticket in [t for t in queue if t.future.cancelled() or (t.cancelled is not None and t.cancelled.is_set())]:
                queue.remove(ticket)
                self._cancelled += 1
                _settle(ticket.future, error=JobCancelled())

    def _admit(self) -> list[_Ticket]:
        """FIFO: only the head of the queue may join, so nothing overtakes a waiting job."""
        if self._active and not self.admit_between_steps:
            return []
        admitted = []
        used = sum(t.images for t in self._active)
        shape = self._active[0].latent_shape if self._active else None
        while self._waiting:
            head = self._waiting[0]
            if shape is not None and head.latent_shape != shape:
                break  # the next batch will be of its size
            if used and used + head.images > self.max_batch_size:
                break  # a job larger than the batch runs alone rather than never
            self._waiting.popleft()
            self._active.append(head)
            admitted.append(head)
            used += head.images
            shape = head.latent_shape
        return admitted

    @torch.inference_mode()
    def _step(self) -> None:
        active = list(self._active)
        states = [t.state for t in active]
        inputs, timesteps, contexts = [], [], []
        for state in states:
            t = state.timesteps[state.step]
            model_input = torch.cat([state.latents] * 2) if state.guided else state.latents
            inputs.append(state.scheduler.scale_model_input(model_input, t))
            timesteps.append(t.reshape(1).expand(state.rows))
            contexts.append(state.context)
        start = time.perf_counter()
        try:
            noise = self.run_unet(torch.cat(inputs), torch.cat(timesteps), torch.cat(contexts))
        except Exception as error:  # e.g. out of memory: the jobs of this batch fail, the loop goes on
            logger.exception("UNet forward failed for a batch of %d jobs", len(active))
            with self._condition:
                for ticket in active:
                    self._active.remove(ticket)
                    _settle(ticket.future, error=error)
            return
        images = sum(state.images for state in states)
        elapsed = (time.perf_counter() - start) * 1000.0
        previous = self._ms_per_step.get(images)
        self._ms_per_step[images] = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
        self._steps_run += 1

        offset = 0
        finished = []
        for ticket, state in zip(active, states):
            part = noise[offset:offset + state.rows]
            offset += state.rows
            if state.guided:
                uncond, cond = part.chunk(2)
                part = uncond + state.guidance_scale * (cond - uncond)
            state.latents = state.scheduler.step(part, state.timesteps[state.step], state.latents,
                                                 return_dict=False)[0]
            state.step += 1
            if ticket.on_step is not None:
                try:
                    ticket.on_step(state.step, len(state.timesteps))
                except Exception:  # a progress callback must not stop the batch
                    logger.exception("on_step callback failed")
            if state.steps_left == 0:
                finished.append(ticket)
        with self._condition:
            for ticket in finished:
                self._active.remove(ticket)
        for ticket in finished:
            _settle(ticket.future, ticket.state.latents)
