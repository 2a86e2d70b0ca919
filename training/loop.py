"""The optimisation loop, independent of the model family (diffusion UNet, causal LM).

``fit`` runs ``max_steps`` optimizer steps of ``grad_accum`` micro-batches each under an
``accelerate.Accelerator`` (mixed precision, data parallel), with a progress bar (loss, it/s, ETA),
per-step hooks (logging, validation, checkpoints) and a stop on a non-finite loss: the failing step
is not applied, so the parameters and the last checkpoint stay good.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the step was not applied."""


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


def make_accelerator(mixed_precision: str = "no", cpu: bool = False) -> Any:
    """An ``accelerate.Accelerator``; in a single process, earlier in-process settings are dropped first,
    so one Python session (tests, the app) can train several times with different precisions."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _all_finite(accelerator: Any, loss: torch.Tensor) -> bool:
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.gather(bad)
    return not bool(bad.sum() > 0)


def _mean_across(accelerator: Any, value: float, device: torch.device) -> float:
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor([value], device=device), reduction="mean").item())


def train_step(accelerator: Any, model: torch.nn.Module, optimizer: Any, batches: BatchSource,
               loss_fn: Callable[[Any], torch.Tensor], cfg: LoopConfig, step: int) -> float:
    """Accumulate ``grad_accum`` micro-batches, then one optimizer step; returns the mean loss."""
    total = 0.0
    for micro in range(cfg.grad_accum):
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if last or accelerator.num_processes == 1 else accelerator.no_sync(model)
        with sync:
            loss = loss_fn(batches.next_batch())
            if not _all_finite(accelerator, loss):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"step {step}: the loss is {loss.item()}")
            accelerator.backward(loss / cfg.grad_accum)
        total += float(loss.detach().float().item())
    if cfg.max_grad_norm:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / cfg.grad_accum


def fit(accelerator: Any, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any, batches: BatchSource,
        loss_fn: Callable[[Any], torch.Tensor], cfg: LoopConfig, start_step: int = 0,
        hooks: Sequence[StepHook] = ()) -> LoopResult:
    """Run steps ``start_step + 1 .. cfg.max_steps``; ``hooks(step, logs)`` run after each step."""
    result = LoopResult(first_step=start_step + 1, last_step=start_step)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc=cfg.desc, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    model.train()
    try:
        for step in range(start_step + 1, cfg.max_steps + 1):
            loss = train_step(accelerator, model, optimizer, batches, loss_fn, cfg, step)
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
    finally:
        bar.close()
    return result


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
