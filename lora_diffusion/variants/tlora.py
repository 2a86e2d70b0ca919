"""T-LoRA (Soboleva et al., AAAI 2026, arXiv 2507.05964): timestep-dependent rank for one-image customisation.

    r(t) = floor(((T - t)/T)^γ · (r - r_min)) + r_min,    M_t = diag(1,..,1 (r(t) ones), 0,..,0)
    ΔW_t = s · (B diag(λ ⊙ m_t) A - B0 diag(λ0 ⊙ m_t) A0)          (full T-LoRA, Ortho-LoRA init)
    ΔW_t = s · B M_t A                                              (vanilla, ``ortho=False``)

Noisier steps (large t) use fewer ranks, so the adapter cannot memorise the one photo's layout.
Ortho-LoRA init: R ~ N(0, 1/r²) of shape (out, in·k), R = U S Vᵀ; A = Vᵀ[-r:], B = U[:, -r:],
λ = S[-r:] (the smallest singular triplets, ``sig_type="last"``, the paper's default). The frozen
copies A0, B0, λ0 are subtracted so the output is exactly zero at init; they are regenerated
from ``AdapterSpec.seed`` and the module name, never stored, so a T-LoRA file is as small as a
LoRA file of the same rank. The mask is read from the call context (``set_timestep``) in training
and inference; with no timestep set the adapter runs at full rank. s = alpha/r, 1 by default
(alpha = rank), as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter, new_param, normal_
from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.functional import active_rank, lowrank_forward, lowrank_weight, rank_mask
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import ModuleConfig


def ortho_init(out: int, fan_in: int, r: int, gen: torch.Generator, sig_type: str = "last"):
    """(A (r, fan_in), B (out, r), λ (r,)) from the SVD of a Gaussian matrix with std 1/r."""
    R = torch.empty(out, fan_in).normal_(0.0, 1.0 / r, generator=gen)
    u, s, vh = torch.linalg.svd(R, full_matrices=False)  # u (out, k), s (k,), vh (k, fan_in)
    k = s.shape[0]
    start = {"last": k - r, "principal": 0, "middle": (k - r) // 2}[sig_type]
    sl = slice(start, start + r)
    return vh[sl].contiguous(), u[:, sl].contiguous(), s[sl].contiguous()


@register_variant
class TLoRA(Adapter):
    variant = "tlora"
    paper = "https://arxiv.org/abs/2507.05964"
    uses_context = True
    param_roles = {"lora_A": "A", "lora_B": "B", "lora_S": "S"}

    @dataclass
    class Options:
        min_rank: int | None = None  # None: rank // 2 (the paper's r_min = 50% of r)
        rank_exponent: float = 1.0  # γ, the official --alpha_rank_scale
        ortho: bool = True  # Ortho-LoRA init (full T-LoRA); False: vanilla T-LoRA
        sig_type: str = "last"  # which singular triplets: "last" | "principal" | "middle"
        num_train_timesteps: int | None = None  # None: from the context (scheduler's T, 1000)

        def __post_init__(self) -> None:
            if self.sig_type not in ("last", "principal", "middle"):
                raise AdapterError(f"option sig_type: expected 'last', 'principal' or 'middle', found {self.sig_type!r}")
            if not self.rank_exponent > 0:
                raise AdapterError(f"option rank_exponent: expected > 0, found {self.rank_exponent!r}")

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw: Any) -> None:
        super().__init__(info, cfg, **kw)
        r, o = cfg.rank, cfg.options
        self.min_rank = r // 2 if o.min_rank is None else o.min_rank
        gen = cfg.generator()
        a_shape, b_shape = (r, info.in_features, *info.kernel_size), (info.out_features, r, *([1] * info.ndim_kernel))
        if not o.ortho:
            self.lora_A = normal_(new_param(*a_shape), gen, 1.0 / r)
            self.lora_B = nn.Parameter(torch.zeros(b_shape))
            return
        a, b, s = ortho_init(info.out_features, info.fan_in, r, gen, o.sig_type)
        self.lora_A = nn.Parameter(a.view(a_shape).clone())
        self.lora_B = nn.Parameter(b.view(b_shape).clone())
        self.lora_S = nn.Parameter(s.clone())
        self.register_buffer("lora_A0", a.view(a_shape), persistent=False)  # frozen copies, regenerated
        self.register_buffer("lora_B0", b.view(b_shape), persistent=False)
        self.register_buffer("lora_S0", s, persistent=False)

    @classmethod
    def check(cls, info: LayerInfo, cfg: ModuleConfig) -> None:
        super().check(info, cfg)
        m = cfg.options.min_rank
        if m is not None and not (1 <= m <= cfg.rank):
            raise AdapterError(f"module '{cfg.module_name}': T-LoRA min_rank {m} must be in [1, rank={cfg.rank}]")

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        return cfg.rank * (info.fan_in + info.out_features) + (cfg.rank if cfg.options.ortho else 0)

    def _schedule(self, ctx: CallContext) -> tuple[int, int, int, float]:
        o = self.cfg.options
        return self.cfg.rank, self.min_rank, o.num_train_timesteps or ctx.num_train_timesteps, o.rank_exponent

    def mask(self, ctx: CallContext | None) -> torch.Tensor | None:
        """(r,) or (B, r) rank mask for the context's timestep; None (full rank) without one.

        Memoised per context: all layers with the same schedule share one mask per timestep."""
        if ctx is None or ctx.timestep is None:
            return None
        key = ("mask", *self._schedule(ctx), self.lora_A.device, self.dtype)
        m = ctx.cache.get(key)
        if m is None:
            m = rank_mask(ctx.timestep.to(self.lora_A.device), *self._schedule(ctx)).to(self.dtype)
            ctx.cache[key] = m
        return m

    def active_rank(self, ctx: CallContext | None) -> int | None:
        """r(t) as a Python int when one timestep covers the batch (memoised per context: one host read per
        step, not per layer); None for per-sample timesteps and under torch.compile (the mask path)."""
        if ctx is None or ctx.timestep is None:
            return self.cfg.rank
        if torch.compiler.is_compiling():
            return None
        key = ("rank", *self._schedule(ctx))
        if key not in ctx.cache:
            t = ctx.timestep.detach().flatten()
            uniform = t.numel() == 1 or bool((t == t[0]).all())
            ctx.cache[key] = active_rank(float(t[0]), *self._schedule(ctx)) if uniform else None
        return ctx.cache[key]

    def _mids(self, ctx: CallContext | None, batch: int | None) -> tuple[Any, Any]:
        """Rank-space multipliers (λ ⊙ m, λ0 ⊙ m) of the trained and frozen halves (vanilla: m, None)."""
        m = self.mask(ctx)
        if m is not None and m.dim() == 2 and batch is not None and m.shape[0] != batch:
            if bool((ctx.timestep == ctx.timestep.flatten()[0]).all()):
                m = m[0]
            else:
                raise AdapterError(f"module '{self.cfg.module_name}': {m.shape[0]} timesteps for a batch of {batch}")
        if not self.cfg.options.ortho:
            return m, None
        s0 = self.lora_S0 if m is None else self.lora_S0 * m
        s = self.lora_S if m is None else self.lora_S * m
        return s, s0

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        mid, mid0 = self._mids(ctx, None)
        if mid is not None and mid.dim() == 2:
            raise AdapterError("T-LoRA: merging needs one timestep, found a per-sample timestep")
        w = lowrank_weight(self.lora_A, self.lora_B, self.info.weight_shape, mid)
        if self.cfg.options.ortho:
            w = w - lowrank_weight(self.lora_A0, self.lora_B0, self.info.weight_shape, mid0)
        return w * self.scaling

    def delta_forward(self, x: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        r_t = self.active_rank(ctx)
        if r_t is not None:  # one timestep: compute only the r(t) active components (slices, no 0/1 multiplies)
            y = self._sliced_forward(x, r_t)
        else:
            mid, mid0 = self._mids(ctx, x.shape[0] if x.dim() > 1 else None)
            y = lowrank_forward(x, self.info, self.lora_A, self.lora_B, mid)
            if self.cfg.options.ortho:
                y = y - lowrank_forward(x, self.info, self.lora_A0, self.lora_B0, mid0)
        return y if self.scaling == 1.0 else y * self.scaling

    def adapted_output(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module,
                       ctx: CallContext | None, scale: float | torch.Tensor) -> torch.Tensor:
        """Linear fast path (one timestep, ortho): the trained-minus-frozen difference in one addmm.

            B·(S⊙Ax) − B0·(S0⊙A0x) = [B, B − B0] · [h − h0; h0],  h = S⊙Ax, h0 = S0⊙A0x

        At init (trained == frozen) both blocks are exact zeros, so the output is exactly the base output."""
        r = self.active_rank(ctx) if self.info.kind == "linear" and self.cfg.options.ortho else None
        if (r is None or isinstance(scale, torch.Tensor) or not isinstance(self.dropout, nn.Identity)
                or not (x.dtype == self.lora_A.dtype == base_out.dtype)):
            return super().adapted_output(x, base_out, layer, ctx, scale)
        h = F.linear(x, self.lora_A[:r]) * self.lora_S[:r]  # (..., r)
        h0 = F.linear(x, self.lora_A0[:r]) * self.lora_S0[:r]
        mid = torch.cat([h - h0, h0], dim=-1).reshape(-1, 2 * r)  # (N, 2r)
        b, b0 = self.lora_B[:, :r], self.lora_B0[:, :r]  # (out, r)
        up = torch.cat([b, b - b0], dim=1)  # (out, 2r)
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), mid, up.t(), alpha=self.scaling * scale)
        return out.view(base_out.shape)

    def _sliced_forward(self, x: torch.Tensor, r: int) -> torch.Tensor:
        if not self.cfg.options.ortho:
            return lowrank_forward(x, self.info, self.lora_A[:r], self.lora_B[:, :r])
        # the frozen half is subtracted after both up-projections: exactly zero while trained == frozen
        y = lowrank_forward(x, self.info, self.lora_A[:r], self.lora_B[:, :r], self.lora_S[:r])
        return y - lowrank_forward(x, self.info, self.lora_A0[:r], self.lora_B0[:, :r], self.lora_S0[:r])

    def extra_repr(self) -> str:
        o = self.cfg.options
        return super().extra_repr() + f", min_rank={self.min_rank}, ortho={o.ortho}, exponent={o.rank_exponent:g}"
