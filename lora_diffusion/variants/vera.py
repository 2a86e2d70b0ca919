"""VeRA (Kopiczko, Blankevoort, Asano, ICLR 2024, arXiv 2310.11454): vector-based random matrix adaptation.

    ΔW = diag(b) · B_s · diag(d) · A_s,   A_s = A[:, :in], B_s = B[:out, :]

A (r, in_max) and B (out_max, r) are frozen random projections shared by the whole model, drawn
once from ``AdapterSpec.seed`` (kaiming-uniform, gain sqrt(2), as PEFT: same seed, same tensors),
so files store only the seed and the trainable vectors d (r,) and b (out,). b = 0 at init,
d = d_initial. No alpha. Linear layers only (as in the paper and PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter, kaiming_uniform_
from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import AdapterSpec, ModuleConfig


def projection_keys(adapter_name: str) -> tuple[str, str]:
    return f"vera_A__{adapter_name}", f"vera_B__{adapter_name}"


@register_variant
class VeRA(Adapter):
    variant = "vera"
    paper = "https://arxiv.org/abs/2310.11454"
    kinds = frozenset({"linear"})
    uses_alpha = False
    rank_limited = False  # r sizes the shared projections, not this layer (PEFT's default r is 256)
    param_roles = {"vera_lambda_d": "d", "vera_lambda_b": "b"}

    @dataclass
    class Options:
        d_initial: float = 0.1

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, *, shared: Any = None, **kw: Any) -> None:
        super().__init__(info, cfg)
        if shared is None:
            raise AdapterError(f"module '{cfg.module_name}': VeRA needs the model's shared projections")
        self._store = [shared]  # a list, so the store is not registered as a child of every layer
        self._keys = projection_keys(cfg.adapter_name)
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.rank,), float(cfg.options.d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(info.out_features))

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        return cfg.rank + info.out_features

    @classmethod
    def prepare_shared(cls, store: Any, adapter_name: str, infos: dict[str, LayerInfo], spec: AdapterSpec) -> None:
        if spec.rank_pattern:
            raise AdapterError("VeRA: rank_pattern is not supported; all layers share one projection rank")
        out_max = max(i.out_features for i in infos.values())
        in_max = max(i.in_features for i in infos.values())
        gen = torch.Generator(device="cpu").manual_seed(spec.seed)
        a = kaiming_uniform_(torch.empty(spec.rank, in_max), gen, a=0.0)  # (r, in_max)
        b = kaiming_uniform_(torch.empty(out_max, spec.rank), gen, a=0.0)  # (out_max, r)
        ka, kb = projection_keys(adapter_name)
        store.put(ka, a)
        store.put(kb, b)

    def _projections(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        store = self._store[0]
        a = store.get(self._keys[0])[:, : self.info.in_features]  # (r, in)
        b = store.get(self._keys[1])[: self.info.out_features, :]  # (out, r)
        return a.to(dtype), b.to(dtype)

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        a, b = self._projections(self.dtype)
        return (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)

    def delta_forward(self, x: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        a, b = self._projections(x.dtype)
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)

    def extra_repr(self) -> str:
        return f"rank={self.cfg.rank}, shared projections (seed {self.cfg.seed})"

