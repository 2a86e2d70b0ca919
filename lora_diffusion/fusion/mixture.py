"""What the learned mixtures (X-LoRA, MoLE) share: adapter checks, adapter digests and the mixture file.

A mixture file is a canonical lora-diffusion safetensors file that holds the frozen adapters **and** what the
mixture learned (X-LoRA's classifier, MoLE's gates), so one file restores the whole model:

    tensors   adapter/<name>/[<component>.]<module>.<param>     every adapter, as ``save_adapter`` writes it
              mixture/<key>                                     the classifier / gate parameters
    metadata  format = "lora-diffusion", format_version, mixture = JSON {method, options, names,
              digests {name: sha256 of the adapter's tensors}, adapters {name: {component: entry}}}

``ld.load_adapter(model, "xlora.safetensors")`` loads it (every adapter, then the fusion with its learned
parameters) and returns the mixture's name. ``load_mixture_weights`` puts a file's classifier/gates into a
fusion already installed on adapters loaded by hand, refusing a file trained for other adapters: the digests
are of the adapters' tensors as loaded in the model, so they do not depend on the file format they came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import adapter_state_dict, components, remove_adapters
from ..core import mixtures
from ..core.errors import AdapterError, AdapterFileError
from ..core.layer import AdaptedLayer
from ..inject.walker import adapted_layers, inject, model_state
from ..io import canonical
from ..io.bundle import component_role
from ..io.files import read_safetensors, write_safetensors

log = logging.getLogger(__name__)
META_KEY = "mixture"


# --- checks ---
def check_mixable(layers: dict[str, AdaptedLayer], names: list[str], method: str, min_adapters: int = 2) -> None:
    """Every name is an unmerged adapter on some layer, additive (its output is linear in its input, so a
    per-token weight on the input equals the same weight on the output), and there are at least
    ``min_adapters``. One error naming the adapter and the requirement."""
    if len(names) < min_adapters:
        raise AdapterError(f"{method}: mixes at least {min_adapters} adapters; got {names}")
    if len(set(names)) != len(names):
        raise AdapterError(f"{method}: adapter names repeat: {names}")
    for n in names:
        holders = [(k, layer) for k, layer in layers.items() if n in layer.adapters]
        if not holders:
            raise AdapterError(f"{method}: adapter '{n}' is not loaded on this model")
        for k, layer in holders:
            ad = layer.adapters[n]
            if not ad.additive:
                raise AdapterError(f"{method}: adapter '{n}' is a {ad.variant} adapter at '{k}'; {method} needs "
                                   "additive adapters (output linear in the input: LoRA, LoHa, LoKr, VeRA, ...); "
                                   "PEFT's X-LoRA refuses DoRA likewise")
            if n in layer.merged:
                raise AdapterError(f"{method}: adapter '{n}' is merged into '{k}'; unmerge it first")


def check_same_base(files: dict[str, Path], model: nn.Module | None = None) -> None:
    """Adapter files recording different base models (``llm`` metadata fingerprint) are refused by name."""
    from ..io.files import read_header
    from ..llm import META_BASE_CONFIG, META_BASE_MODEL, base_fingerprint

    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, path in files.items():
        _, meta = read_header(path)
        raw = meta.get(META_BASE_CONFIG)
        if raw:
            seen[name] = (meta.get(META_BASE_MODEL, "?"), json.loads(raw))
    ours = base_fingerprint(model) if model is not None else None
    ref = next(iter(seen.items()), None)
    for name, (base, fp) in seen.items():
        for other, (obase, ofp) in ([ref] if ref else []) + ([("the model", ("this model", ours))] if ours else []):
            diff = {k: (fp[k], ofp[k]) for k in fp if k in ofp and fp[k] != ofp[k]}
            if diff:
                raise AdapterFileError(f"{files[name]}: adapter '{name}' was trained on base '{base}', which differs "
                                       f"from {other} ('{obase}'): "
                                       + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(diff.items()))
                                       + "; a mixture needs adapters of one base model")


# --- digests ---
def adapter_digest(model_or_pipeline: Any, name: str) -> str:
    """sha256 over adapter ``name``'s tensors in every component (sorted keys, dtype, shape, bytes)."""
    h = hashlib.sha256()
    parts = {comp or component_role(model): model for comp, model in components(model_or_pipeline).items()}
    for comp, model in sorted(parts.items()):  # named by role: a bare UNet and a pipeline's unet agree
        st = model_state(model)
        if st is None or name not in st.specs:
            continue
        for k, v in sorted(adapter_state_dict(model, name).items()):
            t = v.detach().cpu().contiguous()
            h.update(f"{comp}|{k}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_digests(source: str, recorded: dict[str, str], actual: dict[str, str]) -> None:
    """Refuse learned mixture weights for other adapters: each name whose tensors differ, each missing name."""
    problems = [f"'{n}' differs from the adapter it was trained with (sha256 {actual[n][:12]} vs {recorded[n][:12]})"
                for n in actual if n in recorded and recorded[n] != actual[n]]
    missing = sorted(set(recorded) - set(actual))
    extra = sorted(set(actual) - set(recorded))
    if missing or extra:
        problems.append(f"trained for adapters {sorted(recorded)}, applied to {sorted(actual)}")
    if problems:
        raise AdapterFileError(f"{source}: refused, trained for other adapters: " + "; ".join(problems))


# --- the learned state ---
def mixture_state_dict(fusion: Any) -> dict[str, torch.Tensor]:
    out = {f"{k}.{p}": v.detach() for k, c in fusion.combiners.items() for p, v in c.state_dict().items()}
    out.update({f"modules.{p}": v.detach() for p, v in fusion.modules.state_dict().items()})
    return out


def load_mixture_state_dict(fusion: Any, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = {k: v for k, v in mixture_state_dict(fusion).items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(f"{source}: {fusion.method.name} weights for other layers or options; "
                               f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    bad = [f"'{k}' {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in tensors.items()
           if v.shape != expected[k].shape]
    if bad:
        raise AdapterFileError(f"{source}: shapes differ from this model's {fusion.method.name} (file vs model): "
                               + "; ".join(bad[:4]))
    with torch.no_grad():
        for k, c in fusion.combiners.items():
            for p, t in c.state_dict(keep_vars=True).items():
                t.copy_(tensors[f"{k}.{p}"])
        for p, t in fusion.modules.state_dict(keep_vars=True).items():
            t.copy_(tensors[f"modules.{p}"])


# --- files ---
def save_mixture(model_or_pipeline: Any, fusion: Any, path: str | os.PathLike, include_adapters: bool = True,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write the mixture (and, by default, its adapters) to one canonical safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {f"mixture/{k}": v for k, v in mixture_state_dict(fusion).items()}
    adapters: dict[str, dict[str, Any]] = {}
    for n in fusion.names:
        entries = {}
        for comp, model in components(model_or_pipeline).items():
            st = model_state(model)
            if st is None or n not in st.specs:
                continue
            entries[comp] = {"spec": st.specs[n].to_dict(), "modules": st.modules[n], "model_class": type(model).__name__}
            if include_adapters:
                prefix = f"adapter/{n}/{comp + '.' if comp else ''}"
                tensors.update({prefix + k: v for k, v in adapter_state_dict(model, n).items()})
        adapters[n] = entries
    embeddings = _bundle_embeddings(model_or_pipeline, fusion.names, tensors) if include_adapters else {}
    info = {"method": fusion.method.name, "options": _jsonable(vars(fusion.method.options)), "names": fusion.names,
            "digests": {n: adapter_digest(model_or_pipeline, n) for n in fusion.names},
            "adapters": adapters if include_adapters else {}, "embeddings": embeddings}
    meta = {**(metadata or {}), "format": canonical.FORMAT, "format_version": canonical.FORMAT_VERSION,
            "library_version": canonical.library_version(), META_KEY: json.dumps(info)}
    write_safetensors(Path(path), tensors, meta)
    log.info("saved %s mixture of %s to %s", fusion.method.name, fusion.names, path)
    return Path(path)


def _bundle_embeddings(obj: Any, names: list[str], tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each adapter's placeholder tokens (pivotal tuning) as ``adapter/<name>/bundle_emb.*``; {name: token names}."""
    from ..api import _placeholders
    from ..io import embeddings as emb_io

    out = {}
    for n in names:
        ph = _placeholders(obj, n)
        if ph:
            t, m = emb_io.bundle_tensors(obj, ph)
            tensors.update({f"adapter/{n}/{k}": v for k, v in t.items()})
            out[n] = m[emb_io.META_TOKENS]
    return out


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def read_info(meta: dict[str, str], path: str) -> dict[str, Any]:
    try:
        info = json.loads(meta[META_KEY])
        for k in ("method", "options", "names", "digests"):
            info[k]  # noqa: B018
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: metadata '{META_KEY}' is malformed ({e!r})") from None
    return info


def is_mixture(meta: dict[str, str]) -> bool:
    return canonical.is_canonical(meta) and META_KEY in meta


def load_mixture_weights(fusion: Any, model_or_pipeline: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Load a mixture file's classifier/gates into ``fusion`` (installed on the same adapters); returns its info."""
    tensors, meta = read_safetensors(path)
    if not is_mixture(meta):
        raise AdapterFileError(f"{path}: not a mixture file (no '{META_KEY}' metadata)")
    info = read_info(meta, str(path))
    if info["method"] != fusion.method.name:
        raise AdapterFileError(f"{path}: a {info['method']} mixture; the installed fusion is {fusion.method.name}")
    check_digests(str(path), info["digests"], {n: adapter_digest(model_or_pipeline, n) for n in fusion.names})
    load_mixture_state_dict(fusion, {k[len("mixture/"):]: v for k, v in tensors.items() if k.startswith("mixture/")},
                            str(path))
    return info


def load_mixture(model_or_pipeline: Any, path: Path, loaded: tuple[dict[str, torch.Tensor], dict[str, str]],
                 name: str | None = None) -> str:
    """Load every adapter of a mixture file, install the mixture with its learned weights; all or nothing."""
    from . import fuse, unfuse  # the registry lives in the package

    tensors, meta = loaded
    info = read_info(meta, str(path))
    if not info.get("adapters"):
        raise AdapterFileError(f"{path}: holds only the {info['method']} weights, not its adapters; load the "
                               f"adapters {info['names']}, fuse them and call load_mixture_weights")
    done: list[str] = []
    try:
        for n in info["names"]:
            _inject_adapter(model_or_pipeline, n, info["adapters"][n], tensors, str(path))
            done.append(n)
            _apply_embeddings(model_or_pipeline, n, info.get("embeddings", {}).get(n), tensors, str(path))
        check_digests(str(path), info["digests"], {n: adapter_digest(model_or_pipeline, n) for n in done})
        fusion = fuse(model_or_pipeline, done, method=info["method"], **info["options"])
        load_mixture_state_dict(fusion, {k[len("mixture/"):]: v for k, v in tensors.items()
                                         if k.startswith("mixture/")}, str(path))
    except BaseException:
        unfuse(model_or_pipeline)
        if done:
            remove_adapters(model_or_pipeline, done)
        raise
    log.info("loaded %s mixture of %s from %s", info["method"], done, path)
    return name or info["method"]


def _apply_embeddings(obj: Any, n: str, tokens: str | None, tensors: dict[str, torch.Tensor], src: str) -> None:
    """Adapter ``n``'s placeholder tokens onto a pipeline (a bare model has no tokenizer: skipped, logged)."""
    if not tokens:
        return
    from .. import embeddings as emb
    from ..io import embeddings as emb_io

    prefix = f"adapter/{n}/"
    _, raw = emb_io.split_bundle({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix + emb_io.BUNDLE)})
    if isinstance(obj, nn.Module):
        log.warning("%s: adapter '%s' carries token embeddings %s; load onto the pipeline to get them", src, n, sorted(raw))
        return
    emb.apply_embeddings(obj, n, emb_io.from_bundle(obj, raw, {emb_io.META_TOKENS: tokens}, src), src)


def _inject_adapter(obj: Any, n: str, entries: dict[str, Any], tensors: dict[str, torch.Tensor], src: str) -> None:
    from ..api import _target, load_adapter_state_dict
    from ..core.spec import AdapterSpec

    for comp, e in entries.items():
        model = _target(obj, comp, e["model_class"], src)
        if model_state(model) is not None and n in model_state(model).specs:
            raise AdapterError(f"{src}: an adapter named '{n}' is already loaded; remove it first")
        inject(model, AdapterSpec.from_dict(e["spec"]), n, 1.0, module_names=e["modules"])
        prefix = f"adapter/{n}/{comp + '.' if comp else ''}"
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "bundle_emb." not in k}
        load_adapter_state_dict(model, n, sd, src, assign=True)
        for _, layer in adapted_layers(model):
            if n in layer.adapters:
                for p in layer.adapters[n].parameters():
                    p.requires_grad_(False)


mixtures.register_file_kind(META_KEY, load_mixture)  # ``load_adapter`` of a mixture file lands in load_mixture
