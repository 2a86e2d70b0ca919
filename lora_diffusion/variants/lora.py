"""LoRA (Hu et al. 2021, arXiv 2106.09685) and rsLoRA (Kalajdzievski 2023, arXiv 2312.03732).

    y = W x + s · B A x,   ΔW = s · B A,   A: (r, in[, kh, kw]), B: (out, r[, 1, 1])
    s = alpha / r  (LoRA)   or   alpha / sqrt(r)  (rsLoRA: update size stays flat as r grows)

Conv2d uses the LoCon form: A is a conv with the base kernel, stride and padding, B a 1x1 conv.
Init as PEFT: A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default), B = 0, so ΔW = 0 at init.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter, kaiming_uniform_, new_param, normal_
from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.functional import lowrank_forward, lowrank_weight
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import ModuleConfig


@register_variant
class LoRA(Adapter):
    variant = "lora"
    paper = "https://arxiv.org/abs/2106.09685"
    param_roles = {"lora_A": "A", "lora_B": "B"}

    @dataclass
    class Options:
        init: str = "kaiming"  # "kaiming" (PEFT default) | "gaussian" (A ~ N(0, 1/r²))

        def __post_init__(self) -> None:
            if self.init not in ("kaiming", "gaussian"):
                raise AdapterError(f"option init: expected 'kaiming' or 'gaussian', found {self.init!r}")

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw) -> None:
        super().__init__(info, cfg, **kw)
        r, k = cfg.rank, info.kernel_size
        self.lora_A = new_param(r, info.in_features, *k)  # (r, in, *k)
        self.lora_B = new_param(info.out_features, r, *([1] * len(k)))  # (out, r, *1)
        gen = cfg.generator()
        if cfg.options.init == "gaussian":
            normal_(self.lora_A, gen, 1.0 / r)
        else:
            kaiming_uniform_(self.lora_A, gen)
        torch.nn.init.zeros_(self.lora_B)

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        return cfg.rank * (info.fan_in + info.out_features)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): this layer's own tensors (LoRA-drop: a shared adapter's)."""
        return self.lora_A, self.lora_B

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        return lowrank_weight(*self.factors(), self.info.weight_shape) * self.scaling

    def delta_forward(self, x: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        out = lowrank_forward(x, self.info, *self.factors())
        return out if self.scaling == 1.0 else out * self.scaling  # alpha = r: no output-sized multiply

    def adapted_output(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module,
                       ctx: CallContext | None, scale: float | torch.Tensor) -> torch.Tensor:
        """Linear fast path: base + (s·scale)·(x Aᵀ) Bᵀ in one addmm (no output-sized multiply or add)."""
        a, b = self.factors()
        if (self.info.kind != "linear" or isinstance(scale, torch.Tensor) or not isinstance(self.dropout, nn.Identity)
                or not (x.dtype == a.dtype == base_out.dtype)):
            return super().adapted_output(x, base_out, layer, ctx, scale)
        h = F.linear(x, a)  # (..., r)
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                          alpha=self.scaling * scale)
        return out.view(base_out.shape)


@register_variant
class RsLoRA(LoRA):
    """LoRA with s = alpha / sqrt(r) whatever ``AdapterSpec.rslora`` says."""

    variant = "rslora"
    paper = "https://arxiv.org/abs/2312.03732"

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw) -> None:
        super().__init__(info, cfg, **kw)
        self.scaling = cfg.alpha / math.sqrt(cfg.rank)
