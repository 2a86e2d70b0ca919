"""AdaLoRA (Zhang et al., ICLR 2023, arXiv 2303.10512): an SVD-shaped adapter whose rank budget is reallocated.

    ΔW = s · P diag(λ) Q,   Q = lora_A (r, in·k),  λ = lora_E (r, 1),  P = lora_B (out, r),  s = α / (r + 1e-5)

(PEFT's ``SVDLinear``: the 1e-5 is its ``ranknum + 1e-5``.) Init: λ = 0, P, Q ~ N(0, 0.02²). After every optimizer
step (``group_after_step``, model-wide, driven by the training loop):

    I = |w ⊙ ∂L/∂w|,  Ī ← β1·Ī + (1−β1)·I,  Ū ← β2·Ū + (1−β2)·|I − Ī|,  score = Ī·Ū           (per parameter)
    triplet i: score(λ_i) + mean_j score(Q_ij) + mean_j score(P_ji)
    b(t) = b_init (t <= t_init); b_T + (b_init − b_T)·(1 − (t − t_init)/(T − t_final − t_init))³; b_T (t > T − t_final)

every ΔT steps the triplets at or below the (b_init − b(t))-th smallest score get λ = 0; at t = T − t_final the
mask is fixed and re-applied after every later step. The orthogonality penalty, averaged over every P and Q of the
model, is added to the loss (``group_regularization``): w · mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F) (PEFT's non-squared norm).
``total_step`` (T) is required to train (checked when the training loop starts; the trainers fill it in).
Conv2d: Q is (r, in·kh·kw), as PEFT's ``SVDConv2d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter, new_param, normal_
from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.functional import lowrank_forward, lowrank_weight
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import ModuleConfig


def budget_schedule(step: int, init_budget: int, target_budget: int, total_step: int, tinit: int, tfinal: int,
                    delta_t: int) -> tuple[int, bool]:
    """(budget b(t), whether to mask at this step), PEFT's ``RankAllocator.budget_schedule``."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * mul**3 + target_budget), step % delta_t == 0


@register_variant
class AdaLoRA(Adapter):
    variant = "adalora"
    paper = "https://arxiv.org/abs/2303.10512"
    identity_init = True
    export_as_lora = True  # at the allocated ranks (masked triplets dropped)
    param_roles = {"lora_A": "A", "lora_B": "B", "lora_E": "E"}
    state_buffers = tuple(f"lora_{n}_ipt_{k}" for n in "AEB" for k in ("avg", "unc")) + ("rank_mask",)

    @dataclass
    class Options:
        total_step: int | None = None  # T, required for training (the schedule ends there); the trainers set it
        target_rank: int = 8  # average final rank per module (b_T = target_rank · modules)
        tinit: int = 0
        tfinal: int = 0
        delta_t: int = 1
        beta1: float = 0.85
        beta2: float = 0.85
        orth_reg_weight: float = 0.5

        def __post_init__(self) -> None:
            if self.total_step is None:  # inference and loaded files need no schedule; training checks it
                return
            if isinstance(self.total_step, bool) or not isinstance(self.total_step, int) or self.total_step < 1:
                raise AdapterError(f"option total_step: expected an integer >= 1, found {self.total_step!r}")
            if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
                raise AdapterError(f"options beta1, beta2: expected in (0, 1), found {self.beta1}, {self.beta2}")
            if self.tinit + self.tfinal >= self.total_step:
                raise AdapterError(f"options tinit + tfinal = {self.tinit + self.tfinal}: expected < total_step "
                                   f"({self.total_step}), or there is no budget phase")
            if self.delta_t < 1 or self.target_rank < 1 or self.orth_reg_weight < 0:
                raise AdapterError("options delta_t, target_rank: expected >= 1; orth_reg_weight: expected >= 0")

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw: Any) -> None:
        super().__init__(info, cfg, **kw)
        r = cfg.rank
        self.scaling = cfg.alpha / (r + 1e-5)
        gen = cfg.generator()
        self.lora_A = normal_(new_param(r, info.fan_in), gen, 0.02)  # Q (r, in·k)
        self.lora_E = nn.Parameter(torch.zeros(r, 1))  # λ
        self.lora_B = normal_(new_param(info.out_features, r), gen, 0.02)  # P (out, r)
        for n in ("lora_A", "lora_E", "lora_B"):  # importance EMAs Ī, Ū: training state, checkpointed, not in files
            self.register_buffer(f"{n}_ipt_avg", torch.zeros_like(getattr(self, n)), persistent=False)
            self.register_buffer(f"{n}_ipt_unc", torch.zeros_like(getattr(self, n)), persistent=False)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool), persistent=False)  # fixed at T − t_final

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        return cfg.rank * (info.fan_in + info.out_features) + cfg.rank

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        info = self.info
        down = (self.lora_A * self.lora_E).reshape(self.cfg.rank, info.in_features, *info.kernel_size)
        return down, self.lora_B.reshape(info.out_features, self.cfg.rank, *([1] * info.ndim_kernel))

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        return lowrank_weight(*self._factors(), self.info.weight_shape) * self.scaling

    def delta_forward(self, x: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        return lowrank_forward(x, self.info, *self._factors()) * self.scaling

    # --- rank allocation ---
    def _update_importance(self) -> None:
        o = self.cfg.options
        for n in ("lora_A", "lora_E", "lora_B"):
            p = getattr(self, n)
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg, unc = getattr(self, f"{n}_ipt_avg"), getattr(self, f"{n}_ipt_unc")
            avg.mul_(o.beta1).add_(ipt, alpha=1 - o.beta1)
            unc.mul_(o.beta2).add_((ipt - avg).abs(), alpha=1 - o.beta2)

    def triplet_scores(self) -> torch.Tensor:
        """(r,) score(λ_i) + mean_j score(Q_ij) + mean_j score(P_ji)."""
        s = {n: getattr(self, f"{n}_ipt_avg") * getattr(self, f"{n}_ipt_unc") for n in ("lora_A", "lora_E", "lora_B")}
        return s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)

    @classmethod
    def check_training(cls, adapters: list[Adapter]) -> None:
        for a in adapters:
            if a.cfg.options.total_step is None:
                raise AdapterError(f"module '{a.cfg.module_name}': AdaLoRA option total_step is not set; its budget "
                                   "schedule needs the total number of optimizer steps (options={'total_step': N})")

    @classmethod
    def group_after_step(cls, adapters: list[Adapter], step: int) -> None:
        o = adapters[0].cfg.options
        end = o.total_step - o.tfinal
        if step > end:  # final phase: the fixed mask, re-applied
            for a in adapters:
                a.lora_E.masked_fill_(~a.rank_mask.view(-1, 1), 0.0)
            return
        if step < end:
            for a in adapters:
                a._update_importance()
        init_budget = sum(a.cfg.rank for a in adapters)
        budget, mask = budget_schedule(step, init_budget, o.target_rank * len(adapters), o.total_step, o.tinit,
                                       o.tfinal, o.delta_t)
        if not (mask or step == end) or budget >= init_budget:
            return
        scores = [a.triplet_scores() for a in adapters]
        threshold = torch.kthvalue(torch.cat(scores), init_budget - budget)[0].item()
        for a, sc in zip(adapters, scores):
            keep = sc > threshold
            a.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            if step == end:
                a.rank_mask.copy_(keep)
                for b in cls.state_buffers[:-1]:  # PEFT resets the EMAs here
                    getattr(a, b).zero_()

    @classmethod
    def group_regularization(cls, adapters: list[Adapter]) -> torch.Tensor | None:
        w = adapters[0].cfg.options.orth_reg_weight
        if not w:
            return None
        total = 0.0
        for a in adapters:
            q, p = a.lora_A, a.lora_B
            total = total + torch.linalg.matrix_norm(q @ q.T - torch.eye(q.shape[0], dtype=q.dtype, device=q.device))
            total = total + torch.linalg.matrix_norm(p.T @ p - torch.eye(p.shape[1], dtype=p.dtype, device=p.device))
        return w * total / (2 * len(adapters))

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """ΔW = s·P[:, kept]·(λ⊙Q)[kept]: a plain LoRA of the allocated rank (masked triplets add exactly 0)."""
        keep = self.lora_E.view(-1) != 0
        if not bool(keep.any()):  # nothing allocated (at init): one zero component keeps the shapes valid
            keep[0] = True
        down, up = self._factors()
        return down[keep], up[:, keep], self.scaling

    def allocated_rank(self) -> int:
        return int((self.lora_E != 0).sum())
