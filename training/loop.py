"""The optimisation loop, independent of the model family (diffusion UNet, causal LM).

``fit`` runs ``max_steps`` optimizer steps of ``grad_accum`` micro-batches each under an
``accelerate.Accelerator`` (mixed precision, data parallel), with a progress bar (loss, it/s, ETA),
per-step hooks (logging, validation, checkpoints) and a stop on a non-finite loss: the failing step
is not applied, so the parameters and the last checkpoint stay good.

Graceful stop: given ``on_stop`` (a function writing a checkpoint at a step), ``fit`` catches the first SIGTERM or
SIGINT (the app's Stop, Ctrl-C), finishes the optimizer step under way, writes that checkpoint and raises
``TrainingStopped``; trainers turn it into exit code ``EXIT_STOPPED``. A second signal aborts at once (the
handlers in place before ``fit`` take it back). Under several processes the flag is all-reduced after every step,
so every rank stops at the same step and writes its part of the same checkpoint.

The adapters' own training hooks (``lora_diffusion.TrainingHooks``: the optimizer-step counter in the per-call
context, regularization losses, post-step updates) run here, so no trainer or user code calls them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


#: exit code of a trainer stopped by SIGTERM/SIGINT after saving a checkpoint (sysexits' EX_TEMPFAIL: "try again
#: later", i.e. resume); distinct from 0 (finished), 1 (error) and death by a signal (-15/-9, or 130 in a shell)
EXIT_STOPPED = 75


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the step was not applied."""


class TrainingStopped(Exception):
    """A stop signal ended the run after ``step`` of ``max_steps``; ``checkpoint`` holds that step."""

    def __init__(self, step: int, max_steps: int, checkpoint: Path | None) -> None:
        self.step, self.max_steps, self.checkpoint = step, max_steps, checkpoint
        super().__init__(f"stopped at step {step}/{max_steps}; checkpoint saved to {checkpoint}; "
                         "resume with --resume_from_checkpoint latest")


class StopSignals:
    """While entered (main thread only): the first SIGTERM/SIGINT sets ``requested``; a second one restores the
    previous handlers and hands them the signal (SIGINT: KeyboardInterrupt; SIGTERM by default: the process dies).
    The previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, then: str = "finishing this step, then saving a checkpoint") -> None:
        self.requested, self.then = False, then
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            log.debug("not the main thread: no stop-signal handlers (SIGTERM/SIGINT keep their effect)")
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            self.requested = True
            log.warning("%s: %s (send it again to abort without saving)", name, self.then)
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        log.warning("%s again: aborting without saving", name)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)  # the default action: die by that signal


class BatchSource(Protocol):
    def next_batch(self) -> Any: ...


StepHook = Callable[[int, dict[str, float]], None]


@dataclass
class LoopConfig:
    max_steps: int
    grad_accum: int = 1
    max_grad_norm: float | None = None
    desc: str = "train"
    progress: bool = True


@dataclass
class LoopResult:
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step run here
    first_step: int = 1
    last_step: int = 0


def make_accelerator(mixed_precision: str = "no", cpu: bool = False, **kwargs: Any) -> Any:
    """An ``accelerate.Accelerator`` (``kwargs`` go to it); in a single process, earlier in-process settings are
    dropped first, so one Python session (tests, the app) can train several times with different precisions."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)


def _all_finite(accelerator: Any, loss: torch.Tensor) -> bool:
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.gather(bad)
    return not bool(bad.sum() > 0)


def _any_across(accelerator: Any, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _mean_across(accelerator: Any, value: float, device: torch.device) -> float:
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor([value], device=device), reduction="mean").item())


def train_step(accelerator: Any, model: torch.nn.Module, optimizer: Any, batches: BatchSource,
               loss_fn: Callable[[Any], torch.Tensor], cfg: LoopConfig, step: int,
               adapters: Any = None) -> float:
    """Accumulate ``grad_accum`` micro-batches, then one optimizer step; returns the mean loss (with any
    adapter regularization). ``adapters``: a ``lora_diffusion.TrainingHooks`` (None: built from ``model``)."""
    import lora_diffusion as ld

    adapters = ld.TrainingHooks(model) if adapters is None else adapters
    adapters.begin_step(step)
    total = 0.0
    for micro in range(cfg.grad_accum):
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last or accelerator.num_processes == 1 else accelerator.no_sync(model)
        with sync:
            loss = loss_fn(batches.next_batch())
            reg = adapters.regularization()
            if reg is not None:
                loss = loss + reg.to(loss.dtype)
            if not _all_finite(accelerator, loss):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"step {step}: the loss is {loss.item()}")
            accelerator.backward(loss / cfg.grad_accum)
        total += float(loss.detach().float().item())
    if cfg.max_grad_norm:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    adapters.after_step(step)  # after the step, before zero_grad (AdaLoRA's importance reads the gradients)
    optimizer.zero_grad(set_to_none=True)
    return total / cfg.grad_accum


def fit(accelerator: Any, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any, batches: BatchSource,
        loss_fn: Callable[[Any], torch.Tensor], cfg: LoopConfig, start_step: int = 0,
        hooks: Sequence[StepHook] = (), on_stop: Callable[[int], Path | None] | None = None,
        adapters: Any = None) -> LoopResult:
    """Run steps ``start_step + 1 .. cfg.max_steps``; ``hooks(step, logs)`` run after each step. With ``on_stop``
    (step -> the checkpoint it wrote), SIGTERM/SIGINT stop the run after the current step: ``on_stop(step)``, then
    ``TrainingStopped``. ``adapters``: the ``lora_diffusion.TrainingHooks`` of every adapted model trained here
    (None: ``model``'s)."""
    import lora_diffusion as ld

    adapters = ld.TrainingHooks(model) if adapters is None else adapters
    result = LoopResult(first_step=start_step + 1, last_step=start_step)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=cfg.desc, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    stop = StopSignals() if on_stop is not None else contextlib.nullcontext()
    model.train()
    try:
        with stop:
            for step in range(start_step + 1, cfg.max_steps + 1):
                _run_step(accelerator, model, optimizer, lr_scheduler, batches, loss_fn, cfg, step, bar, hooks, result,
                          adapters)
                if on_stop is not None and step < cfg.max_steps and _any_across(accelerator, stop.requested):
                    bar.close()
                    stopped = TrainingStopped(step, cfg.max_steps, on_stop(step))
                    if accelerator.is_main_process:
                        log.info("%s", stopped)
                    raise stopped
            if getattr(stop, "requested", False):
                log.info("stop requested during the last step: training is complete, writing the final outputs")
    finally:
        bar.close()
    return result


def _run_step(accelerator: Any, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any, batches: BatchSource,
              loss_fn: Callable[[Any], torch.Tensor], cfg: LoopConfig, step: int, bar: Any,
              hooks: Sequence[StepHook], result: LoopResult, adapters: Any = None) -> None:
    loss = train_step(accelerator, model, optimizer, batches, loss_fn, cfg, step, adapters)
    lr_scheduler.step()
    loss = _mean_across(accelerator, loss, accelerator.device)
    result.losses.append(loss)
    result.last_step = step
    lr = optimizer.param_groups[0]["lr"]
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    logs = {"loss": loss, "lr": lr, "it_per_s": _rate(bar)}
    for hook in hooks:
        hook(step, logs)


def _rate(bar: Any) -> float:
    rate = bar.format_dict.get("rate")
    return float(rate) if rate and math.isfinite(rate) else 0.0


class JsonlProgress:
    """A step hook appending ``{"step", "total", "loss", "lr", "it_per_s", "time"}`` lines to a file, flushed at
    once, for apps that watch a trainer running in another process."""

    def __init__(self, path: Any, total: int) -> None:
        import json

        self.path, self.total, self._dumps = path, total, json.dumps

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        import time

        with open(self.path, "a") as f:
            f.write(self._dumps({"step": step, "total": self.total, **logs, "time": time.time()}) + "\n")


class Reporter:
    """TensorBoard scalars and images (main process only); a no-op without tensorboard."""

    def __init__(self, folder: Any, enabled: bool = True) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed (pip install tensorboard): no TensorBoard logs")
            return
        self.writer = SummaryWriter(str(folder))

    def scalars(self, step: int, logs: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in logs.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def images(self, step: int, pairs: Sequence[tuple[str, Any]]) -> None:
        if self.writer is None:
            return
        import numpy as np

        for i, (caption, im) in enumerate(pairs):
            self.writer.add_image(f"samples/{i}: {caption}", np.asarray(im), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
