"""K-LoRA: training-free subject+style fusion by a per-layer, per-step choice of ONE of the two LoRAs.

Ouyang, Li, Hou, "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs", CVPR 2025,
arXiv 2502.18461. Reimplemented from the paper's formula (its code is CC BY-NC; none of it is used here):

    S_c = Σ top-k |ΔW_c|,  S_s = Σ top-k |ΔW_s|,   k = r_c · r_s                 (per adapted layer)
    γ   = mean_l ‖ΔW_c,l‖₁ / ‖ΔW_s,l‖₁   (ratios ≥ 3x their first mean dropped)   (once per model)
    s(t) = α · p + β,  p = 1 - t/T  (sampling progress from the scheduler's t, not a call counter)
    y = y0 + y_c   if S_c / γ > S_s · s(t)   else   y0 + y_s

ΔW is each adapter's applied weight delta (its α/r scaling included). Early steps (small s) favour the subject,
late steps the style. The choice is a tensor comparison on the device (no host sync); both y_c and y_s are
computed. Layers that only one of the two LoRAs adapts use that LoRA alone; text-encoder layers (no timestep) keep
the plain sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.layer import AdaptedLayer
from .base import Combiner, FusionMethod, per_sample, progress


def topk_sum(dw: torch.Tensor, k: int) -> torch.Tensor:
    flat = dw.detach().float().abs().flatten()
    return flat.topk(min(k, flat.numel())).values.sum()


def gamma(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean of ‖ΔW_c‖₁/‖ΔW_s‖₁ over layers after dropping ratios at least 3x the first mean."""
    ratios = torch.stack([c.detach().float().abs().sum() / s.detach().float().abs().sum().clamp_min(1e-12)
                          for c, s in pairs])
    first = ratios.mean()
    kept = ratios[ratios < 3 * first]
    return float((kept if kept.numel() else ratios).mean())


class KLoRACombiner(Combiner):
    def __init__(self, names: list[str], subject: str, style: str, ratio: float, alpha: float, beta: float,
                 pattern: str) -> None:
        super().__init__(names)
        self.subject, self.style, self.alpha, self.beta, self.pattern = subject, style, alpha, beta, pattern
        self.register_buffer("ratio", torch.tensor(float(ratio)))  # S_c / (γ S_s)

    def time_scale(self, ctx: CallContext) -> torch.Tensor:
        p = progress(ctx)
        if p is None:
            raise AdapterError("K-LoRA needs the timestep of each step: generate through lora_diffusion.generate "
                               "(install_timestep_hook) or call lora_diffusion.set_timestep(unet, t)")
        s = self.alpha * p + self.beta
        return torch.remainder(s, self.alpha) if self.pattern == "s*" else s

    def combine(self, layer: AdaptedLayer, y0: torch.Tensor, ys: dict[str, torch.Tensor],
                ctx: CallContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.subject not in ys or self.style not in ys:  # only one of them here: use it
            out = y0
            for y in ys.values():
                out = out + y
            return out, {n: torch.ones((), device=y0.device) for n in ys}
        use_c = per_sample((self.ratio.to(y0.device) > self.time_scale(ctx).to(y0.device)).float(), y0)
        out = y0 + torch.where(use_c > 0, ys[self.subject], ys[self.style])
        return out, {self.subject: use_c, self.style: 1.0 - use_c}


class KLoRAFusion(FusionMethod):
    name = "klora"
    formula = "y = y0 + (y_c if S_c/gamma > S_s*s(t) else y_s); S = sum of top-(r_c*r_s) |dW|; s(t) = alpha*(1-t/T) + beta"
    paper = "https://arxiv.org/abs/2502.18461"
    needs_roles = True
    needs_timestep = True

    @dataclass
    class Options:
        alpha: float = 1.5
        beta: float = 0.5
        pattern: str = "s"  # "s": s(t) as above; "s*": s(t) mod alpha (the paper's alternative)

    def prepare(self, layers: dict[str, AdaptedLayer], names: list[str], roles: dict[str, str]) -> None:
        subj = [n for n in names if roles.get(n) == "subject"]
        style = [n for n in names if roles.get(n) == "style"]
        if len(subj) != 1 or len(style) != 1 or len(names) != 2:
            raise AdapterError(f"K-LoRA fuses one subject and one style LoRA; got roles {roles} for {names}")
        if self.options.pattern not in ("s", "s*"):
            raise AdapterError(f"K-LoRA pattern {self.options.pattern!r}; expected 's' or 's*'")
        self.subject, self.style = subj[0], style[0]
        self._deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for key, layer in layers.items():
                if self.subject in layer.adapters and self.style in layer.adapters and not key.startswith("text_encoder"):
                    self._deltas[key] = (layer.adapters[self.subject].delta_weight(None) * layer.scales[self.subject],
                                         layer.adapters[self.style].delta_weight(None) * layer.scales[self.style])
        self.gamma = gamma(list(self._deltas.values())) if self._deltas else 1.0

    def make_combiner(self, key: str, layer: AdaptedLayer, names: list[str], roles: dict[str, str]) -> Combiner | None:
        if not any(n in layer.adapters for n in names):
            return None
        ratio = 0.0
        if key in self._deltas:
            dc, ds = self._deltas.pop(key)
            k = layer.adapters[self.subject].cfg.rank * layer.adapters[self.style].cfg.rank
            ratio = float(topk_sum(dc, k) / (self.gamma * topk_sum(ds, k)).clamp_min(1e-12))
        o = self.options
        return KLoRACombiner(names, self.subject, self.style, ratio, o.alpha, o.beta, o.pattern)
