"""The public API: add, load, save, switch, merge and remove adapters on models and pipelines.

A "pipeline" is anything with a ``components`` dict of modules (diffusers pipelines); every
function that takes one applies to each component that carries adapters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import embeddings as emb
from .core import mixtures
from .core.context import CallContext
from .core.errors import AdapterError, AdapterFileError
from .core.layer import AdaptedLayer
from .core.registry import get_variant, variant_names  # noqa: F401  (re-exported)
from .core.spec import AdapterSpec
from .core.walk import walk_modules
from .inject.walker import adapted_layers, adapter_names, inject, model_state, remove
from .io import canonical, cloneofsimo, dit, formats, tlora_official
from .io import embeddings as emb_io
from .io.bundle import FAMILY_NAMES, Bundle, Part, component_role, model_family, model_view
from .io.detect import TRANSFORMER_FAMILIES, file_family, flux_generation, is_unet_file, unsupported_family
from .io.files import read_safetensors, single_thread, write_safetensors

log = logging.getLogger(__name__)
GROUPS_ATTR = "_lora_groups"  # {adapter name: [names of the further variant groups loaded with it]}


def components(obj: Any) -> dict[str, nn.Module]:
    """{"": model} for a model, {name: module} for a pipeline's module components."""
    if isinstance(obj, nn.Module):
        return {"": obj}
    comps = getattr(obj, "components", None)
    if isinstance(comps, dict):
        return {k: v for k, v in comps.items() if isinstance(v, nn.Module)}
    raise TypeError(f"expected a torch module or a pipeline with .components, found {type(obj).__name__}")


# --- adding and training ---
def add_adapter(model: nn.Module, spec: AdapterSpec, name: str = "default", scale: float = 1.0,
                trainable: bool = True) -> list[str]:
    """Inject adapter ``name`` into every module that ``spec`` targets; returns their names.

    All targets are checked and every adapter built before the model is touched, so a bad
    spec leaves the model exactly as it was. With ``trainable`` (the default) everything but
    this adapter is frozen.
    """
    names = inject(model, spec, name, scale)
    if trainable:
        mark_trainable(model, [name])
    return names


def mark_trainable(model: nn.Module, names: Sequence[str]) -> None:
    """Freeze every parameter of ``model`` except those of the named adapters."""
    for _, m in walk_modules(model):  # each adapter is reached once, through its layer (not walked into)
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
        if isinstance(m, AdaptedLayer):
            for cname, child in m.named_children():  # adapters, combiner
                if cname != "base_layer":
                    _freeze(child)
            for n in names:
                if n in m.adapters:
                    m.adapters[n].requires_grad_(True)


def _freeze(module: nn.Module) -> None:
    """``module.requires_grad_(False)`` touching only the parameters that need it (a library of adapters: fast)."""
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and p.requires_grad:
                p.requires_grad_(False)


def _set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """A loaded adapter is frozen for inference, or the only trainable part (``mark_trainable``)."""
    if trainable:
        mark_trainable(model, [name])
        return
    for _, p in adapter_parameters(model, name):
        p.requires_grad_(False)


def adapter_parameters(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    for lname, layer in adapted_layers(model):
        items = layer.adapters.items() if name is None else [(name, layer.adapters[name])] if name in layer.adapters else []
        for aname, ad in items:
            for pname, p in ad.named_parameters():
                yield f"{lname}.adapters.{aname}.{pname}", p


def param_groups(model: nn.Module, lr: float, name: str | None = None,
                 lr_ratios: dict[str, float] | None = None, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups by tensor role ("A", "B", "magnitude", ...).

    ``lr_ratios`` multiplies the learning rate per role: LoRA+ is ``{"B": 16.0}``.
    """
    lr_ratios = lr_ratios or {}
    groups: dict[str, list[nn.Parameter]] = {}
    for _lname, layer in adapted_layers(model):
        for aname, ad in layer.adapters.items():
            if name is not None and aname != name:
                continue
            roles = ad.param_roles
            for pname, p in ad.named_parameters():
                if p.requires_grad:
                    groups.setdefault(roles.get(pname, "other"), []).append(p)
    return [{"params": ps, "lr": lr * lr_ratios.get(role, 1.0), "weight_decay": weight_decay, "role": role}
            for role, ps in groups.items()]


# --- state dicts and files ---
def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """``<module>.<param>`` -> tensor for adapter ``name`` (regenerable frozen tensors excluded)."""
    return {k: v.detach() for k, v in _adapter_tensors(model, name).items()}


def load_adapter_state_dict(model: nn.Module, name: str, sd: dict[str, torch.Tensor], source: str = "state dict",
                            assign: bool = False) -> None:
    """Copy ``sd`` into adapter ``name``; every key must be used and every shape must fit.

    ``assign`` (file loaders): a 64-byte-aligned tensor of the parameter's dtype and device becomes the
    parameter itself (no allocation, no copy, as diffusers' low_cpu_mem_usage load); others are copied.
    """
    expected = _adapter_tensors(model, name)
    missing = sorted(set(expected) - set(sd))
    unused = sorted(set(sd) - set(expected))
    if missing or unused:
        raise AdapterFileError(f"{source}: adapter '{name}' expects {len(expected)} tensors; "
                               f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                               f"unexpected {unused[:5]}{'...' if len(unused) > 5 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AdapterFileError(f"{source}: tensor '{k}' has shape {tuple(v.shape)}; "
                                   f"expected {tuple(expected[k].shape)}")
    with torch.no_grad(), single_thread():
        for k, v in sd.items():
            t = expected[k]
            # 64-byte alignment: BLAS picks kernels by alignment, and a file's tensors (8-byte aligned in
            # safetensors) would give outputs that differ in the last bit from freshly allocated ones
            if assign and v.dtype == t.dtype and v.device == t.device and v.is_contiguous() and v.data_ptr() % 64 == 0:
                t.data = v
            else:
                t.copy_(v)


def _adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Like ``adapter_state_dict`` but the Parameter/buffer objects themselves (keep_vars)."""
    _require(model, name)
    out = {}
    for lname, layer in adapted_layers(model):
        if name in layer.adapters:
            for k, v in layer.adapters[name].state_dict(keep_vars=True).items():
                out[f"{lname}.{k}"] = v
    return out


def save_adapter(model_or_pipeline: Any, path: str | os.PathLike, name: str = "default",
                 metadata: dict[str, str] | None = None, format: str = "canonical",
                 trigger_word: str | None = None, base_model: str | None = None) -> Path:
    """Write adapter ``name`` (of every component that has it) in ``format``.

    "canonical" (one safetensors file, every variant, lossless), "kohya" (A1111/ComfyUI/Civitai; LoRA, DoRA,
    LoHa, LoKr), "diffusers" (``load_lora_weights``; LoRA, DoRA), "peft" (a folder for ``PeftModel``;
    LoRA, DoRA, VeRA, LoHa, LoKr), "tlora-official" (ControlGenAI/T-LoRA's checkpoint layout, schedule kept) or
    "bfl" (Flux.1 / Flux.2 transformers: ``diffusion_model.<original name>``, ComfyUI's and ai-toolkit's layout).
    A T-LoRA (or, outside PEFT, a VeRA) is written to the other external formats as the exactly equal plain LoRA
    at full rank min(2r, out, in): those formats have no timestep mask (logged). LoRA scales are folded into the
    factors where a loader could ignore the file's alpha (docs/formats.md).
    """
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta.update({k: v for k, v in (("trigger_word", trigger_word), ("base_model", base_model)) if v})
    if format not in formats.FORMATS:
        raise AdapterError(f"save_adapter: format {format!r}; expected one of {list(formats.FORMATS)}")
    if format != "canonical":
        for m in components(model_or_pipeline).values():
            mixtures.refuse_export(m, name, format)
        return _save_external(model_or_pipeline, Path(path), name, meta, format)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, canonical.ComponentEntry] = {}
    for comp, model in components(model_or_pipeline).items():
        st = model_state(model)
        if st is None or name not in st.specs:
            continue
        for key, aname in _canonical_entries(model, comp, name):  # the adapter and the variant groups loaded with it
            prefix = f"{key}." if key else ""
            tensors.update({prefix + k: v for k, v in adapter_state_dict(model, aname).items()})
            entries[key] = canonical.ComponentEntry(st.specs[aname], st.modules[aname], type(model).__name__, aname)
    placeholders = _placeholders(model_or_pipeline, name)
    if not entries and not placeholders:
        raise AdapterError(f"no adapter named '{name}' to save; present: {list_adapters(model_or_pipeline)}")
    bundled, emb_meta = emb_io.bundle_tensors(model_or_pipeline, placeholders)
    tensors.update(bundled)
    meta.update(emb_meta)
    path = Path(path)
    family = model_family(model_or_pipeline)
    if family:
        meta.setdefault("base_model_family", family)
    for comp, model in components(model_or_pipeline).items():  # a model-level mixture's part (MoA's routers, ...)
        extra, extra_meta = mixtures.saved_state(model, name, f"{comp}." if comp else "")
        tensors.update(extra)
        meta.update(extra_meta)
    if entries:
        main = next(iter(entries.values())).spec
        alpha = main.alpha if main.alpha is not None else main.rank
        meta.update({"variant": main.variant, "rank": str(main.rank), "alpha": str(alpha)})
    write_safetensors(path, tensors, canonical.encode_metadata(entries, meta))
    log.info("saved adapter '%s' (%d tensors) to %s", name, len(tensors), path)
    return path


def _canonical_entries(model: nn.Module, comp: str, name: str) -> list[tuple[str, str]]:
    """(entry key, adapter name): the component's own entry and ``<comp>+<group>`` for each variant group loaded with
    ``name`` (a file whose modules need different variants or LoKr layouts, e.g. a BFL LoKr on fused q/k/v)."""
    groups = model.__dict__.get(GROUPS_ATTR, {}).get(name, [])
    return [(comp, name)] + [(f"{comp}{canonical.GROUP_SEP}{g[len(name) + 1:]}", g) for g in groups]


def _placeholders(obj: Any, name: str) -> list[emb.TokenEmbeddings]:
    """The placeholder tokens trained or loaded with adapter ``name`` (pipelines only)."""
    return [] if isinstance(obj, nn.Module) else emb.current_vectors(obj, name)


def _export_parts(obj: Any, name: str, fmt: str) -> tuple[list[Part], dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Parts of adapter ``name`` and of the variant groups loaded with it (``<name>_<group>``) per component."""
    parts, views, shared = [], {}, {}
    for comp, model in components(obj).items():
        st = model_state(model)
        role = comp or component_role(model)
        for aname in [name, *model.__dict__.get(GROUPS_ATTR, {}).get(name, [])]:
            if st is None or aname not in st.specs:
                continue
            views[role] = views.get(role) or model_view(model)
            parts.append(_export_part(model, role, aname, name, fmt, shared))
    if not parts:
        raise AdapterError(f"no adapter named '{name}' to save; present: {list_adapters(obj)}")
    return parts, views, shared


def _export_part(model: nn.Module, role: str, aname: str, name: str, fmt: str,
                 shared: dict[str, dict[str, torch.Tensor]]) -> Part:
    st = model_state(model)
    assert st is not None
    spec = st.specs[aname]
    part = Part(role, spec, list(st.modules[aname]), adapter_state_dict(model, aname), group=aname[len(name) + 1:])
    if fmt == formats.TLORA_OFFICIAL and spec.variant == "tlora":  # the official layout keeps the schedule
        ads = {m: layer.adapters[aname] for m, layer in adapted_layers(model) if aname in layer.adapters}
        return tlora_official.with_frozen(part, ads)
    if spec.variant == "tlora" or (spec.variant == "vera" and fmt != "peft") or get_variant(spec.variant).export_as_lora:
        if spec.variant == "tlora":
            log.warning("T-LoRA '%s' written to %s at full rank (rank min(2r, out, in), exact without a timestep); the "
                        "%s format has no timestep mask, the canonical file keeps the schedule", aname, fmt, fmt)
        ads = {m: layer.adapters[aname] for m, layer in adapted_layers(model) if aname in layer.adapters}
        return formats.plain_lora(part, ads)
    if spec.variant == "vera":
        store = _vera_store(model, aname)
        shared[role] = {k: store.get(f"{k}__{aname}") for k in ("vera_A", "vera_B")}
    return part


def _save_external(obj: Any, path: Path, name: str, meta: dict[str, str], fmt: str) -> Path:
    parts, views, shared = _export_parts(obj, name, fmt)
    meta.setdefault("name", name)
    unet = _role_targets(obj).get("unet") or _role_targets(obj).get("transformer")  # its config: SGM / DiT names
    bundled: dict[str, torch.Tensor] = {}
    if fmt == "kohya":  # sd-scripts' bundled embeddings; other formats get a separate embedding file
        bundled, emb_meta = emb_io.bundle_tensors(obj, _placeholders(obj, name))
        meta.update(emb_meta)
    path = formats.write_parts(path, parts, fmt, views, meta, model_family(obj), getattr(unet, "config", None), shared,
                               extra_tensors=bundled)
    log.info("saved adapter '%s' in %s format to %s", name, fmt, path)
    return path


def _target(obj: Any, comp: str, model_class: str, path: str) -> nn.Module:
    comps = components(obj)
    if isinstance(obj, nn.Module):
        if comp and type(obj).__name__ != model_class:
            raise AdapterFileError(f"{path}: adapts the pipeline component '{comp}' ({model_class}); "
                                   f"the model is a {type(obj).__name__}")
        return obj
    if comp in comps:
        return comps[comp]
    match = [m for m in comps.values() if type(m).__name__ == model_class]
    if not match:
        raise AdapterFileError(f"{path}: adapts a {model_class} ('{comp}'); the pipeline has {sorted(comps)}")
    return match[0]


def load_adapter(model_or_pipeline: Any, path: str | os.PathLike, name: str | None = None,
                 scale: float = 1.0, trainable: bool = False, token: str | None = None) -> str:
    """Load an adapter file, folder or cached hub repo in any supported format; returns the adapter's name.

    Formats: canonical, kohya/A1111/Civitai (LoRA, LoCon, LyCORIS LoHa/LoKr/tlora, dora_scale), diffusers (also
    0.15-0.20 and <= 0.14 attention-processor files), PEFT folders (LoRA, DoRA, VeRA, LoHa, LoKr), official T-LoRA
    checkpoints, cloneofsimo/lora files; mixture files (X-LoRA, MoLE: every LoRA plus the learned mixture, installed
    as a fusion; returns the mixture's name, docs/mixtures.md).
    The name defaults to the file's stem; a file mixing variants adds ``<name>_<variant>`` adapters for the
    smaller groups. Nothing is applied unless every component, module and tensor of the file applies.
    Placeholder embeddings travel along (kohya ``bundle_emb.*``, our canonical file) or alone (A1111/ComfyUI and
    diffusers embedding files, ``token`` names the prompt word): the tokenizer gets the tokens, the text encoder
    their rows, and ``remove_adapters`` restores both exactly.
    """
    src = formats.resolve(path)
    flux_pt = tlora_official.flux_checkpoint(src)  # the official T-LoRA FLUX trainer's checkpoint-N/lora.pt
    if flux_pt is None and src.is_file() and src.suffix in (".pt", ".bin"):  # A1111 / diffusers textual inversion
        return load_embeddings(model_or_pipeline, src, name, token)
    src = flux_pt or src
    loaded = tlora_official.read_flux_pt(src) if flux_pt else read_safetensors(src) if src.is_file() else None
    if loaded is None and not formats.is_peft_folder(src):
        src = formats.weights_file(src)
        loaded = read_safetensors(src)
    name = name or re.sub(r"[^A-Za-z0-9_-]", "_", src.stem if src.is_file() else src.name)
    if loaded is None:
        return _load_weights(model_or_pipeline, src, None, name, scale, trainable)
    if emb_io.is_embedding_file(loaded[0]) and not canonical.is_canonical(loaded[1]):
        return load_embeddings(model_or_pipeline, src, name, token, loaded)
    tensors, raw = emb_io.split_bundle(loaded[0])
    tensors, tokens = cloneofsimo.split_embeds(tensors, loaded[1])  # its pivotal-tuning tokens (<s1>, <s2>, ...)
    raw |= {t: {"emb_params": v} for t, v in tokens.items()}
    placeholders = []
    if raw and not isinstance(model_or_pipeline, nn.Module):
        placeholders = emb_io.from_bundle(model_or_pipeline, raw, loaded[1], str(src))
        emb.check(model_or_pipeline, placeholders, str(src))  # before anything is applied
    elif raw:
        log.warning("%s: bundled embeddings %s skipped: load onto the pipeline to get the tokens", src, sorted(raw))
    _load_weights(model_or_pipeline, src, (tensors, loaded[1]), name, scale, trainable)
    try:
        emb.apply_embeddings(model_or_pipeline, name, placeholders, str(src))
    except BaseException:
        remove_adapters(model_or_pipeline, [name])
        raise
    return name


def load_embeddings(pipe: Any, path: str | os.PathLike, name: str | None = None, token: str | None = None,
                    loaded: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None) -> str:
    """Load a textual-inversion file (A1111/ComfyUI ``emb_params``/``clip_l``+``clip_g``, diffusers) as adapter
    ``name`` (default: the file's stem); the prompt names ``token`` (default: the file's token or stem)."""
    src = Path(path)
    tensors, meta = loaded or emb_io.read_embedding_file(src)
    name = name or re.sub(r"[^A-Za-z0-9_-]", "_", src.stem)
    placeholders = emb_io.embeddings_from_file(pipe, tensors, meta, str(src), token)
    emb.apply_embeddings(pipe, name, placeholders, str(src))
    return name


def _load_weights(model_or_pipeline: Any, src: Path, loaded: tuple[dict[str, torch.Tensor], dict[str, str]] | None,
                  name: str, scale: float, trainable: bool) -> str:
    if loaded is not None:  # canonical files too: Flux and SD3 share module names, the widths may match
        _check_family(model_or_pipeline, src, loaded)
    if loaded is not None and canonical.is_canonical(loaded[1]):
        whole = mixtures.file_loader(loaded[1])  # X-LoRA/MoLE/LAG file: its adapters plus the learned mixture
        if whole is not None:
            return whole(model_or_pipeline, src, loaded, name)
        return _load_canonical(model_or_pipeline, src, loaded, name, scale, trainable)
    targets = _role_targets(model_or_pipeline)
    views = {role: model_view(m) for role, m in targets.items()}
    unet_config = getattr(targets.get("unet"), "config", None)
    bundle = formats.read_bundle(src, views, unet_config, loaded, bare=isinstance(model_or_pipeline, nn.Module),
                                 models=targets)
    _apply(bundle, targets, name, scale, trainable, str(src))
    return name


def _role_targets(obj: Any) -> dict[str, nn.Module]:
    if isinstance(obj, nn.Module):
        return {component_role(obj): obj}
    return components(obj)


def _family_words(family: str, other: str | None = None) -> str:
    """A family in words; a UNet family says so when the other side is a transformer."""
    if family == "unet":
        return "a UNet model (Stable Diffusion 1/2/XL-style)"
    if family in TRANSFORMER_FAMILIES:
        return FAMILY_NAMES[family] if family == "dit" else f"{FAMILY_NAMES[family]}, a transformer model"
    return f"{FAMILY_NAMES[family]}, a UNet model" if other in TRANSFORMER_FAMILIES else FAMILY_NAMES[family]


def _check_family(obj: Any, src: Path, loaded: tuple[dict[str, torch.Tensor], dict[str, str]]) -> None:
    """Refuse a file made for another base family before anything is injected (the file's family from its keys and
    shapes, else its metadata; the model's from its UNet config). A transformer (Flux, SD3) file never fits a UNet."""
    tensors, meta = loaded
    want, have = file_family({k: tuple(v.shape) for k, v in tensors.items()}, meta), model_family(obj)
    has_unet = "unet" in _role_targets(obj) or "UNet" in type(obj).__name__
    other = unsupported_family(list(tensors))
    if other:
        model = _family_words(have) if have else "a UNet (Stable Diffusion 1/2/XL-style) model" if has_unet else \
            f"a {type(obj).__name__}"
        raise AdapterFileError(f"{src}: this LoRA is for {other}, a model family this project does not support; the "
                               f"model is {model}; expected a LoRA made for it")
    if have in TRANSFORMER_FAMILIES and want is None and is_unet_file(list(tensors)):
        want = "unet"
    if (want, have) == ("flux", "flux2") and flux_generation({k: tuple(v.shape) for k, v in tensors.items()}) is None:
        want = "flux2"  # BFL names at a width both generations have (Flux.2 klein 4B is 3072 wide): the shapes decide
    transformer = _role_targets(obj).get("transformer") or (obj if have in TRANSFORMER_FAMILIES else None)
    if want in (have, "dit") and have in TRANSFORMER_FAMILIES and transformer is not None:
        dit.check_blocks(tensors, have, transformer.config, str(src))  # a LoRA for a deeper model of the family
        return  # (a transformer_blocks-only file fits Flux and SD3 alike: the shapes decide)
    if want and have and want != have or want in TRANSFORMER_FAMILIES and has_unet:
        model = _family_words(have, want) if have else "a UNet (Stable Diffusion 1/2/XL-style) model"
        expected = f"a {FAMILY_NAMES[have]} LoRA" if have else "a LoRA for a UNet model"
        raise AdapterFileError(f"{src}: this LoRA is for {_family_words(want, have)}; the model is {model}; "
                               f"expected {expected}")


def _apply(bundle: Bundle, targets: dict[str, nn.Module], name: str, scale: float, trainable: bool, src: str) -> None:
    with formats.named_format(bundle.format):  # refusals name the format (after the cleanup below)
        _apply_parts(bundle, targets, name, scale, trainable, src)
    log.info("loaded %s adapter '%s' from %s: %s", bundle.format, name, src,
             ", ".join(f"{p.component or 'model'}/{p.spec.variant}: {len(p.modules)} modules" for p in bundle.parts))


def _apply_parts(bundle: Bundle, targets: dict[str, nn.Module], name: str, scale: float, trainable: bool,
                 src: str) -> None:
    added: list[tuple[nn.Module, str]] = []
    try:
        for part in bundle.parts:
            model = targets[part.component]
            aname = f"{name}_{part.group}" if part.group else name
            # every tensor is copied next (no init); inference loads keep the base's fp16/bf16 dtype
            inject(model, part.spec, aname, scale, module_names=part.modules, init=False, follow_base_dtype=not trainable)
            added.append((model, aname))
            if part.group:  # saved together with the main adapter
                model.__dict__.setdefault(GROUPS_ATTR, {}).setdefault(name, []).append(aname)
            expected = adapter_state_dict(model, aname)
            for k, v in part.tensors.items():
                if k in expected and tuple(v.shape) != tuple(expected[k].shape):
                    raise AdapterFileError(f"{src}: key '{part.origin.get(k, k)}': shape {tuple(v.shape)} does not fit "
                                           f"the model; expected {tuple(expected[k].shape)}")
            load_adapter_state_dict(model, aname, part.tensors, src, assign=True)
            _check_shared(model, aname, part, src)
            _check_base_copies(model, part, src)
            _set_trainable(model, aname, trainable)
    except BaseException:
        for model, aname in reversed(added):
            remove(model, [aname])
            model.__dict__.get(GROUPS_ATTR, {}).pop(name, None)
        raise


def _vera_store(model: nn.Module, name: str) -> Any:
    return next(layer.adapters[name]._store[0] for _, layer in adapted_layers(model) if name in layer.adapters)


def _check_shared(model: nn.Module, aname: str, part: Part, src: str) -> None:
    """PEFT VeRA files may carry vera_A/vera_B: they must equal the projections regenerated from the seed."""
    for k, v in part.shared.items():
        ours = _vera_store(model, aname).get(f"{k}__{aname}")
        if tuple(ours.shape) != tuple(v.shape) or not torch.allclose(ours.float(), v.float(), atol=1e-6):
            raise AdapterFileError(f"{src}: key 'base_model.{k}' {tuple(v.shape)} differs from the projection regenerated "
                                   f"from projection_prng_key={part.spec.seed} {tuple(ours.shape)}; expected equal tensors")


def _check_base_copies(model: nn.Module, part: Part, src: str) -> None:
    """PEFT folders can carry a copy of a targeted layer's base weight (embedding layers: lm_head, embed_tokens); it is
    not applied, so it must equal the model's own weight (else the adapter was trained on another base)."""
    for mod, t in part.base_copies.items():
        w = model.get_submodule(mod).weight
        if tuple(w.shape) != tuple(t.shape) or not torch.allclose(w.detach().float(), t.float(), atol=1e-6):
            key = part.origin.get(f"{mod}.base_layer.weight", mod)
            raise AdapterFileError(f"{src}: key '{key}': a copy of the base weight of '{mod}' that differs from the model's "
                                   f"{tuple(w.shape)}; expected the same base model (the copy is not applied)")


def _load_canonical(model_or_pipeline: Any, path: Path, loaded: tuple[dict[str, torch.Tensor], dict[str, str]],
                    name: str, scale: float, trainable: bool) -> str:
    tensors, meta = loaded
    entries = canonical.decode_metadata(meta, str(path))
    done: list[nn.Module] = []
    done: list[tuple[nn.Module, str]] = []
    try:
        for key, entry in entries.items():
            comp, _, group = key.partition(canonical.GROUP_SEP)
            aname = f"{name}_{group}" if group else name
            model = _target(model_or_pipeline, comp, entry.model_class, str(path))
            inject(model, entry.spec, aname, scale, module_names=entry.modules)
            done.append((model, aname))
            if group:  # saved together with the main adapter
                model.__dict__.setdefault(GROUPS_ATTR, {}).setdefault(name, []).append(aname)
            sd = canonical.split_component(tensors, key) if len(entries) > 1 or key else dict(tensors)
            extra = mixtures.split_state(sd, meta) if not group else {}  # a model-level mixture's part (MoA's routers)
            load_adapter_state_dict(model, aname, sd, str(path), assign=True)
            _set_trainable(model, aname, trainable)
            if not group:
                mixtures.install(model, name, extra, meta, str(path), trainable)  # rebuilt on its loaded LoRA experts
    except BaseException:
        for model, aname in reversed(done):
            mixtures.remove(model, [aname])
            remove(model, [aname])
            model.__dict__.get(GROUPS_ATTR, {}).pop(name, None)
        raise
    return name


# --- switching, merging, removing ---
def list_adapters(model_or_pipeline: Any) -> list[str]:
    out: list[str] = []
    for m in components(model_or_pipeline).values():
        out.extend(n for n in adapter_names(m) if n not in out)
    if not isinstance(model_or_pipeline, nn.Module):
        out.extend(n for n in emb.loaded_embeddings(model_or_pipeline) if n not in out)
    return out


def _require(model_or_pipeline: Any, *names: str) -> None:
    present = list_adapters(model_or_pipeline)
    unknown = [n for n in names if n not in present]
    if unknown:
        raise AdapterError(f"no adapter named {unknown}; present: {present}")


def set_adapters(model_or_pipeline: Any, names: str | Sequence[str],
                 scales: float | Sequence[float] | dict[str, float] | None = None) -> None:
    """Activate exactly ``names`` (others off) with optional per-adapter scales."""
    names = [names] if isinstance(names, str) else list(names)
    _require(model_or_pipeline, *names)
    if scales is None:
        sc: dict[str, float] = {}
    elif isinstance(scales, dict):
        sc = dict(scales)
    elif isinstance(scales, (int, float)):
        sc = {n: float(scales) for n in names}
    else:
        if len(scales) != len(names):
            raise AdapterError(f"set_adapters: {len(names)} names but {len(scales)} scales")
        sc = dict(zip(names, scales))
    for m in components(model_or_pipeline).values():
        for _, layer in adapted_layers(m):
            layer.set_active(names, sc)


def disable_adapters(model_or_pipeline: Any) -> None:
    for m in components(model_or_pipeline).values():
        for _, layer in adapted_layers(m):
            layer.set_active([])


def merge_adapters(model_or_pipeline: Any, names: Sequence[str] | None = None) -> None:
    """Fold the active (or named) adapters into the base weights; ``unmerge_adapters`` undoes it exactly."""
    if names is not None:
        _require(model_or_pipeline, *names)
    for m in components(model_or_pipeline).values():  # None: the active adapters are merged
        mixtures.refuse_merge(m, _active(m) if names is None else names)
    for m in components(model_or_pipeline).values():
        for _, layer in adapted_layers(m):
            layer.merge(None if names is None else [n for n in names if n in layer.adapters])


def _active(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n for _, layer in adapted_layers(model) for n in layer.active))


def unmerge_adapters(model_or_pipeline: Any) -> None:
    for m in components(model_or_pipeline).values():
        for _, layer in adapted_layers(m):
            layer.unmerge()


def remove_adapters(model_or_pipeline: Any, names: Sequence[str] | None = None, merge: bool = False) -> None:
    """Delete adapters and restore the original modules (with ``merge``, fold them in first)."""
    if names is not None:
        _require(model_or_pipeline, *names)
    for m in components(model_or_pipeline).values():
        present = adapter_names(m)
        here = present if names is None else [n for n in names if n in present]
        groups = m.__dict__.get(GROUPS_ATTR, {})  # the variant groups loaded with an adapter go with it
        here = list(dict.fromkeys(here + [g for n in here for g in groups.pop(n, []) if g in present]))
        if merge:
            mixtures.refuse_merge(m, here)
        mixtures.remove(m, here)  # a mixture's router and hooks go with its experts
        if here:
            remove(m, here, merge=merge)
    if not isinstance(model_or_pipeline, nn.Module):  # placeholder tokens: tokenizer and embeddings restored
        for n in list(emb.loaded_embeddings(model_or_pipeline)) if names is None else names:
            emb.remove_embeddings(model_or_pipeline, n)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant gradient checkpointing that recomputes with the context each segment saw.

    Works on diffusers models (``enable_gradient_checkpointing``) and transformers models
    (``gradient_checkpointing_enable``); exact for T-LoRA even with several forwards at different
    timesteps before one backward. Call it after adding adapters.
    """
    import functools

    import torch.utils.checkpoint as cp

    from .core.context import checkpoint_context_fn

    holders = list(_holders(model))
    if not holders:
        raise AdapterError(f"{type(model).__name__} has no adapters; add them before enabling checkpointing")
    context_fn = checkpoint_context_fn(holders)
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers ModelMixin
        ckpt = functools.partial(cp.checkpoint, use_reentrant=False, context_fn=context_fn)
        model.enable_gradient_checkpointing(gradient_checkpointing_func=lambda module, *args: ckpt(module.__call__, *args))
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers PreTrainedModel
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": context_fn})
    else:
        raise AdapterError(f"{type(model).__name__} has no gradient-checkpointing switch (expected a diffusers or "
                           "transformers model); wrap its blocks with torch.utils.checkpoint and checkpoint_context_fn")


def shared_tensors(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Model-level frozen tensors (VeRA projections), ``<key>__<adapter name>`` -> tensor."""
    from .core.shared import SharedStore

    out: dict[str, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, SharedStore):
            out.update({k: v for k, v in m._buffers.items() if name is None or k.endswith(f"__{name}")})
    return out


def get_spec(model: nn.Module, name: str = "default") -> AdapterSpec:
    st = model_state(model)
    if st is None or name not in st.specs:
        raise AdapterError(f"no adapter named '{name}'; present: {adapter_names(model)}")
    return st.specs[name]


# --- per-call context ---
def _holders(model_or_pipeline: Any):
    for m in components(model_or_pipeline).values():
        st = model_state(m)
        if st is not None:
            yield st.holder


def set_context(model_or_pipeline: Any, **changes: Any) -> None:
    """Set context fields (timestep, num_train_timesteps, step, gates) until changed again."""
    for h in _holders(model_or_pipeline):
        h.update(**changes)


def set_timestep(model_or_pipeline: Any, t: float | int | torch.Tensor | None,
                 num_train_timesteps: int | None = None) -> None:
    """The diffusion timestep that T-LoRA's rank mask (and any timestep-aware variant) reads."""
    changes: dict[str, Any] = {"timestep": t}
    if num_train_timesteps is not None:
        changes["num_train_timesteps"] = num_train_timesteps
    set_context(model_or_pipeline, **changes)


@contextlib.contextmanager
def timestep(model_or_pipeline: Any, t: float | int | torch.Tensor | None,
             num_train_timesteps: int | None = None) -> Iterator[None]:
    """``with timestep(unet, t): ...`` sets the timestep and restores the previous context after."""
    holders = list(_holders(model_or_pipeline))
    saved: list[CallContext] = [h.state for h in holders]
    set_timestep(model_or_pipeline, t, num_train_timesteps)
    try:
        yield
    finally:
        for h, s in zip(holders, saved):
            h.restore(s)


from .squeeze import squeeze_file  # noqa: E402,F401  (LoRA-Squeeze: lora_diffusion/squeeze.py)
