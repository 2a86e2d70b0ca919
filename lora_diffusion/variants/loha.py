"""LoHa (FedPara, Hyeon-Woo et al., ICLR 2022, arXiv 2108.06098; LyCORIS): Hadamard product of two low-rank terms.

    ΔW = s · (W1a W1b) ⊙ (W2a W2b),   W1a, W2a: (out, r),   W1b, W2b: (r, in·kh·kw)

rank(ΔW) <= r² for 2r(in + out) parameters. Conv kernels are flattened, or with ``use_tucker``
(k != 1) each term is a Tucker product t_i ×₁ W_ia ×₂ W_ib with t_i (r, r, kh, kw),
W_ia (r, out), W_ib (r, in). Names, shapes and init follow LyCORIS (files from the wild load):
W1b, W2b ~ N(0, 1), W1a ~ N(0, 0.1²), W2a = 0, cores ~ N(0, 0.1²). s = alpha/r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.adapter import Adapter, new_param, normal_
from ..core.context import CallContext
from ..core.functional import rebuild_tucker
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import ModuleConfig


def _tucker(info: LayerInfo, cfg: ModuleConfig) -> bool:
    return bool(cfg.options.use_tucker) and info.kind == "conv2d" and any(k != 1 for k in info.kernel_size)


@register_variant
class LoHa(Adapter):
    variant = "loha"
    paper = "https://arxiv.org/abs/2108.06098"
    param_roles = {"hada_w1_a": "B", "hada_w1_b": "A", "hada_w2_a": "B", "hada_w2_b": "A",
                   "hada_t1": "core", "hada_t2": "core"}

    @dataclass
    class Options:
        use_tucker: bool = False

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw) -> None:
        super().__init__(info, cfg, **kw)
        r, out = cfg.rank, info.out_features
        self.tucker = _tucker(info, cfg)
        gen = cfg.generator()
        for i in (1, 2):
            if self.tucker:
                setattr(self, f"hada_t{i}", new_param(r, r, *info.kernel_size))
                setattr(self, f"hada_w{i}_a", new_param(r, out))  # out, mode 1
                setattr(self, f"hada_w{i}_b", new_param(r, info.in_features))  # in, mode 2
                normal_(getattr(self, f"hada_t{i}"), gen, 0.1)
            else:
                setattr(self, f"hada_w{i}_a", new_param(out, r))
                setattr(self, f"hada_w{i}_b", new_param(r, info.fan_in))
        normal_(self.hada_w1_b, gen, 1.0)
        normal_(self.hada_w1_a, gen, 0.1)
        normal_(self.hada_w2_b, gen, 1.0)
        torch.nn.init.zeros_(self.hada_w2_a)

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        r = cfg.rank
        if _tucker(info, cfg):
            return 2 * (r * info.out_features + r * info.in_features + r * r * math.prod(info.kernel_size))
        return 2 * r * (info.out_features + info.fan_in)

    def _term(self, i: int) -> torch.Tensor:
        wa, wb = getattr(self, f"hada_w{i}_a"), getattr(self, f"hada_w{i}_b")
        if self.tucker:
            return rebuild_tucker(getattr(self, f"hada_t{i}"), wa, wb)  # (out, in, *k)
        return (wa @ wb).view(self.info.weight_shape)

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        return self._term(1) * self._term(2) * self.scaling
