"""diffusers LoRA files from before the PEFT backend (diffusers < 0.21), renamed to the current diffusers layout.

Two eras, both scale 1 (no alpha was stored), ΔW = up·down:

- 0.15–0.20 (``LoRACompatibleLinear``/``Conv`` and the patched text encoder, the ``pytorch_lora_weights`` of the 2023
  DreamBooth-LoRA tutorials): ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``,
  ``text_encoder.<module>.lora_linear_layer.down.weight`` / ``.up.weight``.
- <= 0.14 (attention processors): ``[unet.]<block>.attn1.processor.to_q_lora.down.weight`` (``to_k``, ``to_v``,
  ``to_out`` -> ``to_out.0``), text encoder ``text_encoder.<layer>.self_attn.to_q_lora.down.weight`` (-> ``q_proj``).
  diffusers 0.42 loads nothing from these files (no error); here they load.

Each key is renamed to ``<component>.<module>.lora_A.weight`` / ``lora_B.weight`` and read as a diffusers file;
errors name the file's own key.
"""

from __future__ import annotations

import re

import torch

from ..core.errors import AdapterFileError
from . import diffusers_format
from .bundle import Bundle, ModuleView

_DIR = {"down": "lora_A", "up": "lora_B"}
_PROC = re.compile(r"(?P<mod>.*?)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<d>down|up)\.weight")
_TE_OLD = re.compile(r"(?P<mod>.*?)\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<d>down|up)\.weight")
_COMPAT = re.compile(r"(?P<mod>.*?)\.(?:lora|lora_linear_layer)\.(?P<d>down|up)\.weight")
_UNET_OUT = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_OUT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
ERA_014, ERA_020 = "diffusers <= 0.14 attention-processor", "diffusers 0.15-0.20"


def new_key(key: str) -> tuple[str, str] | None:
    """(current diffusers key, era) for an old key; None if it is not one."""
    m = _PROC.fullmatch(key)
    if m:
        mod = m["mod"] if m["mod"].startswith(diffusers_format.ROLES) else f"unet.{m['mod']}"
        return f"{mod}.{_UNET_OUT[m['p']]}.{_DIR[m['d']]}.weight", ERA_014
    m = _TE_OLD.fullmatch(key)
    if m and m["mod"].startswith("text_encoder"):
        return f"{m['mod']}.{_TE_OUT[m['p']]}.{_DIR[m['d']]}.weight", ERA_014
    m = _COMPAT.fullmatch(key)
    if m:
        return f"{m['mod']}.{_DIR[m['d']]}.weight", ERA_020
    return None


def read(tensors: dict[str, torch.Tensor], meta: dict[str, str], views: dict[str, ModuleView], src: str) -> Bundle:
    renamed, back, eras = {}, {}, set()
    for key, t in tensors.items():
        nk = new_key(key)
        if nk is None:
            raise AdapterFileError(f"{src}: key '{key}': not a key of the old diffusers LoRA format (recognized from the "
                                   "other keys); expected '<module>.lora.down.weight' / '.lora.up.weight', "
                                   "'.lora_linear_layer.down.weight' or '.processor.to_q_lora.down.weight'")
        renamed[nk[0]] = t
        back[nk[0]] = key
        eras.add(nk[1])
    era = " + ".join(sorted(eras))
    try:
        bundle = diffusers_format.read(renamed, {k: v for k, v in meta.items() if k != diffusers_format.META_KEY},
                                       views, src)
    except AdapterFileError as e:  # name the file's own key, and the format
        msg = str(e)
        for new, old in back.items():
            msg = msg.replace(f"'{new}'", f"'{old}'")
        raise AdapterFileError(f"{msg} [format: {era}]") from None
    for part in bundle.parts:
        part.origin = {k: back.get(v, v) for k, v in part.origin.items()}
    bundle.format = era
    return bundle
