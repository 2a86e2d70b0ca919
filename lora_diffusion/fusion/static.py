"""Static fusion: the weighted sum (what diffusers ``set_adapters`` does), optionally fused into the weights.

    y = y0 + Σ_i w_i · y_i                  (unfused: each adapter runs beside the base layer)
    W' = W + Σ_i w_i · ΔW_i                 (fused: one matmul per layer, the base model's speed)

No combiner is installed: the adapted layer's own sum (with its LoRA ``addmm`` fast path) is this formula, with
``w_i`` the adapter scales. It is the floor every other method is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.layer import AdaptedLayer
from .base import Combiner, Fusion, FusionMethod


class StaticFusion(FusionMethod):
    name = "static"
    formula = "y = y0 + sum_i w_i * y_i"

    @dataclass
    class Options:
        fuse: bool = False  # fold the weighted sum into the base weights (unfuse: Fusion.remove)

    def make_combiner(self, key: str, layer: AdaptedLayer, names: list[str], roles: dict[str, str]) -> Combiner | None:
        return None

    def install(self, layers: dict[str, AdaptedLayer], names: list[str], roles: dict[str, str]) -> Fusion:
        fusion = Fusion(self, names, roles, layers=dict(layers))
        if self.options.fuse:
            for layer in layers.values():
                layer.merge([n for n in names if n in layer.active])
            fusion.merged = True
        return fusion
