"""Delta-LoRA (Zi et al. 2023, arXiv 2309.02411): the update of BA also moves the base weight.

    y = W(t) x + s · B A x,   after each optimizer step t > K:  W(t+1) = W(t) + λ · s · (B'A' − B A)

No dropout (the paper removes it). The updates telescope: after step T, W(T) − W0 = λ·s·(B_T A_T − B_K A_K), with
(A_K, B_K) the factors after step K. So instead of writing into W we keep that snapshot (persistent buffers
``lora_A_K``, ``lora_B_K``, checkpointed as training state) and compute

    y = W0 x + s · (B A x + λ · (B̄ Ā x − B_K A_K x)),   B̄, Ā = B, A detached (W has no gradient)

Same outputs and gradients as the in-place rule, with the base weight untouched: it works on a frozen or 4-bit
base, ``remove_adapters`` restores W0 exactly, every data-parallel rank computes the same thing from the same
synchronised factors, and the saved artifact (A, B, A_K, B_K) holds the full-size difference W_T − W0 exactly at
rank <= 2r. External formats get the total ΔW = (1+λ)·s·BA − λ·s·B_K A_K as an exactly equal plain LoRA of rank 2r.
While t <= K the snapshot follows (A, B), so the λ term is exactly zero. Init as LoRA: A Kaiming-uniform, B = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.functional import lowrank_forward, lowrank_weight
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import ModuleConfig
from .lora import LoRA


@register_variant
class DeltaLoRA(LoRA):
    variant = "deltalora"
    paper = "https://arxiv.org/abs/2309.02411"
    export_as_lora = True
    state_buffers = ("lora_A_K", "lora_B_K")
    supports_dropout = False  # the paper removes dropout: the W update assumes the undropped BA

    @dataclass
    class Options(LoRA.Options):
        update_ratio: float = 0.5  # λ (the paper tunes it per task; variants.md records its values as unverified)
        start_step: int = 0  # K: W moves only after optimizer steps t > K

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.update_ratio >= 0:
                raise AdapterError(f"option update_ratio: expected >= 0, found {self.update_ratio!r}")
            if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
                raise AdapterError(f"option start_step: expected an integer >= 0, found {self.start_step!r}")

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw: Any) -> None:
        super().__init__(info, cfg, **kw)
        self.register_buffer("lora_A_K", self.lora_A.detach().clone())  # (r, in, *k)
        self.register_buffer("lora_B_K", self.lora_B.detach().clone())  # (out, r, *1)

    def after_step(self, step: int) -> None:
        if step <= self.cfg.options.start_step:  # W not moving yet: the snapshot follows (A, B)
            self.lora_A_K.copy_(self.lora_A)
            self.lora_B_K.copy_(self.lora_B)

    def base_update(self) -> torch.Tensor:
        """W(t) − W0 = λ·s·(BA − B_K A_K), in the base weight's layout."""
        shape, lam = self.info.weight_shape, self.cfg.options.update_ratio
        w = lowrank_weight(self.lora_A.detach(), self.lora_B.detach(), shape)
        return (w - lowrank_weight(self.lora_A_K, self.lora_B_K, shape)) * (lam * self.scaling)

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        return lowrank_weight(self.lora_A, self.lora_B, self.info.weight_shape) * self.scaling + self.base_update()

    def delta_forward(self, x: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        y = lowrank_forward(x, self.info, self.lora_A, self.lora_B)
        lam = self.cfg.options.update_ratio
        if lam:
            moved = lowrank_forward(x, self.info, self.lora_A.detach(), self.lora_B.detach())
            y = y + lam * (moved - lowrank_forward(x, self.info, self.lora_A_K, self.lora_B_K))
        return y * self.scaling

    def adapted_output(self, x, base_out, layer, ctx, scale):  # not LoRA's addmm fast path: three products
        return Adapter.adapted_output(self, x, base_out, layer, ctx, scale)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """ΔW = s·[(1+λ)B, −λB_K]·[A; A_K] (rank 2r), for exports to plain-LoRA formats."""
        lam = self.cfg.options.update_ratio
        down = torch.cat([self.lora_A, self.lora_A_K])
        up = torch.cat([(1 + lam) * self.lora_B, -lam * self.lora_B_K], dim=1)
        return down, up, self.scaling

    def extra_repr(self) -> str:
        o = self.cfg.options
        return super().extra_repr() + f", update_ratio={o.update_ratio:g}, start_step={o.start_step}"
