"""Files of cloneofsimo/lora (``lora_diffusion``, late 2022), the first Stable Diffusion LoRA library.

``save_safeloras_with_embeds`` writes ``<component>:<i>:up`` / ``<component>:<i>:down`` per adapted layer, where i
counts layers in that library's traversal (``_find_modules_v2``): every module of the component in ``modules()``
order whose class name is in the target set (metadata ``<component>`` = JSON list, e.g. ``["CrossAttention",
"Attention", "GEGLU"]``; ``ResnetBlock2D`` with the extended set; text encoder ``["CLIPAttention"]``), then inside it
every Linear (and, for ResnetBlock2D, Conv2d) in ``named_modules()`` order. Ranks are in ``<component>:<i>:rank``.
ΔW = up·down, scale 1 (the library's ``tune_lora_scale`` is a user knob, 1 by default). Pivotal-tuning tokens
(``<s1>``, ``<s2>``, …) are tensors of shape (width,) whose metadata value is ``"<embed>"``.

The module order is recomputed on the target model by the same rule; layers are then checked by shape, so a file
for another model or another target set fails with the index, key and expected shapes.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import torch
from torch import nn

from ..core.errors import AdapterFileError
from ..core.layerinfo import layer_info
from ..core.walk import walk_modules
from .bundle import Bundle, Part, spec_from_modules

log = logging.getLogger(__name__)
EMBED_FLAG = "<embed>"
KEY = re.compile(r"(?P<comp>[A-Za-z_0-9]+):(?P<i>\d+):(?P<dir>up|down)")
ALIASES = {"CrossAttention": {"CrossAttention", "Attention"}, "Attention": {"Attention", "CrossAttention"},
           "CLIPAttention": {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"}}
FORMAT = "cloneofsimo lora"


def is_cloneofsimo(keys: list[str], meta: dict[str, str]) -> bool:
    lora = [k for k in keys if KEY.fullmatch(k)]
    return bool(lora) and all(KEY.fullmatch(k) or meta.get(k) == EMBED_FLAG for k in keys)


def split_embeds(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[dict[str, torch.Tensor],
                                                                                     dict[str, torch.Tensor]]:
    """(the LoRA tensors, {token: (n, width)} of the ``"<embed>"`` entries)."""
    rest, embeds = {}, {}
    for k, v in tensors.items():
        if meta.get(k) == EMBED_FLAG:
            embeds[k] = v[None] if v.dim() == 1 else v
        else:
            rest[k] = v
    return rest, embeds


def traversal(model: nn.Module, targets: list[str]) -> list[str]:
    """Module paths in the order cloneofsimo/lora numbers them (its ``_find_modules_v2``)."""
    names = set().union(*(ALIASES.get(t, {t}) for t in targets)) if targets else set()
    convs = "ResnetBlock2D" in targets
    out = []
    for anc_name, anc in walk_modules(model):
        if type(anc).__name__ not in names:
            continue
        for sub, m in walk_modules(anc, into_base=False):
            base = getattr(m, "base_layer", m)
            if sub and (isinstance(base, nn.Linear) or (convs and isinstance(base, nn.Conv2d))) and ".base_layer" not in sub \
                    and ".adapters." not in f".{sub}.":
                out.append(f"{anc_name}.{sub}" if anc_name else sub)
    return out


def read(tensors: dict[str, torch.Tensor], meta: dict[str, str], models: dict[str, nn.Module], src: str,
         bare: bool = False) -> Bundle:
    by_comp: dict[str, dict[int, dict[str, tuple[str, torch.Tensor]]]] = {}
    for key, t in tensors.items():
        m = KEY.fullmatch(key)
        if m is None:
            raise AdapterFileError(f"{src}: key '{key}': not a {FORMAT} key; expected '<component>:<i>:up' / ':down' or a "
                                   f"token whose metadata is '{EMBED_FLAG}'")
        by_comp.setdefault(m["comp"], {}).setdefault(int(m["i"]), {})[m["dir"]] = (key, t)
    parts = []
    for comp, layers in by_comp.items():
        role = comp if comp in models else (next(iter(models)) if len(models) == 1 and not next(iter(models)) else None)
        if role is None and bare:
            log.warning("%s: skipped the %d layers for component '%s' (the target is a bare %s)", src, len(layers), comp,
                        sorted(models))
            continue
        if role is None:
            raise AdapterFileError(f"{src}: keys '{comp}:*' ({FORMAT}) adapt component '{comp}'; the target has "
                                   f"{sorted(models)}")
        parts.append(_part(comp, role, layers, meta, models[role], src))
    if not parts:
        raise AdapterFileError(f"{src}: no component of the file ({sorted(by_comp)}) is in the model ({sorted(models)})")
    return Bundle(parts, dict(meta), FORMAT)


def _targets(comp: str, meta: dict[str, str], src: str) -> list[str]:
    try:
        targets = json.loads(meta[comp])
        assert isinstance(targets, list)
        return [str(t) for t in targets]
    except (KeyError, json.JSONDecodeError, AssertionError):
        raise AdapterFileError(f"{src}: metadata '{comp}' ({FORMAT}) is {meta.get(comp)!r}; expected the JSON list of "
                               "module classes the layers were found under (e.g. [\"CrossAttention\", \"GEGLU\"])") from None


def _part(comp: str, role: str, layers: dict[int, dict[str, tuple[str, Any]]], meta: dict[str, str], model: nn.Module,
          src: str) -> Part:
    order = traversal(model, _targets(comp, meta, src))
    if sorted(layers) != list(range(len(layers))) or len(layers) != len(order):
        raise AdapterFileError(f"{src}: keys '{comp}:0..{max(layers)}' ({FORMAT}): {len(layers)} layers, the model has "
                               f"{len(order)} under {_targets(comp, meta, src)}; expected one per layer in that order")
    ranks, tensors, origin = {}, {}, {}
    mods = dict(walk_modules(model))
    for i, path in enumerate(order):
        pair = layers[i]
        for d in ("up", "down"):
            if d not in pair:
                raise AdapterFileError(f"{src}: key '{comp}:{i}:{d}' ({FORMAT}) is missing; expected up and down per layer")
        (kd, down), (ku, up) = pair["down"], pair["up"]
        info = layer_info(getattr(mods[path], "base_layer", mods[path]), path)
        r = down.shape[0]
        want = {"down": (r, info.in_features, *info.kernel_size), "up": (info.out_features, r, *((1,) * info.ndim_kernel))}
        for d, key, t in (("down", kd, down), ("up", ku, up)):
            if tuple(t.shape) != want[d] and t.numel() != torch.Size(want[d]).numel():
                raise AdapterFileError(f"{src}: key '{key}' ({FORMAT}): shape {tuple(t.shape)} does not fit layer {i} of "
                                       f"the traversal, '{path}' {info.weight_shape}; expected {want[d]}")
        ranks[path] = r
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = down.reshape(want["down"]), up.reshape(want["up"])
        origin[f"{path}.lora_A"], origin[f"{path}.lora_B"] = kd, ku
    return Part(role, spec_from_modules("lora", ranks, dict.fromkeys(ranks)), order, tensors, origin)
