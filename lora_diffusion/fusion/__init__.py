"""Fusing several adapters at inference: one interface, one file per method.

    >>> f = fuse(pipe, ["ring", "dotted"], method="gated", roles={"ring": "subject", "dotted": "style"})
    >>> f.record(); images = pipe(prompt).images; stats = f.stats()      # gate strength per layer and step
    >>> f.remove()                                                         # back to the plain sum

| method | formula | trained |
|---|---|---|
| ``static`` | y = y0 + Σ w_i y_i (diffusers ``set_adapters``); ``fuse=True`` folds it into W | no |
| ``gated`` | AutoLoRA gate g_i(y0, y_i, t) per layer and channel; y = y0 + Σ w_out g_i y_i | gates only |
| ``klora`` | K-LoRA: per layer and step y_c or y_s by top-k \\|ΔW\\| sums and s(t) | no |
| ``scheduled`` | subject weight falls and style weight rises with sampling progress | no |
| ``lag`` | LAG: per token and layer, Arrow top-k then SpectR picks ONE adapter (routed before computing) | no |
| ``xlora`` | X-LoRA: classifier on the base pass's hidden states, λ per token and layer (LLMs) | classifier |
| ``mole`` | MoLE: softmax gate per block over the normalised expert outputs, balancing loss, masking | gates only |

A method is a :class:`FusionMethod` registered in ``FUSION_METHODS`` (``register_fusion``); it installs a
:class:`Combiner` per adapted layer through ``AdaptedLayer.set_combiner``, so MoLE/X-LoRA-style mixtures can
be added the same way. Weights ``w_i`` are the adapters' scales (``set_adapters``); every method scales y_i by them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..api import components, list_adapters, set_adapters
from ..core.errors import AdapterError
from ..inject.walker import adapted_layers
from ..io.bundle import component_role
from .base import ROLES, Combiner, Fusion, FusionMethod, GateStats
from .gated import GatedFusion, load_gates, save_gates
from .klora import KLoRAFusion
from .lag import LAGFusion
from .mixture import load_mixture_weights, save_mixture
from .mole import MoleFusion
from .scheduled import ScheduledFusion
from .static import StaticFusion
from .xlora import XLoraFusion

log = logging.getLogger(__name__)
FUSION_ATTR = "_lora_fusion"
FUSION_METHODS: dict[str, type[FusionMethod]] = {}


def register_fusion(cls: type[FusionMethod]) -> type[FusionMethod]:
    FUSION_METHODS[cls.name] = cls
    return cls


for _cls in (StaticFusion, GatedFusion, KLoRAFusion, ScheduledFusion, LAGFusion, XLoraFusion, MoleFusion):
    register_fusion(_cls)


def fusion_names() -> list[str]:
    return list(FUSION_METHODS)


def layer_map(model_or_pipeline: Any) -> dict[str, Any]:
    """``<component>.<layer path>`` -> AdaptedLayer over every component (a bare model is named by its role)."""
    out = {}
    for comp, model in components(model_or_pipeline).items():
        role = comp or component_role(model) or "model"
        out.update({f"{role}.{name}": layer for name, layer in adapted_layers(model)})
    return out


def default_roles(names: Sequence[str], roles: dict[str, str] | None) -> dict[str, str]:
    """Explicit roles win; otherwise the first adapter is the subject and the others are styles."""
    out = {n: (roles or {}).get(n, "subject" if i == 0 and not roles else "style" if not roles else "other")
           for i, n in enumerate(names)}
    bad = {n: r for n, r in out.items() if r not in ROLES}
    if bad:
        raise AdapterError(f"unknown role(s) {bad}; expected one of {ROLES}")
    return out


def unfuse(model_or_pipeline: Any) -> None:
    """Remove the fusion installed by ``fuse`` (if any)."""
    for model in components(model_or_pipeline).values():
        f = model.__dict__.pop(FUSION_ATTR, None)
        if f is not None:
            f.remove()


def fuse(model_or_pipeline: Any, names: Sequence[str], method: str = "static",
         weights: Sequence[float] | dict[str, float] | None = None, roles: dict[str, str] | None = None,
         **options: Any) -> Fusion:
    """Activate exactly ``names`` at ``weights`` (default 1) and combine them with ``method``; replaces an
    earlier fusion. Returns the handle (gate statistics, gate parameters, ``remove()``)."""
    if method not in FUSION_METHODS:
        raise AdapterError(f"unknown fusion method '{method}'; registered: {fusion_names()}")
    names = list(names)
    fm = FUSION_METHODS[method](**options)
    unknown = [n for n in names if n not in list_adapters(model_or_pipeline)]
    if unknown:
        raise AdapterError(f"no adapter named {unknown}; present: {list_adapters(model_or_pipeline)}")
    fm.check(layer_map(model_or_pipeline), names)  # before anything changes
    unfuse(model_or_pipeline)
    set_adapters(model_or_pipeline, names, weights if weights is not None else [1.0] * len(names))
    fusion = fm.install(layer_map(model_or_pipeline), names, default_roles(names, roles))
    try:
        fm.attach(fusion, components(model_or_pipeline))
    except BaseException:
        fusion.remove()
        raise
    for model in components(model_or_pipeline).values():
        model.__dict__[FUSION_ATTR] = fusion
    shown = names if len(names) <= 8 else [*names[:8], f"... ({len(names)} in all)"]
    log.info("fusion '%s' of %s on %d layers", method, shown, len(fusion.layers))
    return fusion


__all__ = ["FUSION_METHODS", "ROLES", "Combiner", "Fusion", "FusionMethod", "GateStats", "default_roles", "fuse",
           "fusion_names", "layer_map", "load_gates", "load_mixture_weights", "register_fusion", "save_gates",
           "save_mixture", "unfuse"]
