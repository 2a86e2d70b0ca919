"""Inject adapters into a model, all or nothing, and walk the adapted layers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.context import ContextHolder
from ..core.errors import AdapterError
from ..core.layer import AdaptedLayer
from ..core.layerinfo import LayerInfo, get_base_weight, layer_info
from ..core.registry import get_variant, parse_options
from ..core.shared import SharedStore
from ..core.spec import AdapterSpec, ModuleConfig
from ..core.walk import walk_modules
from .targets import find_targets

log = logging.getLogger(__name__)
STATE_ATTR = "_lora_state"


class ModelState:
    """Per-model bookkeeping kept on the model root: the context holder and each adapter's spec."""

    def __init__(self) -> None:
        self.holder = ContextHolder()
        self.specs: dict[str, AdapterSpec] = {}
        self.modules: dict[str, list[str]] = {}


def model_state(model: nn.Module, create: bool = False) -> ModelState | None:
    st = model.__dict__.get(STATE_ATTR)
    if st is None and create:
        st = ModelState()
        model.__dict__[STATE_ATTR] = st
    return st


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """Every adapted layer by path; the adapters' own submodules are not walked (``walk_modules``)."""
    for name, m in walk_modules(model):
        if isinstance(m, AdaptedLayer):
            yield name, m


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def module_configs(spec: AdapterSpec, cls: type[Adapter], names: list[str], adapter_name: str) -> dict[str, ModuleConfig]:
    options = parse_options(cls, spec.options)
    out = {}
    for n in names:
        rank = spec.rank_for(n)
        alpha = spec.alpha_for(n)
        out[n] = ModuleConfig(n, rank, float(rank if alpha is None else alpha), spec.dropout, spec.rslora,
                              spec.seed, options, adapter_name)
    return out


def _adapter_dtype(w: torch.Tensor, follow_base: bool = False) -> torch.dtype:
    """fp32 adapters (fp64 on an fp64 base) for training; ``follow_base``: the base's own float dtype
    (fp16/bf16 inference loads write half the memory, as diffusers/PEFT do)."""
    if follow_base and w.is_floating_point():
        return w.dtype
    return torch.float64 if w.dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# Variants whose every tensor is a persistent parameter, so a loader that fills all of them may skip the init.
NO_INIT_OK = frozenset({"lora", "rslora", "loha", "lokr"})


def build_adapters(model: nn.Module, spec: AdapterSpec, name: str, targets: dict[str, nn.Module],
                   init: bool = True, follow_base_dtype: bool = False) -> dict[str, Adapter]:
    """Check every target, then build every adapter; raises before touching the model.

    ``init=False`` (file loaders that then copy every tensor): variants in ``NO_INIT_OK`` are built on the meta
    device and materialised uninitialised, skipping random init of memory that is overwritten anyway.
    """
    skip = not init and spec.variant in NO_INIT_OK
    cls = get_variant(spec.variant)
    infos: dict[str, LayerInfo] = {n: layer_info(_base(m), n) for n, m in targets.items()}
    cfgs = module_configs(spec, cls, list(targets), name)
    for n in targets:
        cls.check(infos[n], cfgs[n], loading=skip)
    store = SharedStore(_base(next(iter(targets.values()))).weight.device)  # no dequantizing just for a device
    cls.prepare_shared(store, name, infos, spec)
    built = {}
    for n, m in targets.items():
        w = get_base_weight(_base(m), infos[n])
        dtype = _adapter_dtype(w, follow_base_dtype)
        init_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32  # init math in fp32 at least
        with _default_dtype(init_dtype), (torch.device("meta") if skip else contextlib.nullcontext()):
            ad = cls(infos[n], cfgs[n], base_weight=w.detach(), shared=store)  # final dtype: init math matches forward
        built[n] = ad.to(dtype=dtype).to_empty(device=w.device) if skip else ad.to(device=w.device, dtype=dtype)
    if store._buffers:  # owned (and moved, and deleted) with the first layer's adapter
        next(iter(built.values())).add_module("shared", store)
    return built


def inject(model: nn.Module, spec: AdapterSpec, name: str = "default", scale: float = 1.0,
           module_names: list[str] | None = None, init: bool = True, follow_base_dtype: bool = False) -> list[str]:
    """Add adapter ``name`` to every target of ``spec`` (or exactly ``module_names``).

    ``init=False`` is for loaders that overwrite every adapter tensor next (see ``build_adapters``).
    """
    if not name or "." in name or "/" in name:
        raise AdapterError(f"adapter name {name!r}: expected a non-empty name without '.' or '/'")
    if name in adapter_names(model):
        raise AdapterError(f"adapter '{name}' already exists on {type(model).__name__}; remove it or pick another name")
    if module_names is None:
        targets = find_targets(model, spec)
    else:
        mods = dict(walk_modules(model))
        missing = [n for n in module_names if n not in mods]
        if missing:
            raise AdapterError(f"module(s) {missing[:5]} not found in {type(model).__name__} "
                               f"(expected all {len(module_names)} modules of the adapter)")
        targets = {n: mods[n] for n in module_names}
    resolved = get_variant(spec.variant).resolve_spec(model, spec, targets)  # the user's spec is what is stored
    built = build_adapters(model, resolved, name, targets, init, follow_base_dtype)
    state = model_state(model, create=True)
    for n, ad in built.items():
        _wrap(model, n, targets[n], state.holder).add(name, ad, scale)
    state.specs[name] = spec
    state.modules[name] = list(built)
    log.info("added adapter '%s' (%s, rank %d) to %d modules", name, spec.variant, spec.rank, len(built))
    return list(built)


def _wrap(model: nn.Module, name: str, module: nn.Module, holder: ContextHolder) -> AdaptedLayer:
    if isinstance(module, AdaptedLayer):
        return module
    layer = AdaptedLayer(module, layer_info(module, name), holder)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
    return layer


def _unwrap(model: nn.Module, name: str, layer: AdaptedLayer) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer.base_layer)


def _drop(layer: AdaptedLayer, name: str) -> None:
    del layer.adapters[name]
    layer.scales.pop(name, None)
    layer.active = [a for a in layer.active if a != name]
    layer._refresh()


def adapter_names(model: nn.Module) -> list[str]:
    st = model_state(model)
    names = dict.fromkeys(st.specs) if st else {}  # a dict: ordered, and O(1) membership for large libraries
    for _, layer in adapted_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def remove(model: nn.Module, names: list[str] | None = None, merge: bool = False) -> None:
    """Delete adapters (all by default); a layer left with none is replaced by its original module.

    merge=False restores the original weights exactly; merge=True folds the adapters in first.
    """
    all_names = adapter_names(model)
    names = all_names if names is None else names
    unknown = [n for n in names if n not in all_names]
    if unknown:
        raise AdapterError(f"no adapter named {unknown} on {type(model).__name__}; present: {all_names}")
    for lname, layer in list(adapted_layers(model)):
        here = [n for n in names if n in layer.adapters]
        if merge and here:
            keep_merged = [n for n in layer.merged if n not in here]
            layer.unmerge()
            layer.merge(here)  # permanent: forget the original weight
            layer.merged, layer._original = [], None
            for n in here:
                _drop(layer, n)
            layer.merge(keep_merged)
        for n in here:
            if n in layer.adapters:
                layer.delete(n)
        if not layer.adapters:
            _unwrap(model, lname, layer)
    st = model_state(model)
    for n in names:
        if st:
            st.specs.pop(n, None)
            st.modules.pop(n, None)
