"""The representation every external format converts into and out of.

A file becomes a :class:`Bundle`: per pipeline component ("unet", "text_encoder", "text_encoder_2",
or "" for a bare model), one or more :class:`Part` = (AdapterSpec, module list, tensors with OUR
parameter names ``<module>.<param>``). A format module reads module names and shapes from a
:data:`ModuleView` (never the model itself) to map names and check shapes.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.layer import AdaptedLayer
from ..core.layerinfo import LayerInfo, layer_info
from ..core.spec import AdapterSpec
from ..core.walk import walk_modules

log = logging.getLogger(__name__)

ModuleView = dict[str, LayerInfo]  # module path -> what an adapter sees of it (kind, weight shape)
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux", "flux2": "Flux.2",
                "dit": "a diffusion transformer (Flux or SD3)"}
DIT_FAMILIES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3", "Flux2Transformer2DModel": "flux2"}


@dataclass
class Part:
    """One adapter (one variant group) on one component."""

    component: str
    spec: AdapterSpec
    modules: list[str]
    tensors: dict[str, torch.Tensor]  # "<module>.<our param name>"
    origin: dict[str, str] = field(default_factory=dict)  # our key -> the file's key (for error messages)
    group: str = ""  # "" for the main group; a suffix for further variant groups of a mixed file
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # model-level tensors (PEFT VeRA's vera_A/vera_B)
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> a copy of its base weight (PEFT
    # writes lm_head/embed_tokens' base_layer.weight when they are targeted); checked equal to the model's, not applied


@dataclass
class Bundle:
    parts: list[Part]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "canonical"
    family: str | None = None  # "sd1" | "sd2" | "sdxl" | None (unknown / not a diffusion model)


def model_view(model: nn.Module) -> ModuleView:
    """Every adaptable module (Linear, Conv2d, GPT-2 Conv1D) of ``model`` by path; adapted layers count as their base."""
    out: ModuleView = {}
    for name, m in walk_modules(model, into_base=False):  # an adapted layer stands for its base
        if ".base_layer" in f".{name}" or ".adapters." in f".{name}.":
            continue
        base = m.base_layer if isinstance(m, AdaptedLayer) else m
        if isinstance(base, (nn.Linear, nn.Conv2d)) or type(base).__name__ == "Conv1D":
            try:
                out[name] = layer_info(base, name)
            except Exception:  # grouped convs etc.: not adaptable, so no file can target them
                continue
    return out


def model_family(model: Any) -> str | None:
    """"sd1" / "sd2" / "sdxl" from a UNet's (or a pipeline's UNet's) config, "flux" / "sd3" from a diffusion
    transformer's class; None when unknown."""
    comps = getattr(model, "components", None)
    if isinstance(comps, dict) and isinstance(comps.get("unet"), nn.Module):
        model = comps["unet"]
    elif isinstance(comps, dict) and isinstance(comps.get("transformer"), nn.Module):
        model = comps["transformer"]
    if type(model).__name__ in DIT_FAMILIES:
        return DIT_FAMILIES[type(model).__name__]
    cfg = getattr(model, "config", None)
    if cfg is None or "UNet" not in type(model).__name__:
        return None
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(getattr(cfg, "cross_attention_dim", None))


def component_role(model: nn.Module) -> str:
    """The pipeline component a bare model plays, to pick its part of a multi-component file."""
    cls = type(model).__name__
    if "UNet" in cls:
        return "unet"
    if cls in DIT_FAMILIES:
        return "transformer"
    if cls == "CLIPTextModelWithProjection":
        return "text_encoder_2"
    if cls.startswith("CLIPText"):
        return "text_encoder"
    return ""


def most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def spec_from_modules(variant: str, ranks: dict[str, int], alphas: dict[str, float | None],
                      options: dict[str, Any] | None = None, **kw: Any) -> AdapterSpec:
    """An AdapterSpec reproducing per-module ranks and alphas: the most common value plus exact-name exceptions.

    ``alphas[m]`` None means "alpha = rank" (scale 1), as a kohya module without an ``.alpha`` key.
    """
    rank = most_common(list(ranks.values()))
    eff = {m: float(ranks[m] if a is None else a) for m, a in alphas.items()}
    alpha: float | None = None if all(eff[m] == ranks[m] for m in eff) else most_common(list(eff.values()))
    rank_pattern = {m: r for m, r in ranks.items() if r != rank}
    alpha_pattern = {m: a for m, a in eff.items() if a != (ranks[m] if alpha is None else alpha)}
    return AdapterSpec(variant=variant, rank=rank, alpha=alpha, targets=sorted(ranks), rank_pattern=rank_pattern,
                       alpha_pattern=alpha_pattern, options=dict(options or {}), **kw)


def module_alpha(spec: AdapterSpec, module: str) -> float:
    a = spec.alpha_for(module)
    return float(spec.rank_for(module) if a is None else a)


TEXT_MODEL = "text_model."  # transformers < 5 nests CLIP text modules under text_model; files from then keep it


def find_module(path: str, view: ModuleView) -> str | None:
    """``path`` in ``view``, allowing for the ``text_model.`` level transformers 5 dropped from CLIP."""
    for p in (path, path.removeprefix(TEXT_MODEL), TEXT_MODEL + path):
        if p in view:
            return p
    return None
