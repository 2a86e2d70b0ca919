"""SingLoRA (Bensaïd et al. 2025, arXiv 2507.05566): one factor, a symmetric update and a ramp.

    ΔW_t = (α/r) · u(t) · (A Aᵀ)[:out, :in],   A: (d_max, r),  d_max = max(out, in),  u(t) = min(t / T, 1)

Square W: ΔW = s·u·AAᵀ, symmetric and positive semi-definite for α > 0. Non-square W (the paper's
extension): the top-left out×in block of AAᵀ, i.e. A·A*ᵀ with A* the first d_min rows of A; its leading
d_min×d_min block is symmetric PSD. t is the optimizer-step counter (``ctx.step``), which the training
loop advances with no user code (``lora_diffusion.TrainingHooks``); with no step in the context (inference,
a loaded file) u = 1. A is Kaiming-uniform (no zero factor): the adapter is a no-op at step 0 only because
u(0) = 0, so ``identity_init`` is False. Trainable: d_max·r per layer, half of LoRA's for square W.

Conv2d (our extension, not in the paper nor in peft-singlora, which raises): the kernel is flattened to
out × (in·kh·kw) and the non-square rule applies; the forward is a conv with the first in·kh·kw rows of A
(as an (r, in, kh, kw) kernel) followed by a 1x1 conv with the first out rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.adapter import Adapter, kaiming_uniform_, new_param
from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.functional import lowrank_forward, lowrank_weight
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import ModuleConfig


def ramp(step: int | None, ramp_steps: int) -> float:
    """u(t) = min(t / T, 1); 1 when no training step is set (inference)."""
    if step is None:
        return 1.0
    return min(max(step, 0) / ramp_steps, 1.0)


@register_variant
class SingLoRA(Adapter):
    variant = "singlora"
    paper = "https://arxiv.org/abs/2507.05566"
    identity_init = False  # a no-op only at step 0 (u = 0), not at inference
    uses_step = True
    param_roles = {"lora_A": "A"}
    export_as_lora = True  # kohya/diffusers/PEFT files get down = A[:fan_in]ᵀ, up = A[:out] (rank r, u = 1)

    @dataclass
    class Options:
        ramp_steps: int = 1000  # T: optimizer steps until u = 1 (third-party default; the paper leaves it open)
        init: str = "kaiming"  # "kaiming" (a=sqrt(5), as peft-singlora) | "gaussian" (N(0, 1/r²))

        def __post_init__(self) -> None:
            if isinstance(self.ramp_steps, bool) or not isinstance(self.ramp_steps, int) or self.ramp_steps < 1:
                raise AdapterError(f"option ramp_steps: expected an integer >= 1, found {self.ramp_steps!r}")
            if self.init not in ("kaiming", "gaussian"):
                raise AdapterError(f"option init: expected 'kaiming' or 'gaussian', found {self.init!r}")

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw: Any) -> None:
        super().__init__(info, cfg, **kw)
        self.lora_A = new_param(max(info.out_features, info.fan_in), cfg.rank)  # (d_max, r)
        gen = cfg.generator()
        if cfg.options.init == "gaussian":
            with torch.no_grad():
                self.lora_A.normal_(0.0, 1.0 / cfg.rank, generator=gen)
        else:
            kaiming_uniform_(self.lora_A, gen)

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        return max(info.out_features, info.fan_in) * cfg.rank

    def ramp(self, ctx: CallContext | None) -> float:
        return ramp(None if ctx is None else ctx.step, self.cfg.options.ramp_steps)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (r, in, *k), up (out, r, *1)): the first fan_in and the first out rows of A."""
        info, a = self.info, self.lora_A
        down = a[: info.fan_in].t().reshape(self.cfg.rank, info.in_features, *info.kernel_size)
        up = a[: info.out_features].reshape(info.out_features, self.cfg.rank, *([1] * info.ndim_kernel))
        return down, up

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """ΔW at inference (u = 1) as s · up · down, for exports to plain-LoRA formats."""
        down, up = self._factors()
        return down, up, self.scaling

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        down, up = self._factors()
        return lowrank_weight(down, up, self.info.weight_shape) * (self.scaling * self.ramp(ctx))

    def delta_forward(self, x: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        down, up = self._factors()
        return lowrank_forward(x, self.info, down, up) * (self.scaling * self.ramp(ctx))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ramp_steps={self.cfg.options.ramp_steps}"
