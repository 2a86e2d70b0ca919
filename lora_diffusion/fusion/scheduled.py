"""Timestep-scheduled weights (training-free): subject LoRAs early in sampling, style LoRAs late.

    p = 1 - t/T                                   (sampling progress from the scheduler's t: 0 = pure noise)
    r(p) = clamp((p - switch) / width + 1/2, 0, 1)
    y = y0 + Σ_subject (1 - (1 - floor)·r(p)) · y_i + Σ_style (floor + (1 - floor)·r(p)) · y_j + Σ_other y_k

Early steps lay out the shape (subject), late steps paint the texture (style); ``width`` 0 switches hard
(like LoRA Switch), ``floor`` keeps a minimum of each. The weights are tensors on the device (no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.layer import AdaptedLayer
from .base import Combiner, FusionMethod, per_sample, progress, ramp


class ScheduledCombiner(Combiner):
    def __init__(self, names: list[str], roles: dict[str, str], switch: float, width: float, floor: float) -> None:
        super().__init__(names)
        self.roles, self.switch, self.width, self.floor = roles, switch, width, floor

    def combine(self, layer: AdaptedLayer, y0: torch.Tensor, ys: dict[str, torch.Tensor],
                ctx: CallContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = progress(ctx)
        if p is None:
            raise AdapterError("scheduled fusion needs the timestep of each step: generate through "
                               "lora_diffusion.generate (install_timestep_hook) or call set_timestep(unet, t)")
        r = per_sample(ramp(p.to(y0.device), self.switch, self.width), y0)
        late = self.floor + (1 - self.floor) * r
        early = 1 - (1 - self.floor) * r
        weights = {n: early if self.roles.get(n) == "subject" else late if self.roles.get(n) == "style"
                   else torch.ones((), device=y0.device, dtype=y0.dtype) for n in ys}
        out = y0
        for n, y in ys.items():
            out = out + weights[n] * y
        return out, weights


class ScheduledFusion(FusionMethod):
    name = "scheduled"
    formula = "y = y0 + sum_subject (1-(1-floor)r(p)) y_i + sum_style (floor+(1-floor)r(p)) y_j; r = ramp(1-t/T)"
    needs_roles = True
    needs_timestep = True

    @dataclass
    class Options:
        switch: float = 0.5  # progress at which subject and style weigh the same
        width: float = 0.4  # progress over which the weights cross over (0: a hard switch)
        floor: float = 0.0  # minimum weight of each role

    def make_combiner(self, key: str, layer: AdaptedLayer, names: list[str], roles: dict[str, str]) -> Combiner | None:
        if not any(n in layer.adapters for n in names):
            return None
        o = self.options
        if not (0 <= o.floor <= 1 and o.width >= 0):
            raise AdapterError(f"scheduled fusion: floor in [0, 1] and width >= 0 expected, got {o}")
        return ScheduledCombiner(names, roles, o.switch, o.width, o.floor)
