"""ARD-LoRA (Shinwari & Usama 2025, arXiv 2506.18267): ranks learned while training, per module and per head.

Each module has H groups (the heads of an attention q/k/v projection, else H = 1) with a learnable scale α_h and
its own rank-r₀ factors (r₀ = the spec's rank):

    ΔW[rows of head h] = s · B_h diag(m_h) A_h,   A_h (r₀, in),  B_h (d_head, r₀),  s = α_lora / r₀
    m_h,j = clamp(r₀·α_h − j, 0, 1),  j = 0 .. r₀−1                  (the differentiable rank relaxation)
    effective rank r_h = #{j : m_h,j > 0} = ⌈r₀·α_h⌉ ∈ [min_rank, r₀]
    L = L_task + λ·(Σ_{l,h} α_{l,h} + β·TV(α)),   α_h ≥ 0 (kept in [min_rank/r₀, 1] after every optimizer step)
    TV(α) = Σ_l Σ_h |α_{l,h+1} − α_{l,h}|  +  Σ_{l} Σ_h |α_{l+1,h} − α_{l,h}|      (heads of a module; the same
            projection in consecutive blocks, e.g. layers.3.self_attn.q_proj → layers.4.self_attn.q_proj)

At α = 1 every m_j is 1, so the adapter equals a LoRA of rank r₀ per head (H = 1: exactly LoRA). m is piecewise
linear in α: between two integer ranks the last component is faded in, so the output interpolates linearly between
the rank-k and rank-(k+1) adapters, ∂L/∂α_h ≠ 0 (it flows through that component), and every component beyond
⌈r₀·α_h⌉ is exactly 0. Truncation is therefore exact: ``lowrank_factors`` keeps the components with m > 0 (m folded
into A), and kohya/diffusers/PEFT exports and ``truncate_to_lora`` give a plain LoRA of rank Σ_h r_h per module with
identical outputs.

Heads: ``heads="auto"`` (default) looks at each target's parent module when the adapter is added
(``resolve_spec``): a Linear named q_proj/k_proj/v_proj (transformers), to_q/to_k/to_v (diffusers) or
query/key/value, whose parent has ``head_dim`` (Llama, Mistral, Qwen, CLIP, ...) or ``heads`` and ``inner_dim``
(diffusers ``Attention``: head size inner_dim/heads), gets one group per head_dim output rows. This runs whenever the
adapter is added or a file is loaded (the spec stored and saved is the user's, so a file reloads with the same
groups on the same architecture; a mismatch is a clear shape error); ``head_dims`` given in the options win over
detection. Output projections (o_proj, to_out) and MLPs, whose output rows are not per head, and Conv2d get H = 1.

Unverified in the reference (variants.md §18 [U]) and chosen here: the relaxation (the paper's is unknown; ours is
the linear soft-rounding mask above, a hard clamp rather than a sigmoid so α = 1 is exactly LoRA and truncation is
exact; the paper's r = max(1, round(r₀α)) becomes ⌈r₀α⌉ with the fractional last component kept and folded in);
what TV runs over (ours: neighbouring heads and the same projection in neighbouring layers, not steps); the α update
(ours: plain joint gradient descent with the task loss, α at ``scale_lr_ratio`` times the learning rate, no weight
decay, projected to [min_rank/r₀, 1] after each step; not alternating or meta-gradient); defaults of λ and β.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter, kaiming_uniform_, new_param
from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.functional import lowrank_forward
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import AdapterSpec, ModuleConfig

QKV_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "to_q", "to_k", "to_v", "query", "key", "value"})


def head_dim_of(model: nn.Module, name: str, module: nn.Module) -> int | None:
    """The head size of an attention q/k/v projection ``name`` (see the module docstring), else None."""
    parent_name, _, child = name.rpartition(".")
    if child not in QKV_NAMES or not isinstance(getattr(module, "base_layer", module), nn.Linear):
        return None
    parent = model.get_submodule(parent_name) if parent_name else model
    hd = getattr(parent, "head_dim", None)
    if not isinstance(hd, int):
        heads, inner = getattr(parent, "heads", None), getattr(parent, "inner_dim", None)
        hd = inner // heads if isinstance(heads, int) and isinstance(inner, int) and heads > 0 else None
    out = getattr(module, "base_layer", module).out_features
    return hd if hd and 0 < hd < out and out % hd == 0 else None


def role(name: str) -> str:
    """The module's name with block indices replaced: the same projection in every layer shares a role."""
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


@register_variant
class ARDLoRA(Adapter):
    variant = "ardlora"
    paper = "https://arxiv.org/abs/2506.18267"
    export_as_lora = True  # at the learned ranks: components with m = 0 dropped, m folded into A
    param_roles = {"lora_A": "A", "lora_B": "B", "ard_alpha": "ard_scale"}

    @dataclass
    class Options:
        heads: str = "auto"  # "auto": per-head scales on attention q/k/v projections; "none": one scale per module
        head_dims: dict[str, int] = field(default_factory=dict)  # module -> head size (win over "auto" detection)
        l1: float = 1e-3  # λ
        tv: float = 0.1  # β
        min_rank: int = 1
        scale_lr_ratio: float = 10.0  # learning rate of α = ratio × the adapter's learning rate

        def __post_init__(self) -> None:
            if self.heads not in ("auto", "none"):
                raise AdapterError(f"option heads: expected 'auto' or 'none', found {self.heads!r}")
            if not isinstance(self.head_dims, dict) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.head_dims.values()):
                raise AdapterError(f"option head_dims: expected {{module: head size >= 1}}, found {self.head_dims!r}")
            if self.l1 < 0 or self.tv < 0 or self.scale_lr_ratio <= 0:
                raise AdapterError(f"options l1, tv: expected >= 0, scale_lr_ratio > 0; found {self.l1}, {self.tv}, "
                                   f"{self.scale_lr_ratio}")
            if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int) or self.min_rank < 1:
                raise AdapterError(f"option min_rank: expected an integer >= 1, found {self.min_rank!r}")

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw: Any) -> None:
        super().__init__(info, cfg, **kw)
        r, k, self.heads = cfg.rank, info.kernel_size, self.num_heads(info, cfg)
        self.lora_A = new_param(self.heads * r, info.in_features, *k)  # (H·r, in, *k): head h owns rows h·r..h·r+r−1
        self.lora_B = new_param(info.out_features, r, *([1] * len(k)))  # (out, r): rows of head h use head h's r
        self.ard_alpha = nn.Parameter(torch.ones(self.heads))  # α_h, 1 = full rank r₀
        kaiming_uniform_(self.lora_A, cfg.generator())
        nn.init.zeros_(self.lora_B)

    @staticmethod
    def num_heads(info: LayerInfo, cfg: ModuleConfig) -> int:
        hd = cfg.options.head_dims.get(cfg.module_name)
        return info.out_features // hd if hd and info.kind == "linear" and info.out_features % hd == 0 else 1

    @classmethod
    def check(cls, info: LayerInfo, cfg: ModuleConfig, loading: bool = False) -> None:
        super().check(info, cfg, loading)
        if cfg.options.min_rank > cfg.rank:
            raise AdapterError(f"module '{cfg.module_name}': ARD-LoRA option min_rank={cfg.options.min_rank} must be "
                               f"<= rank={cfg.rank}")
        hd = cfg.options.head_dims.get(cfg.module_name)
        if hd and info.out_features % hd:
            raise AdapterError(f"module '{cfg.module_name}': head_dims {hd} does not divide its {info.out_features} "
                               "output rows")

    @classmethod
    def resolve_spec(cls, model: nn.Module, spec: AdapterSpec, targets: dict[str, nn.Module]) -> AdapterSpec:
        """heads="auto": the head size of every attention q/k/v target, written into ``head_dims``."""
        opts = dict(spec.options)
        if opts.get("heads", "auto") != "auto":
            return spec
        found = {n: hd for n, m in targets.items() if (hd := head_dim_of(model, n, m))}
        dims = {**found, **opts.get("head_dims", {})}
        return replace(spec, options={**opts, "head_dims": dims}) if dims != opts.get("head_dims", {}) else spec

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        h = cls.num_heads(info, cfg)
        return cfg.rank * (h * info.fan_in + info.out_features) + h

    # --- the relaxed rank ---
    def mask(self) -> torch.Tensor:
        """(H, r) m_h,j = clamp(r·α_h − j, 0, 1)."""
        r = self.cfg.rank
        j = torch.arange(r, device=self.ard_alpha.device, dtype=self.ard_alpha.dtype)
        return (r * self.ard_alpha[:, None] - j).clamp(0.0, 1.0)

    def ranks(self) -> list[int]:
        """Effective rank per head: the components with m > 0."""
        return [int(v) for v in (self.mask() > 0).sum(dim=1)]

    def allocated_rank(self) -> int:
        return sum(self.ranks())

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        info, h, r = self.info, self.heads, self.cfg.rank
        a = self.lora_A.reshape(h, r, info.fan_in)  # (H, r, in·k)
        b = self.lora_B.reshape(h, info.out_features // h, r)  # (H, d, r)
        w = torch.einsum("hdr,hr,hri->hdi", b, self.mask(), a)  # (H, d, in·k)
        return w.reshape(info.weight_shape) * self.scaling

    def delta_forward(self, x: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        if self.heads == 1:
            return lowrank_forward(x, self.info, self.lora_A, self.lora_B, self.mask().view(-1)) * self.scaling
        h, r, out = self.heads, self.cfg.rank, self.info.out_features
        z = nn.functional.linear(x, self.lora_A) * self.mask().view(-1)  # (..., H·r)
        z = z.view(*z.shape[:-1], h, r)
        y = torch.einsum("...hr,hdr->...hd", z, self.lora_B.view(h, out // h, r))  # (..., H, d)
        return y.reshape(*y.shape[:-2], out) * self.scaling

    # --- training: regularizer, projection, optimizer ---
    @classmethod
    def group_regularization(cls, adapters: list[Adapter]) -> torch.Tensor | None:
        """λ·(Σ α + β·TV(α)) over every ARD-LoRA module (order: the model's module order)."""
        o = adapters[0].cfg.options
        if not o.l1:
            return None
        l1 = sum(a.ard_alpha.sum() for a in adapters)
        return o.l1 * (l1 + o.tv * total_variation(adapters)) if o.tv else o.l1 * l1

    @classmethod
    def group_after_step(cls, adapters: list[Adapter], step: int) -> None:
        for a in adapters:
            a.ard_alpha.clamp_(a.cfg.options.min_rank / a.cfg.rank, 1.0)

    @classmethod
    def make_optimizer(cls, adapters: list[Adapter], groups: list[dict[str, Any]], *, lr: float,
                       betas: tuple[float, float], eps: float, weight_decay: float) -> torch.optim.Optimizer | None:
        """No optimizer of its own: the α group of ``groups`` gets ``scale_lr_ratio`` × its lr and no weight decay
        (in place), so the trainer's optimizer (AdamW, 8-bit AdamW, ...) trains α at that rate."""
        ratio = adapters[0].cfg.options.scale_lr_ratio
        for g in groups:
            if g.get("role") == "ard_scale" and not g.get("ard_lr_set"):
                g.update(lr=g["lr"] * ratio, weight_decay=0.0, ard_lr_set=True)
        return None

    # --- export ---
    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """ΔW = s·up·down with only the components of m > 0: down (Σ r_h, in, *k) = m ⊙ A, up (out, Σ r_h, *1)
        block-diagonal over heads. Exact: the dropped components have m = 0."""
        info, h, r = self.info, self.heads, self.cfg.rank
        m = self.mask()  # (H, r)
        keep = (m > 0).view(-1)
        down = (self.lora_A * m.reshape(-1, *([1] * (self.lora_A.dim() - 1))))[keep]
        d = info.out_features // h
        b = self.lora_B.reshape(h, d, r)
        up = torch.zeros(info.out_features, h * r, dtype=b.dtype, device=b.device)
        for i in range(h):
            up[i * d:(i + 1) * d, i * r:(i + 1) * r] = b[i]
        up = up[:, keep].reshape(info.out_features, -1, *([1] * info.ndim_kernel))
        return down, up, self.scaling

    def extra_repr(self) -> str:
        return super().extra_repr() + f", heads={self.heads}, ranks={self.ranks()}"


def total_variation(adapters: list[Adapter]) -> torch.Tensor:
    """Σ |α_{h+1} − α_h| within each module + Σ |α_{l+1} − α_l| between consecutive modules of the same role
    (per head when both have the same heads, else their means)."""
    tv = sum((a.ard_alpha[1:] - a.ard_alpha[:-1]).abs().sum() for a in adapters)
    last: dict[str, torch.Tensor] = {}
    for a in adapters:
        key, al = role(a.cfg.module_name), a.ard_alpha
        prev = last.get(key)
        if prev is not None:
            tv = tv + ((al - prev).abs().sum() if prev.shape == al.shape else (al.mean() - prev.mean()).abs())
        last[key] = al
    return tv


def truncate_to_lora(model: nn.Module, name: str = "default", new_name: str | None = None) -> dict[str, int]:
    """Replace ARD-LoRA adapter ``name`` by a plain LoRA (``new_name``, default the same name) at the learned ranks,
    with identical outputs; returns the rank per module. The LoRA's spec has ``rank_pattern``/``alpha_pattern``."""
    from ..api import add_adapter, get_spec, remove_adapters
    from ..inject.walker import adapted_layers

    spec = get_spec(model, name)
    if spec.variant != ARDLoRA.variant:
        raise AdapterError(f"adapter '{name}' is a '{spec.variant}' adapter, not ardlora")
    forms = {}
    with torch.no_grad():
        for lname, layer in adapted_layers(model):
            if name in layer.adapters:
                forms[lname] = [t.detach().clone() if isinstance(t, torch.Tensor) else t
                                for t in layer.adapters[name].lowrank_factors()]
    ranks = {m: int(f[0].shape[0]) for m, f in forms.items()}
    alphas = {m: float(f[2] * ranks[m]) for m, f in forms.items()}  # scaling s kept: α_k = s·r_k
    lora = AdapterSpec(variant="lora", rank=max(ranks.values()), alpha=None, dropout=spec.dropout,
                       targets=list(ranks), rank_pattern=ranks, alpha_pattern=alphas, seed=spec.seed)
    remove_adapters(model, [name])
    target = new_name or name
    add_adapter(model, lora, target)
    with torch.no_grad():
        for m, (down, up, _) in forms.items():
            ad = model.get_submodule(m).adapters[target]
            ad.lora_A.copy_(down)
            ad.lora_B.copy_(up)
    return ranks
