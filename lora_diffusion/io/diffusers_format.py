"""diffusers LoRA files (``pytorch_lora_weights.safetensors``): ``unet.`` / ``text_encoder.`` / ``text_encoder_2.``
prefixes, PEFT parameter names (``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``), and the LoraConfig
per component as JSON in the metadata key ``lora_adapter_metadata`` (keys ``<component>.<field>``, diffusers >= 0.34).
Without it, alpha = rank (scale 1), as diffusers does. A file without component prefixes targets a bare model.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..core.errors import AdapterFileError
from .bundle import Bundle, ModuleView, Part
from .peft_format import bake_scale, lora_config, parts_from_state_dict, state_dict_from_part

META_KEY = "lora_adapter_metadata"
ROLES = ("text_encoder_3", "text_encoder_2", "text_encoder", "unet", "transformer")
CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                 "lora_dropout", "bias", "init_lora_weights")


def _configs(meta: dict[str, str], src: str) -> dict[str, dict[str, Any]]:
    if META_KEY not in meta:
        return {}
    try:
        flat = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{src}: metadata '{META_KEY}' is not valid JSON ({e})") from None
    out: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        role, _, field = k.partition(".")
        if role in ROLES and field:
            out.setdefault(role, {})[field] = v
        else:
            out.setdefault("", {})[k] = v
    return out


def read(tensors: dict[str, torch.Tensor], meta: dict[str, str], views: dict[str, ModuleView], src: str) -> Bundle:
    configs = _configs(meta, src)
    by_role: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        role = next((r for r in ROLES if key.startswith(r + ".")), "")
        by_role.setdefault(role, {})[key[len(role) + 1:] if role else key] = t
    parts = []
    for role, sd in by_role.items():
        target = role if role in views else (next(iter(views)) if role == "" and len(views) == 1 else None)
        if target is None:
            raise AdapterFileError(f"{src}: keys '{role}.*' adapt component '{role}'; the target has {sorted(views)}")
        parts.append(parts_from_state_dict(sd, configs.get(role) or configs.get(""), target, views[target], src,
                                           f"{role}." if role else ""))
    return Bundle(parts, dict(meta), "diffusers")


def write(parts: list[Part], views: dict[str, ModuleView]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    for part in parts:
        if part.spec.variant in ("vera", "loha", "lokr"):
            raise AdapterFileError(f"variant '{part.spec.variant}': diffusers LoRA files have no {part.spec.variant} form "
                                   "(diffusers reads LoRA only); expected lora, rslora or dora; use format='peft' or 'kohya'")
        part = bake_scale(part)  # alpha = rank: the same ΔW with and without lora_adapter_metadata
        prefix = f"{part.component}." if part.component else ""
        tensors.update({prefix + k: v for k, v in state_dict_from_part(part).items()})
        cfg = lora_config(part, views.get(part.component))
        config.update({prefix + k: v for k, v in cfg.items() if k in CONFIG_FIELDS})
    return tensors, {"format": "pt", META_KEY: json.dumps(config, indent=2, sort_keys=True)}
