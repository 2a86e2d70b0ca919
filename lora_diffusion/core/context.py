"""Per-call context: diffusion timestep, training step and per-adapter gates.

One :class:`ContextHolder` per adapted model; every adapted layer keeps a reference to it, so
``set_context(model, timestep=t)`` reaches all of them with one assignment.

Gradient checkpointing re-runs forwards during backward, possibly after the caller has already
changed or reset the context (a ``with`` block that exited). So while autograd runs a backward
pass, layers read the context that the last ordinary forward saw, not the current one: the
recomputed forward then sees what the original forward saw. Under ``torch.compile`` the context
is read at trace time and guarded like any other Python state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CallContext:
    timestep: torch.Tensor | None = None  # () or (B,), on the scale 0..num_train_timesteps
    num_train_timesteps: int = 1000
    step: int | None = None  # training step, for variants with a schedule
    gates: dict[str, float | torch.Tensor] = field(default_factory=dict)  # name -> scalar or (B,)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class ContextHolder:
    """Mutable holder of the current :class:`CallContext` (shared by all layers of a model)."""

    def __init__(self) -> None:
        self.state = CallContext()
        self._last_forward = self.state

    def current(self) -> CallContext:
        if torch.compiler.is_compiling():
            return self.state
        if _in_backward():
            return self._last_forward
        self._last_forward = self.state
        return self.state

    def update(self, **changes: object) -> CallContext:
        """Replace some fields; returns the previous context (to restore it later)."""
        previous = self.state
        if "timestep" in changes and changes["timestep"] is not None:
            changes["timestep"] = torch.as_tensor(changes["timestep"])
        self.state = dataclasses.replace(self.state, **changes)
        return previous

    def restore(self, previous: CallContext) -> None:
        self.state = previous
