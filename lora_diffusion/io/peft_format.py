"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<path>.*``).

LoRA (with rsLoRA, ``rank_pattern``/``alpha_pattern``), DoRA (``lora_magnitude_vector`` -> ``magnitude``) and
VeRA (``vera_lambda_b``/``_d``; the shared ``base_model.vera_A``/``vera_B`` are checked against the projections
regenerated from ``projection_prng_key``, which is our spec seed). A pipeline is saved as one folder per
component. The state-dict half (``parts_from_state_dict``/``state_dict_from_part``) is shared with diffusers files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from ..core.errors import AdapterFileError
from .bundle import Bundle, ModuleView, Part, find_module, module_alpha, most_common, spec_from_modules
from .files import read_safetensors, write_safetensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
SUFFIXES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude",
            "lora_magnitude_vector.weight": "magnitude", "vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}
SHARED = ("vera_A", "vera_B")


def split_key(key: str) -> tuple[str, str] | None:
    for s, ours in SUFFIXES.items():
        if key.endswith("." + s):
            return key[: -len(s) - 1], ours
    return None


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule (``get_pattern_key``): the first pattern p with ``(.*\\.)?(p)$`` matching the module name."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return v
    return default


def _check(src: str, key: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) == shape:
        return t
    if t.numel() == math.prod(shape) and [d for d in t.shape if d != 1] == [d for d in shape if d != 1]:
        return t.reshape(shape)
    raise AdapterFileError(f"{src}: key '{key}': shape {tuple(t.shape)} does not fit the model; expected {shape}")


def _expected(name: str, info: Any, r: int) -> tuple[int, ...]:
    k1 = (1,) * info.ndim_kernel
    return {"lora_A": (r, info.in_features, *info.kernel_size), "lora_B": (info.out_features, r, *k1),
            "magnitude": (info.out_features,), "vera_lambda_b": (info.out_features,), "vera_lambda_d": (r,)}[name]


BASE_COPY = ".base_layer.weight"


def parts_from_state_dict(sd: dict[str, torch.Tensor], config: dict[str, Any] | None, role: str, view: ModuleView,
                          src: str, key_prefix: str = "") -> Part:
    """{<path>.<PEFT param>: tensor} + a PEFT/LoraConfig dict -> one Part on ``view``'s modules."""
    sd = dict(sd)
    copies = {k[: -len(BASE_COPY)]: sd.pop(k) for k in list(sd) if k.endswith(BASE_COPY)}
    part = _part(sd, config, role, view, src, key_prefix)
    for path, t in copies.items():
        mod = find_module(path, view) or path
        if mod not in part.modules:
            raise AdapterFileError(f"{src}: key '{key_prefix}{path}{BASE_COPY}': a base-weight copy for a module the "
                                   "adapter does not target; expected copies only of targeted modules")
        part.base_copies[mod] = t
        part.origin[f"{mod}{BASE_COPY}"] = f"{key_prefix}{path}{BASE_COPY}"
    return part


def _part(sd: dict[str, torch.Tensor], config: dict[str, Any] | None, role: str, view: ModuleView,
          src: str, key_prefix: str = "") -> Part:
    cfg = config or {}
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type in LYCORIS_TYPES:
        return _lycoris_part(sd, cfg, peft_type, role, view, src, key_prefix)
    if peft_type not in ("LORA", "VERA"):
        raise AdapterFileError(f"{src}: peft_type {peft_type!r} is not supported here; expected LORA (incl. DoRA), VERA, "
                               "LOHA or LOKR")
    dora = bool(cfg.get("use_dora")) or any(split_key(k) and split_key(k)[1] == "magnitude" for k in sd)  # type: ignore[index]
    by_mod: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in sd.items():
        sk = split_key(key)
        if sk is None:
            raise AdapterFileError(f"{src}: key '{key_prefix}{key}': unknown parameter; expected one of "
                                   f"{sorted('<module>.' + s for s in SUFFIXES)}")
        path, ours = sk
        path = find_module(path, view) or path
        if path not in view:
            raise AdapterFileError(f"{src}: key '{key_prefix}{key}': module '{path}' is not in the model "
                                   f"({role or 'model'}); expected one of its Linear/Conv2d module paths")
        by_mod.setdefault(path, {})[ours] = (f"{key_prefix}{key}", t)
    ranks, alphas, tensors, origin = {}, {}, {}, {}
    for path, ps in by_mod.items():
        info = view[path]
        r_src = ps.get("lora_A") or ps.get("vera_lambda_d")
        r = int(cfg.get("r", 8)) if peft_type == "VERA" else (r_src[1].shape[0] if r_src else 0)
        need = ("vera_lambda_b", "vera_lambda_d") if peft_type == "VERA" else \
            ("lora_A", "lora_B") + (("magnitude",) if dora else ())
        for n in need:
            if n not in ps:
                raise AdapterFileError(f"{src}: module '{path}' lacks its '{n}' tensor; expected {list(need)}")
        ranks[path] = r
        alphas[path] = None if config is None or peft_type == "VERA" else float(
            pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", r)))
        for n, (key, t) in ps.items():
            ours = f"inner.{n}" if dora and n != "magnitude" else n
            tensors[f"{path}.{ours}"] = _check(src, key, t, _expected(n, info, r))
            origin[f"{path}.{ours}"] = key
    if peft_type == "VERA":
        spec = spec_from_modules("vera", ranks, {m: None for m in ranks}, {"d_initial": float(cfg.get("d_initial", 0.1))},
                                 seed=int(cfg.get("projection_prng_key", 0)))
    else:
        spec = spec_from_modules("dora" if dora else "lora", ranks, alphas, {"inner": "lora"} if dora else {},
                                 rslora=bool(cfg.get("use_rslora")))
    return Part(role, spec, list(by_mod), tensors, origin)


# PEFT's LoHa / LoKr tensors have LyCORIS' names and layouts, which are ours (variants/loha.py, variants/lokr.py).
LYCORIS_TYPES = {"LOHA": ("loha", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")),
                 "LOKR": ("lokr", ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"))}


def _lycoris_options(variant: str, cfg: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {"use_tucker": bool(cfg.get("use_effective_conv2d", False))}
    if variant == "lokr":
        opts |= {"decompose_both": bool(cfg.get("decompose_both", False)), "factor": int(cfg.get("decompose_factor", -1))}
    return opts


def _lycoris_part(sd: dict[str, torch.Tensor], cfg: dict[str, Any], peft_type: str, role: str, view: ModuleView,
                  src: str, key_prefix: str) -> Part:
    """A PEFT LoHa/LoKr state dict: ranks and alphas from the config (PEFT's scale is alpha/r, for LoKr too: where
    both Kronecker factors are full, LyCORIS' and our scale is 1, so PEFT's alpha/r is folded into lokr_w2, exact)."""
    variant, names = LYCORIS_TYPES[peft_type]
    by_mod: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in sd.items():
        path, _, name = key.rpartition(".")
        if name not in names:
            raise AdapterFileError(f"{src}: key '{key_prefix}{key}': unknown parameter for peft_type {peft_type}; "
                                   f"expected one of {sorted('<module>.' + n for n in names)}")
        path = find_module(path, view) or path
        if path not in view:
            raise AdapterFileError(f"{src}: key '{key_prefix}{key}': module '{path}' is not in the model "
                                   f"({role or 'model'}); expected one of its Linear/Conv2d module paths")
        by_mod.setdefault(path, {})[name] = (f"{key_prefix}{key}", t)
    ranks, alphas, tensors, origin = {}, {}, {}, {}
    for path, ps in by_mod.items():
        r = int(pattern_value(cfg.get("rank_pattern") or {}, path, cfg.get("r", 8)))
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("alpha", r)))
        both_full = {"lokr_w1", "lokr_w2"} <= set(ps)
        ranks[path], alphas[path] = r, None if both_full else alpha
        for n, (key, t) in ps.items():
            tensors[f"{path}.{n}"] = t * (alpha / r) if both_full and n == "lokr_w2" else t
            origin[f"{path}.{n}"] = key
    spec = spec_from_modules(variant, ranks, alphas, _lycoris_options(variant, cfg))
    return Part(role, spec, list(by_mod), tensors, origin)


def _lycoris_config(part: Part, views: ModuleView | None) -> dict[str, Any]:
    """LoHaConfig / LoKrConfig fields reproducing the part (PEFT LoKr scales alpha/r even with both factors full)."""
    spec, mods = part.spec, sorted(part.modules)
    o = spec.options
    conv1d = [m for m in mods if views and m in views and views[m].transposed]
    if conv1d:
        raise AdapterFileError(f"module '{conv1d[0]}': PEFT's {spec.variant} has no form for GPT-2 Conv1D layers "
                               "(PEFT supports Linear, Conv1d and Conv2d there); use the kohya or canonical format")
    bad = {k: v for k, v in o.items() if k in ("full_matrix", "unbalanced_factorization", "shape") and v} | (
        {"rslora": True} if spec.rslora else {})
    if bad:
        raise AdapterFileError(f"variant '{spec.variant}' with {bad} has no PEFT form (PEFT's LoKr has no such option); "
                               "expected the default LyCORIS options; use the kohya or canonical format")
    ranks = {m: spec.rank_for(m) for m in mods}
    alphas = {}
    for m in mods:
        names = {k.rpartition(".")[2] for k in part.tensors if k.startswith(m + ".")}
        alphas[m] = float(ranks[m]) if {"lokr_w1", "lokr_w2"} <= names else module_alpha(spec, m)
    r, a = most_common(list(ranks.values())), most_common(list(alphas.values()))
    cfg = {"peft_type": "LOHA" if spec.variant == "loha" else "LOKR", "r": r, "alpha": a, "target_modules": mods,
           "rank_pattern": {f"^{m}": v for m, v in ranks.items() if v != r},
           "alpha_pattern": {f"^{m}": v for m, v in alphas.items() if v != a},
           "use_effective_conv2d": bool(o.get("use_tucker", False)), "rank_dropout": 0.0, "module_dropout": 0.0,
           "init_weights": True}
    if spec.variant == "lokr":
        cfg |= {"decompose_both": bool(o.get("decompose_both", False)), "decompose_factor": int(o.get("factor", -1))}
    return cfg


OURS_TO_PEFT = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector",
                "vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}


def state_dict_from_part(part: Part) -> dict[str, torch.Tensor]:
    if part.spec.variant in ("loha", "lokr"):
        return dict(part.tensors)  # LyCORIS names = PEFT's
    if part.spec.variant not in ("lora", "rslora", "dora", "vera") or (
            part.spec.variant == "dora" and part.spec.options.get("inner", "lora") != "lora"):
        raise AdapterFileError(f"variant '{part.spec.variant}' ({part.spec.options}) has no PEFT/diffusers LoRA form; "
                               "expected lora, rslora, dora (inner lora), vera, loha or lokr; use the kohya or canonical format")
    out = {}
    for k, v in part.tensors.items():
        path, _, name = k.rpartition(".")
        path = path.removesuffix(".inner")
        if name == "magnitude" and part.tensors[f"{path}.inner.lora_A"].dim() == 4:
            v = v.reshape(1, -1, 1, 1)  # PEFT's conv DoRA keeps the per-output norm as (1, out, 1, 1)
        out[f"{path}.{OURS_TO_PEFT[name]}"] = v
    return out


def lora_scales(part: Part) -> dict[str, float] | None:
    """Per-module scale s (alpha/r, alpha/√r for rsLoRA) of a LoRA / rsLoRA / DoRA-over-LoRA part; None otherwise."""
    spec = part.spec
    inner = spec.options.get("inner", "lora") if spec.variant == "dora" else spec.variant
    if inner not in ("lora", "rslora"):
        return None
    rs = spec.rslora or inner == "rslora"
    return {m: module_alpha(spec, m) / (math.sqrt(spec.rank_for(m)) if rs else spec.rank_for(m)) for m in part.modules}


def bake_scale(part: Part, alpha: float | None = None) -> Part:
    """The same adapter with one ``alpha`` for every module (None: alpha = rank, scale 1), the rest of each module's
    scale folded into ``lora_B``: ΔW = s·B·A = (alpha/r)·(s·r/alpha·B)·A. A file then means the same in loaders that
    read per-module alphas and in those that do not (diffusers files without lora_adapter_metadata, diffusers' kohya
    converter, which keeps only the most common alpha). LoRA, rsLoRA and DoRA over LoRA (W' = m·(W + s·BA)/‖W + s·BA‖,
    so s·B is exact there too); other variants are returned as is."""
    scales = lora_scales(part)
    if scales is None:
        return part
    spec, tensors = part.spec, dict(part.tensors)
    for m, s in scales.items():
        r = spec.rank_for(m)
        f = s * r / (r if alpha is None else alpha)
        key = f"{m}.inner.lora_B" if spec.variant == "dora" else f"{m}.lora_B"
        tensors[key] = tensors[key] * f if f != 1.0 else tensors[key]
    variant = "lora" if spec.variant == "rslora" else spec.variant
    options = {**spec.options, "inner": "lora"} if spec.variant == "dora" else spec.options
    baked = dataclasses.replace(spec, variant=variant, alpha=alpha, alpha_pattern={}, rslora=False, options=options)
    return dataclasses.replace(part, spec=baked, tensors=tensors)


def lora_config(part: Part, views: ModuleView | None = None) -> dict[str, Any]:
    """The LoraConfig/VeraConfig fields that reproduce the part's per-module ranks and alphas."""
    spec, mods = part.spec, sorted(part.modules)
    fan_in_fan_out = any(views[m].transposed for m in mods) if views else False
    if spec.variant in ("loha", "lokr"):
        return _lycoris_config(part, views)
    if spec.variant == "vera":
        return {"peft_type": "VERA", "r": spec.rank, "target_modules": mods, "projection_prng_key": spec.seed,
                "save_projection": True, "d_initial": float(spec.options.get("d_initial", 0.1)),
                "vera_dropout": spec.dropout, "fan_in_fan_out": fan_in_fan_out, "bias": "none"}
    ranks = {m: spec.rank_for(m) for m in mods}
    alphas = {m: module_alpha(spec, m) for m in mods}
    r, a = most_common(list(ranks.values())), most_common(list(alphas.values()))
    return {"peft_type": "LORA", "r": r, "lora_alpha": a, "target_modules": mods,
            "rank_pattern": {f"^{m}": v for m, v in ranks.items() if v != r},
            "alpha_pattern": {f"^{m}": v for m, v in alphas.items() if v != a},
            "use_rslora": spec.rslora or spec.variant == "rslora", "use_dora": spec.variant == "dora",
            "lora_dropout": spec.dropout, "fan_in_fan_out": fan_in_fan_out, "bias": "none", "init_lora_weights": True}


def read_folder(folder: Path, views: dict[str, ModuleView], src: str | None = None) -> Bundle:
    """A PEFT folder (bare model) or one PEFT sub-folder per pipeline component."""
    src = src or str(folder)
    subs = {p.parent.name: p.parent for p in folder.glob(f"*/{CONFIG}")} if not (folder / CONFIG).is_file() else {"": folder}
    if not subs:
        raise AdapterFileError(f"{src}: no {CONFIG} here or in a component sub-folder; expected a PEFT adapter folder")
    parts, meta = [], {}
    for role, sub in subs.items():
        try:
            config = json.loads((sub / CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdapterFileError(f"{sub / CONFIG}: not a readable JSON config ({e})") from None
        tensors, meta = read_safetensors(sub / WEIGHTS)
        role = role if role else _role_of(tensors, views)
        if role not in views:
            raise AdapterFileError(f"{sub}: adapts component '{role}'; the target has {sorted(views)}")
        shared = {k.removeprefix("base_model."): tensors.pop(k) for k in list(tensors) if k.removeprefix("base_model.") in SHARED}
        bad = [k for k in tensors if not k.startswith(PREFIX)]
        if bad:
            raise AdapterFileError(f"{sub / WEIGHTS}: key '{bad[0]}' lacks the '{PREFIX}' prefix of PEFT adapter files")
        part = parts_from_state_dict({k[len(PREFIX):]: v for k, v in tensors.items()}, config, role, views[role],
                                     str(sub / WEIGHTS), PREFIX)
        part.shared = shared
        parts.append(part)
    return Bundle(parts, dict(meta), "peft")


def _role_of(tensors: dict[str, torch.Tensor], views: dict[str, ModuleView]) -> str:
    """The component a folder without sub-folders adapts: the only one, or the one holding its modules."""
    if len(views) == 1:
        return next(iter(views))
    paths = {sk[0] if (sk := split_key(k.removeprefix(PREFIX))) else k.removeprefix(PREFIX).rpartition(".")[0]
             for k in tensors}
    fits = [r for r, v in views.items() if paths and all(find_module(p, v) for p in paths)]
    return fits[0] if len(fits) == 1 else ""


def write_folder(folder: Path, parts: list[Part], views: dict[str, ModuleView], meta: dict[str, str],
                 shared: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    for part in parts:
        sub = folder / part.component if len({p.component for p in parts}) > 1 else folder
        tensors = {PREFIX + k: v for k, v in state_dict_from_part(part).items()}
        for k, v in (shared or {}).get(part.component, {}).items():
            tensors[f"base_model.{k}"] = v
        config = lora_config(part, views.get(part.component))
        config["base_model_name_or_path"] = meta.get("base_model")
        write_safetensors(sub / WEIGHTS, tensors, {"format": "pt", **meta})
        tmp = sub / f".{CONFIG}.tmp"
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
        tmp.replace(sub / CONFIG)
    return folder
