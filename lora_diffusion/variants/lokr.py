"""LoKr (KronA, Edalati et al. 2022, arXiv 2212.10650; LyCORIS): Kronecker product adaptation.

    out = a·b, in = c·d (``factorization``),   ΔW = s · W1 ⊗ W2,   W1: (a, c),   W2: (b, d[, kh, kw])

W2 is low-rank W2a W2b (b×r, r×d·k) when r < max(b, d)/2, else full; W1 is low-rank too with
``decompose_both``. Conv kernels live in W2 (W1 is broadcast as a×c×1×1); ``use_tucker`` stores W2
as a Tucker core t2 (r, r, kh, kw) with W2a (r, b), W2b (r, d). Names, shapes, init and the
"both factors full: alpha = rank, s = 1" rule follow LyCORIS, so its files load unchanged.
Init: W1 (or W1a, W1b) and W2a kaiming-uniform, W2 / W2b = 0 (ΔW = 0).

``shape=[a, b, c, d]`` gives the factor layout explicitly, as files of pre-release LyCORIS have it (any split of
out = a·b and of fan_in = in·kh·kw = c·d, kernels spread across both factors): W1 (a, c), W2 (b, d) are matrices and
ΔW = s · (W1 ⊗ W2).reshape(weight.shape), the rule A1111 and ComfyUI apply; there ``decompose_both`` means "W1 is
W1a W1b" and ``full_matrix`` "W2 is full" (no rank rule: the file says which).

``row_offset=o`` (with ``shape``) makes the module rows [o, o + out) of W1 ⊗ W2 (a·b ≥ o + out): one part of a LoKr
trained on a fused projection (BFL ``img_attn.qkv`` = diffusers ``to_q/to_k/to_v``) whose parts do not start at
multiples of W2's height b. The part keeps W1's rows ⌊s/b⌋ .. ⌈e/b⌉ of its rows [s, e) and o = s mod b: exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.adapter import Adapter, kaiming_uniform_, new_param
from ..core.context import CallContext
from ..core.errors import TargetError
from ..core.functional import factorization, rebuild_tucker
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import ModuleConfig


@dataclass(frozen=True)
class LoKrShapes:
    a: int  # out = a·b
    b: int
    c: int  # in = c·d
    d: int
    k: tuple[int, ...]
    full_w1: bool
    full_w2: bool
    tucker: bool


def lokr_shapes(info: LayerInfo, cfg: ModuleConfig) -> LoKrShapes:
    o = cfg.options
    if o.shape is not None:  # explicit layout (pre-release LyCORIS): matrices over (out, fan_in), the file's choices
        a, b, c, d = o.shape
        off = o.row_offset
        rows_ok = a * b == info.out_features if off is None else off + info.out_features <= a * b
        if not rows_ok or c * d != info.fan_in:
            want = f"a·b = out = {info.out_features}" if off is None else f"a·b ≥ row_offset + out = {off + info.out_features}"
            raise ValueError(f"LoKr shape {list(o.shape)}: expected {want} and c·d = in·kh·kw = {info.fan_in}")
        tucker = False
        return LoKrShapes(a, b, c, d, (), not o.decompose_both, bool(o.full_matrix), tucker)
    c, d = factorization(info.in_features, o.factor)
    a, b = factorization(info.out_features, o.factor)
    if o.unbalanced_factorization:
        a, b = b, a
    r, k = cfg.rank, info.kernel_size
    full_w1 = not (o.decompose_both and r < max(a, c) / 2 and not o.full_matrix)
    full_w2 = r >= max(b, d) / 2 or o.full_matrix
    tucker = bool(o.use_tucker) and info.kind == "conv2d" and any(x != 1 for x in k) and not full_w2
    return LoKrShapes(a, b, c, d, k, full_w1, full_w2, tucker)


@register_variant
class LoKr(Adapter):
    variant = "lokr"
    rank_limited = False  # r only bounds W2's factorisation; LyCORIS falls back to full factors
    paper = "https://arxiv.org/abs/2212.10650"
    param_roles = {"lokr_w1": "w1", "lokr_w1_a": "w1", "lokr_w1_b": "w1",
                   "lokr_w2": "B", "lokr_w2_a": "A", "lokr_w2_b": "B", "lokr_t2": "core"}

    @dataclass
    class Options:
        factor: int = -1
        decompose_both: bool = False
        use_tucker: bool = False
        full_matrix: bool = False
        unbalanced_factorization: bool = False
        shape: list[int] | None = None  # [a, b, c, d]: W1 (a, c), W2 (b, d) over (out, fan_in); see the docstring
        row_offset: int | None = None  # with shape: the module is rows [o, o + out) of W1 ⊗ W2 (a fused module's part)

        def __post_init__(self) -> None:
            if self.shape is not None and (len(self.shape) != 4 or not all(isinstance(x, int) and x > 0 for x in self.shape)):
                raise ValueError(f"option shape: expected [a, b, c, d] of positive ints, found {self.shape!r}")
            if self.row_offset is not None and (self.shape is None or not isinstance(self.row_offset, int)
                                                or self.row_offset < 0):
                raise ValueError(f"option row_offset: expected a non-negative int together with shape, found "
                                 f"row_offset={self.row_offset!r}, shape={self.shape!r}")

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw) -> None:
        super().__init__(info, cfg, **kw)
        sh = self.shapes = lokr_shapes(info, cfg)
        r, gen = cfg.rank, cfg.generator()
        if sh.full_w1 and sh.full_w2:  # LyCORIS: "alpha ignored in full dimension", s = 1 (rs: sqrt r)
            self.scaling = r / (math.sqrt(r) if cfg.rslora else r)
        if sh.full_w1:
            self.lokr_w1 = kaiming_uniform_(new_param(sh.a, sh.c), gen)
        else:
            self.lokr_w1_a = kaiming_uniform_(new_param(sh.a, r), gen)
            self.lokr_w1_b = kaiming_uniform_(new_param(r, sh.c), gen)
        if sh.full_w2:
            self.lokr_w2 = torch.nn.Parameter(torch.zeros(sh.b, sh.d, *sh.k))
            return
        if sh.tucker:
            self.lokr_t2 = kaiming_uniform_(new_param(r, r, *sh.k), gen)
            self.lokr_w2_a = kaiming_uniform_(new_param(r, sh.b), gen)
            self.lokr_w2_b = torch.nn.Parameter(torch.zeros(r, sh.d))
        else:
            self.lokr_w2_a = kaiming_uniform_(new_param(sh.b, r), gen)
            self.lokr_w2_b = torch.nn.Parameter(torch.zeros(r, sh.d * math.prod(sh.k)))

    @classmethod
    def check(cls, info: LayerInfo, cfg: ModuleConfig, loading: bool = False) -> None:
        super().check(info, cfg, loading)
        try:
            lokr_shapes(info, cfg)
        except ValueError as e:
            raise TargetError(f"module '{cfg.module_name}': {e}") from None

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        sh, r = lokr_shapes(info, cfg), cfg.rank
        kk = math.prod(sh.k)
        n = sh.a * sh.c if sh.full_w1 else r * (sh.a + sh.c)
        if sh.full_w2:
            return n + sh.b * sh.d * kk
        if sh.tucker:
            return n + r * r * kk + r * (sh.b + sh.d)
        return n + r * (sh.b + sh.d * kk)

    def _w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.shapes.full_w1 else self.lokr_w1_a @ self.lokr_w1_b  # (a, c)

    def _w2(self) -> torch.Tensor:
        sh = self.shapes
        if sh.full_w2:
            return self.lokr_w2
        if sh.tucker:
            return rebuild_tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)  # (b, d, *k)
        return (self.lokr_w2_a @ self.lokr_w2_b).view(sh.b, sh.d, *sh.k)

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        w1 = w1.view(*w1.shape, *([1] * (w2.dim() - 2)))
        # torch.kron fails on a non-contiguous w2 (the Tucker einsum's output); PEFT and LyCORIS also call .contiguous()
        dw = torch.kron(w1, w2.contiguous()) * self.scaling  # (a·b, c·d, *k)
        off = self.cfg.options.row_offset
        if off is not None:  # a part of a fused module: its rows of the product
            dw = dw[off:off + self.info.out_features]
        return dw if self.shapes.k == self.info.kernel_size else dw.reshape(self.info.weight_shape)  # explicit shape

    def extra_repr(self) -> str:
        sh = self.shapes
        return super().extra_repr() + f", kron=({sh.a}x{sh.c})⊗({sh.b}x{sh.d})"
