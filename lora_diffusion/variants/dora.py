"""DoRA (Liu et al., ICML 2024, arXiv 2402.09353): weight-decomposed low-rank adaptation.

    V = W + s·ΔW_inner,   n = ‖V‖ per output row (detached, paper §4.3),   W' = (m / n) ⊙ V

m (out,) is trainable, initialised to ‖W + s·ΔW_inner‖ (= ‖W‖ when the inner adapter starts at 0).
The forward adds a correction to the base output, as PEFT does:

    y = base(x) + (m/n - 1) ⊙ W x̃ + (m/n) ⊙ s·ΔW_inner x̃,   x̃ = dropout(x)

DoRA wraps any additive variant ("lora" by default; "loha"/"lokr" give LyCORIS' DoHa/DoKr).
It is not additive: merge folds (m/n)·V into W; conv layers normalise over (in, kh, kw).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.layerinfo import LayerInfo
from ..core.registry import get_variant, parse_options, register_variant
from ..core.spec import AdapterSpec, ModuleConfig


def _inner(cfg: ModuleConfig) -> tuple[type[Adapter], ModuleConfig]:
    cls = get_variant(cfg.options.inner)
    if not cls.additive:
        raise AdapterError(f"DoRA option inner: variant '{cls.variant}' is not additive; expected e.g. 'lora'")
    return cls, dataclasses.replace(cfg, dropout=0.0, options=parse_options(cls, cfg.options.inner_options))


@register_variant
class DoRA(Adapter):
    variant = "dora"
    paper = "https://arxiv.org/abs/2402.09353"
    additive = False

    @dataclass
    class Options:
        inner: str = "lora"
        inner_options: dict[str, Any] = field(default_factory=dict)

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, *, base_weight: torch.Tensor | None = None,
                 shared: Any = None) -> None:
        super().__init__(info, cfg)
        if base_weight is None:
            raise AdapterError(f"module '{cfg.module_name}': DoRA needs the base weight to initialise its magnitude")
        cls, icfg = _inner(cfg)
        self.inner = cls(info, icfg, base_weight=base_weight, shared=shared)
        self.scaling = self.inner.scaling
        with torch.no_grad():
            v = base_weight.detach().to(self.inner.dtype) + self.inner.delta_weight().to(base_weight.device)
            self.magnitude = nn.Parameter(v.flatten(1).norm(dim=1))  # (out,)

    @property
    def param_roles(self) -> dict[str, str]:  # type: ignore[override]
        return {f"inner.{k}": v for k, v in self.inner.param_roles.items()} | {"magnitude": "magnitude"}

    @classmethod
    def check(cls, info: LayerInfo, cfg: ModuleConfig, loading: bool = False) -> None:
        inner_cls, icfg = _inner(cfg)
        inner_cls.check(info, icfg, loading)

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        inner_cls, icfg = _inner(cfg)
        return inner_cls.num_params(info, icfg) + info.out_features

    @classmethod
    def prepare_shared(cls, store: Any, adapter_name: str, infos: dict[str, LayerInfo], spec: AdapterSpec) -> None:
        get_variant(spec.options.get("inner", "lora")).prepare_shared(store, adapter_name, infos, spec)

    def _ratio(self, weight: torch.Tensor, ctx: CallContext | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        delta = self.inner.delta_weight(ctx)
        norm = (weight.to(delta.dtype) + scale * delta).flatten(1).norm(dim=1).detach()  # (out,)
        return self.magnitude / norm, delta

    def adapted_output(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module,
                       ctx: CallContext | None, scale: float | torch.Tensor) -> torch.Tensor:
        weight = layer.base_weight()
        ratio, _ = self._ratio(weight, ctx, scale)
        ratio = self.info.channel_view(ratio)
        xd = self.dropout(x.to(self.dtype))
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = layer.base_layer.bias
            wx = base_out.to(self.dtype)
            if bias is not None:
                wx = wx - self.info.channel_view(bias.to(self.dtype))
        else:
            wx = self.info.op(xd, weight.to(self.dtype))
        delta = self.inner.delta_forward(xd, ctx)
        return base_out + ((ratio - 1) * wx + ratio * scale * delta).to(base_out.dtype)

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        raise AdapterError("DoRA is not additive: its delta depends on the base weight; use merged_weight")

    def merged_weight(self, weight: torch.Tensor, ctx: CallContext | None, scale: float) -> torch.Tensor:
        ratio, delta = self._ratio(weight, ctx, scale)
        v = weight.to(delta.dtype) + scale * delta
        return (ratio.view(-1, *([1] * (v.dim() - 1))) * v).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"inner={self.inner.variant}"
