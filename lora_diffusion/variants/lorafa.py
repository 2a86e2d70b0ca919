"""LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): LoRA with the down-projection A frozen at its random init.

    y = W x + s · B (A x),   A: (r, in[, kh, kw]) frozen (a buffer, stored in the file),  B: (out, r[, 1, 1]) trained

Only B trains (out·r per layer), so the backward pass keeps the r-dim activation z = A x, not the layer input x:
the activation-memory saving that motivates the paper (A is a buffer, so autograd has no reason to save x).
Init as LoRA: A Kaiming-uniform, B = 0; s = α/r (or α/√r with rslora). Conv2d: the LoCon form with A frozen.

Optimizer (``options.optimizer``): "projected" (default; PEFT's ``LoraFAOptimizer`` rule) projects B's gradient

    g̃_B = (1/s²) · g_B · (A Aᵀ + 1e-8·I)⁺

before an AdamW update, so s·ΔB·A is the least-squares fit, within A's row space, to the full-weight gradient
(with orthonormal rows in A and s = 1 it is the identity); "adamw": the trainer's own optimizer on B (the
2023 paper). Training loops pick it up through ``lora_diffusion.variant_optimizer`` with no user code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.adapter import Adapter
from ..core.errors import AdapterError
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import ModuleConfig
from .lora import LoRA


def project_grad(grad_b: torch.Tensor, a: torch.Tensor, scaling: float, delta: float = 1e-8) -> torch.Tensor:
    """g̃_B = (1/s²)·g_B·(AAᵀ + δI)⁺ for g_B (out, r[, 1, 1]) and A (r, in[, kh, kw]); same shape as g_B."""
    a2 = a.reshape(a.shape[0], -1)  # (r, fan_in)
    gram = a2 @ a2.T + delta * torch.eye(a2.shape[0], dtype=a2.dtype, device=a2.device)  # (r, r)
    g = grad_b.reshape(grad_b.shape[0], -1) @ torch.linalg.pinv(gram)  # (out, r)
    return (g / scaling**2).view_as(grad_b)


class LoraFAOptimizer(torch.optim.Optimizer):
    """AdamW (bias-corrected step size, eps added to √v, decoupled decay after the step, as PEFT's
    ``LoraFAOptimizer``) with LoRA-FA's projected gradient for every B in ``pairs``; other tensors (placeholder
    embeddings, other roles) get the plain AdamW update."""

    def __init__(self, params: Any, pairs: dict[int, tuple[torch.Tensor, float]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self._pairs = pairs  # id(B) -> (A, s)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                pair = self._pairs.get(id(p))
                g = project_grad(p.grad, pair[0], pair[1]).to(p.grad.dtype) if pair else p.grad
                st = self.state[p]
                if not st:
                    st["step"], st["exp_avg"], st["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                st["exp_avg"].mul_(beta1).add_(g, alpha=1.0 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** st["step"]) / (1.0 - beta1 ** st["step"])
                p.addcdiv_(st["exp_avg"], st["exp_avg_sq"].sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


@register_variant
class LoRAFA(LoRA):
    variant = "lorafa"
    paper = "https://arxiv.org/abs/2308.03303"
    param_roles = {"lora_B": "B"}
    export_as_lora = True  # the same tensors as a LoRA: kohya/diffusers/PEFT files hold it as one

    @dataclass
    class Options(LoRA.Options):
        optimizer: str = "projected"  # "projected" (PEFT's LoraFAOptimizer) | "adamw" (the trainer's, on B only)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.optimizer not in ("projected", "adamw"):
                raise AdapterError(f"option optimizer: expected 'projected' or 'adamw', found {self.optimizer!r}")

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw: Any) -> None:
        super().__init__(info, cfg, **kw)
        a = self.lora_A.detach()
        del self.lora_A
        self.register_buffer("lora_A", a)  # frozen, persistent: saved with B, never in an optimizer

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        return cfg.rank * info.out_features

    @classmethod
    def make_optimizer(cls, adapters: list[Adapter], groups: list[dict[str, Any]], *, lr: float,
                       betas: tuple[float, float], eps: float, weight_decay: float) -> torch.optim.Optimizer | None:
        if not any(a.cfg.options.optimizer == "projected" for a in adapters):
            return None
        pairs = {id(a.lora_B): (a.lora_A, a.scaling) for a in adapters if a.cfg.options.optimizer == "projected"}
        return LoraFAOptimizer(groups, pairs, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
