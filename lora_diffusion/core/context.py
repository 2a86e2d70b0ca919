"""Per-call context: diffusion timestep, training step and per-adapter gates.

One :class:`ContextHolder` per adapted model; every adapted layer keeps a reference to it, so
``set_context(model, timestep=t)`` reaches all of them with one assignment.

Gradient checkpointing re-runs forwards during backward, possibly after the caller has already
changed or reset the context (a ``with`` block that exited). Two mechanisms keep recomputation
right:

- ``checkpoint_context_fn(holders)`` gives ``torch.utils.checkpoint`` a ``context_fn`` that snapshots
  the context when each checkpointed segment runs and restores that snapshot while the segment is
  recomputed: exact even when several forwards (different timesteps) precede one backward.
  ``lora_diffusion.enable_gradient_checkpointing(model)`` installs it on diffusers/transformers models.
- Without it (plain ``enable_gradient_checkpointing()``), layers read, during a backward pass, the
  context the last ordinary forward saw: right for the usual one-forward-one-backward step.

Under ``torch.compile`` the context is read at trace time and guarded like any other Python state.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CallContext:
    timestep: torch.Tensor | None = None  # () or (B,), on the scale 0..num_train_timesteps
    num_train_timesteps: int = 1000
    step: int | None = None  # training step, for variants with a schedule
    gates: dict[str, float | torch.Tensor] = field(default_factory=dict)  # name -> scalar or (B,)
    # per-context memo for values every layer would recompute (T-LoRA's r(t), masks); reset on every update
    cache: dict = field(default_factory=dict, compare=False, repr=False)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class ContextHolder:
    """Mutable holder of the current :class:`CallContext` (shared by all layers of a model)."""

    def __init__(self) -> None:
        self.state = CallContext()
        self._last_forward = self.state
        self._recompute: CallContext | None = None  # set while a checkpointed segment is recomputed

    def current(self) -> CallContext:
        if torch.compiler.is_compiling():
            return self.state
        if self._recompute is not None:
            return self._recompute
        if _in_backward():
            return self._last_forward
        self._last_forward = self.state
        return self.state

    def update(self, **changes: object) -> CallContext:
        """Replace some fields; returns the previous context (to restore it later)."""
        previous = self.state
        if "timestep" in changes and changes["timestep"] is not None:
            changes["timestep"] = torch.as_tensor(changes["timestep"])
        self.state = dataclasses.replace(self.state, cache={}, **changes)
        return previous

    def restore(self, previous: CallContext) -> None:
        self.state = previous


def checkpoint_context_fn(holders: list[ContextHolder]):
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

    The first context manager runs around the original forward and snapshots every holder's
    state; the second runs around the recomputation and makes the holders return that snapshot.
    """

    def context_fn():
        snapshot: dict[int, CallContext] = {}

        @contextlib.contextmanager
        def forward():
            for h in holders:
                snapshot[id(h)] = h.state
            yield

        @contextlib.contextmanager
        def recompute():
            saved = [h._recompute for h in holders]
            for h in holders:
                h._recompute = snapshot.get(id(h), h.state)
            try:
                yield
            finally:
                for h, s in zip(holders, saved):
                    h._recompute = s

        return forward(), recompute()

    return context_fn
