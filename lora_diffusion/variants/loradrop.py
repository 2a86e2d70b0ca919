"""LoRA-drop (Zhou et al., COLING 2025, arXiv 2402.07721): per-layer LoRAs where they matter, one shared LoRA elsewhere.

    stage 1   a LoRA on every target, trained a few steps on a sample D_s of the data
    g_i = Σ_{x ∈ D_s} ‖ΔW_i x_i‖²        (ΔW_i = s·B_i A_i, x_i the layer's input: the squared norm of its LoRA output)
    I_i = g_i / Σ_j g_j                  (importance; sums to 1)
    kept  = the smallest prefix of the layers sorted by I (descending) whose Σ I reaches the threshold T (0.9)
    stage 2   fresh init; kept layers: y = Wx + s·B_i A_i x; every other layer: y = Wx + s·B A x with ONE (A, B)

The shared adapter is one storage: its tensors are parameters of the first layer of the group (the owner, in the
model's module order) and the other layers' adapters read them, so the gradient it receives is the sum over every
layer that uses it, optimizers and checkpoints see it once, and the canonical file stores it once
(``<owner>.lora_A``, ``<owner>.lora_B``) with the groups in the spec's options (``shared``).

Our extension: the paper shares one LoRA among layers of equal shape. A model whose dropped layers differ in shape
(an attention block's q/k/v vs. its MLP, a UNet's 320/640/1280-wide blocks) gets one shared adapter per shape
(kind, out, in, kernel, rank): ``share_groups(..., strict=False)``; ``strict=True`` asks for the paper's single shared
adapter and refuses, naming the modules and shapes, when the shapes differ.

Files for other tools (kohya, diffusers, PEFT) hold plain per-module LoRAs: the shared tensors are written once per
module that uses them (``export_as_lora``), which reloads to identical outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.errors import AdapterError
from ..core.layerinfo import LayerInfo
from ..core.registry import parse_options, register_variant
from ..core.spec import AdapterSpec, ModuleConfig
from .lora import LoRA

DEFAULT_THRESHOLD = 0.9  # the paper's T


def check_threshold(threshold: Any, option: str = "threshold") -> float:
    """``threshold`` as a float in (0, 1], else one error naming ``option`` and the range."""
    ok = isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)
    if not ok or not 0 < threshold <= 1:
        raise AdapterError(f"{option}: the LoRA-drop cumulative-importance threshold must be in (0, 1] (e.g. 0.9: keep "
                           f"the layers holding 90% of the importance); found {threshold!r}")
    return float(threshold)


def _links(adapter_name: str) -> str:
    return f"loradrop__{adapter_name}"


@register_variant
class LoRADrop(LoRA):
    variant = "loradrop"
    paper = "https://arxiv.org/abs/2402.07721"
    export_as_lora = True  # kohya/diffusers/PEFT: every layer's own (A, B), shared ones copied per layer

    @dataclass
    class Options(LoRA.Options):
        shared: list[list[str]] = field(default_factory=list)  # groups of modules that share one adapter
        threshold: float = DEFAULT_THRESHOLD  # provenance: the cut that chose the groups
        importance: dict[str, float] = field(default_factory=dict)  # provenance: I_i of every module

        def __post_init__(self) -> None:
            super().__post_init__()
            check_threshold(self.threshold, "option threshold")
            if not isinstance(self.shared, list) or not all(
                    isinstance(g, list) and g and all(isinstance(m, str) for m in g) for g in self.shared):
                raise AdapterError(f"option shared: expected a list of non-empty lists of module names, found "
                                   f"{self.shared!r}")
            seen: set[str] = set()
            for m in (m for g in self.shared for m in g):
                if m in seen:
                    raise AdapterError(f"option shared: module '{m}' is in more than one group")
                seen.add(m)

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, *, shared: Any = None, **kw: Any) -> None:
        links = shared.links.get(_links(cfg.adapter_name)) if shared is not None else None
        owner = links["owner"].get(cfg.module_name, cfg.module_name) if links else cfg.module_name
        if owner == cfg.module_name:
            super().__init__(info, cfg, **kw)
            self._owner: list[LoRADrop] = []
            if links is not None:
                links["adapters"][owner] = self
            return
        Adapter.__init__(self, info, cfg)  # no tensors of its own: the owner's, through ``factors``
        if owner not in links["adapters"]:
            raise AdapterError(f"module '{cfg.module_name}': its shared LoRA-drop adapter lives on '{owner}', which "
                               "was not built first; expected the groups' modules in the model's order")
        self._owner = [links["adapters"][owner]]  # a list: not registered, so the tensors are counted once

    @classmethod
    def prepare_shared(cls, store: Any, adapter_name: str, infos: dict[str, LayerInfo], spec: AdapterSpec) -> None:
        """Check the groups (targets, equal shapes) and record each layer's owner: the group's first layer in the
        model's order, so loading the file (which lists the modules in that order) finds the same owners."""
        groups = parse_options(cls, spec.options).shared
        order = {m: i for i, m in enumerate(infos)}
        owner: dict[str, str] = {}
        for g in groups:
            missing = [m for m in g if m not in order]
            if missing:
                raise AdapterError(f"option shared: module(s) {missing[:5]} are not targets of this adapter")
            check_same_shape(g, {m: shape_key(infos[m], spec.rank_for(m)) for m in g})
            first = min(g, key=order.__getitem__)
            owner.update({m: first for m in g})
        store.links[_links(adapter_name)] = {"owner": owner, "adapters": {}}

    @property
    def owner(self) -> LoRADrop | None:
        """The adapter whose tensors this layer shares (None: its own)."""
        return self._owner[0] if self._owner else None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        src = self._owner[0] if self._owner else self
        return src.lora_A, src.lora_B

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(down, up, scale) for the external formats: the shared tensors for every layer that uses them."""
        a, b = self.factors()
        return a, b, self.scaling

    @property
    def dtype(self) -> torch.dtype:
        return self.factors()[0].dtype

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", shares the adapter of '{self.owner.cfg.module_name}'" if self.owner is not None else "")


# --- the importance pass and the cut ---
def shape_key(info: LayerInfo, rank: int) -> tuple:
    """What must be equal for layers to share one (A, B): kind, (out, in, *kernel) and rank."""
    return (info.kind, *info.weight_shape, rank)


def _shape_words(key: tuple) -> str:
    kind, *shape, rank = key
    return f"{kind} {'x'.join(map(str, shape))} rank {rank}"


def check_same_shape(modules: list[str], keys: dict[str, tuple]) -> None:
    by_shape: dict[tuple, list[str]] = {}
    for m in modules:
        by_shape.setdefault(keys[m], []).append(m)
    if len(by_shape) > 1:
        listing = "; ".join(f"{_shape_words(k)}: {ms[:4]}{' ...' if len(ms) > 4 else ''}" for k, ms in by_shape.items())
        raise AdapterError(f"LoRA-drop: one shared adapter needs layers of one shape; the layers to share have "
                           f"{len(by_shape)} shapes ({listing}); expected equal shapes, or one shared adapter per "
                           "shape (strict=False: the trainers without --lora_drop_strict)")


def share_groups(dropped: Iterable[str], keys: dict[str, tuple], strict: bool = False) -> list[list[str]]:
    """The dropped layers grouped for sharing: one group per shape key (our extension), or with ``strict`` one
    group for all of them (the paper), refused if their shapes differ."""
    dropped = list(dropped)
    if not dropped:
        return []
    if strict:
        check_same_shape(dropped, keys)
        return [dropped]
    groups: dict[tuple, list[str]] = {}
    for m in dropped:
        groups.setdefault(keys[m], []).append(m)
    return list(groups.values())


def normalize(scores: dict[str, float]) -> dict[str, float]:
    """I_i = g_i / Σ g_j."""
    total = sum(scores.values())
    if not total > 0 or not math.isfinite(total):
        raise AdapterError(f"LoRA-drop: the summed LoRA output norm is {total}; expected > 0 (did the importance "
                           "stage train the first-stage LoRA for at least one step?)")
    return {m: g / total for m, g in scores.items()}


def cut(importance: dict[str, float], threshold: float = DEFAULT_THRESHOLD) -> list[str]:
    """The smallest set of layers whose importance sums to >= ``threshold``: a prefix of the layers sorted by
    importance, descending (ties: module order). Float sums are compared with a 1e-12 slack (T = 1 keeps every
    layer with non-zero importance, not one fewer because of rounding)."""
    threshold = check_threshold(threshold)
    ranked = sorted(importance, key=lambda m: -importance[m])  # stable: ties keep module order
    kept, total = [], 0.0
    for m in ranked:
        if total >= threshold - 1e-12:
            break
        kept.append(m)
        total += importance[m]
    return kept


@torch.no_grad()
def measure_importance(model: nn.Module, name: str, run: Callable[[], Any]) -> dict[str, float]:
    """g_i = Σ ‖ΔW_i x_i‖² of adapter ``name`` over every forward ``run()`` makes: a forward hook on each adapted
    layer adds the squared norm of that layer's adapter output (dropout off, the per-call context on)."""
    from ..inject.walker import adapted_layers

    sums: dict[str, torch.Tensor] = {}

    def hook(lname: str, layer: nn.Module) -> Callable[..., None]:
        ad = layer.adapters[name]

        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            d = ad.delta_forward(args[0].to(ad.dtype), layer._holder.current())
            s = d.double().pow(2).sum()
            sums[lname] = sums[lname] + s if lname in sums else s

        return fn

    handles = [layer.register_forward_hook(hook(n, layer)) for n, layer in adapted_layers(model) if name in layer.adapters]
    if not handles:
        raise AdapterError(f"LoRA-drop: no adapter named '{name}' to measure on {type(model).__name__}")
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    order = [n for n, layer in adapted_layers(model) if name in layer.adapters]
    return {n: float(sums[n]) if n in sums else 0.0 for n in order}


@dataclass
class DropPlan:
    """The result of the importance pass: what ``spec`` builds (kept layers alone, the rest in shared groups)."""

    threshold: float
    importance: dict[str, float]  # normalized, in module order
    kept: list[str]
    shared: list[list[str]]
    rank: int | None = None  # set by match_uniform: the rank of every adapter (None: the run's rank)

    def spec(self, base: AdapterSpec) -> AdapterSpec:
        """``base`` (a LoRA spec: rank, alpha, targets, seed) as the LoRA-drop spec of this plan (at the plan's rank,
        α/r kept, when it has one)."""
        import dataclasses

        options = {k: v for k, v in base.options.items() if k == "init"}
        options.update(shared=[list(g) for g in self.shared], threshold=self.threshold,
                       importance={m: round(v, 8) for m, v in self.importance.items()})
        sized = {} if self.rank is None else {
            "rank": self.rank, "alpha": None if base.alpha is None else base.alpha * self.rank / base.rank}
        return dataclasses.replace(base, variant="loradrop", options=options, **sized)

    def to_dict(self) -> dict[str, Any]:
        d = {"threshold": self.threshold, "importance": self.importance, "kept": self.kept, "shared": self.shared}
        return d if self.rank is None else {**d, "rank": self.rank}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DropPlan:
        rank = None if d.get("rank") is None else int(d["rank"])
        return cls(float(d["threshold"]), dict(d["importance"]), list(d["kept"]), [list(g) for g in d["shared"]], rank)

    def trainable_per_rank(self, sizes: dict[str, int]) -> int:
        """Σ (fan_in + out) over the adapters this plan trains (each kept layer, one per shared group)."""
        return sum(sizes[m] for m in self.kept) + sum(sizes[g[0]] for g in self.shared)

    def summary(self) -> str:
        n = len(self.importance)
        return (f"LoRA-drop: {len(self.kept)} of {n} layers keep their own LoRA (cumulative importance "
                f"{sum(self.importance[m] for m in self.kept):.3f} >= {self.threshold:g}); {n - len(self.kept)} share "
                f"{len(self.shared)} adapter(s)" + (f"; rank {self.rank}" if self.rank is not None else ""))


def plan(model: nn.Module, name: str, scores: dict[str, float], threshold: float = DEFAULT_THRESHOLD,
         strict: bool = False) -> DropPlan:
    """The cut and the sharing groups from raw scores g_i of adapter ``name`` (shapes and ranks read from the model)."""
    from ..inject.walker import adapted_layers

    threshold = check_threshold(threshold)
    importance = normalize(scores)
    keys = {n: shape_key(layer.info, layer.adapters[name].cfg.rank)
            for n, layer in adapted_layers(model) if name in layer.adapters}
    kept = cut(importance, threshold)
    dropped = [m for m in importance if m not in set(kept)]
    return DropPlan(threshold, importance, kept, share_groups(dropped, keys, strict))


def match_uniform(p: DropPlan, infos: dict[str, LayerInfo], rank: int, strict: bool = False) -> DropPlan:
    """``p`` at the trainable-parameter count of a uniform LoRA of ``rank`` on the same layers (our addition, for
    comparisons at equal size; the paper keeps the rank and saves parameters):

        target = rank · Σ_all (fan_in + out)          K' = |kept| .. N layers, by importance
        r'(K') = max(1, round(target / S(K')))        S(K') = Σ_kept' (fan_in + out) + Σ_groups (fan_in + out)

    keeps the K' (>= the cut's) most important layers and raises the rank to r' minimizing |r'·S − target|, ties to
    the fewest layers; exact whenever S divides the target (e.g. layers of one shape). The threshold becomes the
    importance the K' layers hold, so ``cut`` at it gives the same layers."""
    sizes = {m: info.fan_in + info.out_features for m, info in infos.items()}
    missing = [m for m in p.importance if m not in sizes]
    if missing or rank < 1:
        raise AdapterError(f"LoRA-drop match_uniform: expected rank >= 1 (found {rank}) and a LayerInfo for every "
                           f"layer of the plan; missing {missing[:4]}")
    keys = {m: shape_key(infos[m], rank) for m in p.importance}
    target = rank * sum(sizes[m] for m in p.importance)
    ranked = sorted(p.importance, key=lambda m: -p.importance[m])  # the order of ``cut``
    best: tuple[int, DropPlan] | None = None
    for k in range(len(p.kept), len(ranked) + 1):
        kept = set(ranked[:k])
        groups = share_groups([m for m in p.importance if m not in kept], keys, strict)
        q = DropPlan(p.threshold, p.importance, [m for m in ranked[:k]], groups)
        per_rank = q.trainable_per_rank(sizes)
        r = max(1, round(target / per_rank))
        err = abs(r * per_rank - target)
        if best is None or err < best[0]:
            held = min(1.0, sum(p.importance[m] for m in q.kept)) if q.kept else p.threshold
            best = (err, DropPlan(held if held > 0 else p.threshold, p.importance, q.kept, groups, r))
        if err == 0:
            break
    assert best is not None
    return best[1]
