"""The canonical adapter file: safetensors tensors ``[<component>.]<module>.<param>`` plus JSON metadata.

Metadata keys: ``format`` = "lora-diffusion", ``format_version``, ``library_version``,
``adapters`` = {component: {"spec": AdapterSpec, "modules": [...], "model_class": ...}} where
component is "" for a bare model, or "unet", "text_encoder", ... for a pipeline. Frozen tensors
that can be regenerated from the spec's seed (VeRA projections, T-LoRA init copies) are not stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..core.errors import AdapterFileError
from ..core.spec import AdapterSpec

FORMAT = "lora-diffusion"
FORMAT_VERSION = "1"
GROUP_SEP = "+"  # entry "<component>+<group>": a further variant group of the adapter (api.save_adapter)


@dataclass
class ComponentEntry:
    spec: AdapterSpec
    modules: list[str]
    model_class: str
    name: str


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("lora-diffusion")
    except Exception:
        return "0+unknown"


def is_canonical(meta: dict[str, str]) -> bool:
    return meta.get("format") == FORMAT


def encode_metadata(entries: dict[str, ComponentEntry], extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {k: str(v) for k, v in (extra or {}).items()}
    meta.update({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "adapters": json.dumps({c: {"spec": e.spec.to_dict(), "modules": e.modules,
                                    "model_class": e.model_class, "name": e.name} for c, e in entries.items()}),
    })
    return meta


def decode_metadata(meta: dict[str, str], path: str = "") -> dict[str, ComponentEntry]:
    if not is_canonical(meta):
        raise AdapterFileError(f"{path}: not a lora-diffusion canonical file (metadata 'format' is {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format_version {meta.get('format_version')!r}; expected {FORMAT_VERSION}")
    try:
        raw = json.loads(meta["adapters"])
        return {c: ComponentEntry(AdapterSpec.from_dict(e["spec"]), list(e["modules"]), e.get("model_class", ""),
                                  e.get("name", "default")) for c, e in raw.items()}
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: metadata 'adapters' is malformed ({e!r})") from None
    except ValueError as e:
        raise AdapterFileError(f"{path}: metadata 'adapters' has a bad spec: {e}") from None


def split_component(tensors: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """The tensors of one entry: ``<component>.`` keys; a bare model's own ("") are those of no group entry
    (``<GROUP_SEP><group>.`` keys)."""
    if not component:
        return {k: v for k, v in tensors.items() if GROUP_SEP not in k.split(".", 1)[0]}
    prefix = component + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
