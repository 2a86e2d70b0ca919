"""Format dispatch: find the file (path, folder or cached hub repo), detect its format, convert to/from a Bundle."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..core.errors import AdapterFileError
from . import cloneofsimo, diffusers_format, dit, kohya, lycoris_dit, old_diffusers, peft_format, tlora_official
from .bundle import FAMILY_NAMES, Bundle, ModuleView, Part, spec_from_modules
from .detect import detect_format
from .files import read_safetensors, write_safetensors

log = logging.getLogger(__name__)
TLORA_OFFICIAL = "tlora-official"
BFL = "bfl"  # BFL / ai-toolkit / ComfyUI: diffusion_model.<original module>.<param> (Flux.1, Flux.2 transformers)
FORMATS = ("canonical", "kohya", "diffusers", "peft", TLORA_OFFICIAL, BFL)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve(path_or_repo: str | os.PathLike) -> Path:
    """A local file/folder, or a Hugging Face repo id found in the local cache (never downloads)."""
    p = Path(path_or_repo)
    if p.exists():
        return p
    s = str(path_or_repo)
    if _REPO_ID.fullmatch(s) and ".." not in s and not s.endswith(".safetensors"):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, local_files_only=True))
        except Exception as e:
            raise AdapterFileError(f"{s}: not a local file or folder, and the Hugging Face repo '{s}' is not in the local "
                                   f"cache ({type(e).__name__}); this library works offline: download it first "
                                   f"(huggingface-cli download {s}) or pass a file path") from None
    raise AdapterFileError(f"{s}: no such file or folder")


def weights_file(folder: Path) -> Path:
    """The adapter file inside a folder (diffusers' pytorch_lora_weights, or the only .safetensors)."""
    for name in ("pytorch_lora_weights.safetensors", peft_format.WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise AdapterFileError(f"{folder}: expected one .safetensors adapter file (or a PEFT folder), found "
                               f"{[f.name for f in files] or 'none'}")
    return files[0]


def is_peft_folder(p: Path) -> bool:
    return p.is_dir() and ((p / peft_format.CONFIG).is_file() or any(p.glob(f"*/{peft_format.CONFIG}")))


def read_bundle(src: Path, views: dict[str, ModuleView], unet_config: Any = None,
                loaded: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None, bare: bool = False,
                models: dict[str, Any] | None = None) -> Bundle:
    """Any non-canonical adapter file or folder -> Bundle on the modules of ``views`` (``models``: the components
    themselves, for formats that number layers by a traversal of the model: cloneofsimo/lora)."""
    if is_peft_folder(src):
        with named_format("PEFT folder"):
            return peft_format.read_folder(src, views)
    tensors, meta = loaded or read_safetensors(src)
    fmt = detect_format(list(tensors), meta)
    with named_format(FORMAT_NAMES.get(fmt, fmt)):
        return _read(src, fmt, tensors, meta, views, unet_config, bare, models)


FORMAT_NAMES = {"kohya": "kohya/LyCORIS", "lycoris": "LyCORIS network", "diffusers": "diffusers", "peft": "PEFT",
                "cloneofsimo": cloneofsimo.FORMAT, "xlabs": "XLabs (Flux)", "comfy-dit": "ComfyUI (diffusion_model.…)",
                "tlora-official": "official T-LoRA", "old-diffusers": "old diffusers (< 0.21)"}


@contextlib.contextmanager
def named_format(name: str) -> Iterator[None]:
    """Every refusal of a reader names the format it recognized (once)."""
    try:
        yield
    except AdapterFileError as e:
        if "format:" in str(e) or "unknown adapter format" in str(e):
            raise
        raise AdapterFileError(f"{e} [format: {name}]") from None


def _read(src: Path, fmt: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], views: dict[str, ModuleView],
          unet_config: Any, bare: bool, models: dict[str, Any] | None) -> Bundle:
    transformer = (models or {}).get(dit.TRANSFORMER)
    family = dit.FAMILY_OF_CLASS.get(type(transformer).__name__)
    if fmt in ("xlabs", "comfy-dit") and family is None:
        raise AdapterFileError(f"{src}: a {FORMAT_NAMES[fmt]} file adapts a Flux/SD3 transformer; the target has "
                               f"{sorted(views)}; expected a Flux or SD3 pipeline or its transformer")
    if family is not None and fmt in ("kohya", "xlabs", "comfy-dit"):
        tensors = dit.to_kohya(tensors, family, transformer.config, views, str(src))
        fmt = "kohya"
    if fmt == "kohya":
        return _lycoris_tlora(kohya.read(tensors, meta, views, str(src), unet_config, skip_components=bare), models, src)
    if fmt == "diffusers":
        return diffusers_format.read(tensors, meta, views, str(src))
    if fmt == "lycoris":
        return _lycoris_tlora(lycoris_dit.read(tensors, meta, views, str(src)), models, src)
    if fmt == "peft":
        return peft_format.read_folder(src.parent, views) if (src.parent / peft_format.CONFIG).is_file() else \
            Bundle([peft_format.parts_from_state_dict({k.removeprefix(peft_format.PREFIX): v for k, v in tensors.items()},
                                                      None, next(iter(views), ""), next(iter(views.values()), {}),
                                                      str(src), peft_format.PREFIX)], meta, "peft")
    if fmt == "cloneofsimo":
        if models is None:
            raise AdapterFileError(f"{src}: a cloneofsimo lora file numbers layers by a traversal of the model; "
                                   "expected the model (load_adapter) or a --base family (convert)")
        return cloneofsimo.read(cloneofsimo.split_embeds(tensors, meta)[0], meta, models, str(src), bare)
    if fmt == "tlora-official":
        return tlora_official.read(tensors, meta, views, src)
    if fmt == "old-diffusers":
        bundle = old_diffusers.read(tensors, meta, views, str(src))
        sched = tlora_official.schedule(meta, src)  # the official vanilla T-LoRA checkpoint has these keys
        return tlora_official.as_vanilla_tlora(bundle, sched, src) if sched is not None else bundle
    key = next(iter(tensors), "<no tensors>")
    raise AdapterFileError(f"{src}: key '{key}': unknown adapter format (not a lora-diffusion canonical file either: "
                           f"metadata 'format' is {meta.get('format')!r}); expected kohya ('lora_unet_…', 'lora_te…'), "
                           "diffusers ('unet.….lora_A.weight'), PEFT ('base_model.model.…') or lora-diffusion canonical keys")


def _lycoris_tlora(bundle: Bundle, models: dict[str, Any] | None, src: Path) -> Bundle:
    """LyCORIS tlora parts: the schedule (``kohya.tlora_schedule``) and the frozen copies from the base weights."""
    for part in [p for p in bundle.parts if p.spec.variant == "tlora"]:
        model = (models or {}).get(part.component)
        ranks = [part.spec.rank_for(m) for m in part.modules]
        options = kohya.tlora_schedule(bundle.metadata)
        stored = "min_rank" in options
        options.setdefault("min_rank", min(ranks))  # no schedule stored: full rank, as LyCORIS without a mask
        part.spec = dataclasses.replace(part.spec, options=options)
        for m in part.modules:
            w = model.get_submodule(m).weight if model is not None else None
            if w is None or w.is_meta:
                raise AdapterFileError(f"{src}: key '{part.origin.get(m + '.lora_A', m)}': a LyCORIS T-LoRA module's "
                                       "frozen copies are rebuilt from the base weight, which is not loaded here; "
                                       "expected load_adapter on a model with its weights")
            part.tensors |= {f"{m}.{k}": v for k, v in kohya.base_from_weight(w, part.spec.rank_for(m)).items()}
        if not stored:
            log.warning("%s: LyCORIS T-LoRA without a stored schedule: full rank at every timestep (as LyCORIS without "
                        "a mask); ss_network_args min_rank / alpha_rank_scale set one", src)
    return bundle


def exact_rank(down: torch.Tensor, up: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of rank r > ``limit`` = min(out, fan_in) re-factored at rank ``limit`` with the same product.

    up·down has rank <= limit, so its SVD truncated to ``limit`` triplets is exact (float64, up to rounding):
    down' = √S·Vᵀ, up' = U·√S, in the factors' conv layouts (r, in, *k) and (out, r, 1, 1).
    """
    if down.shape[0] <= limit:
        return down, up
    dw = up.flatten(1).double() @ down.flatten(1).double()  # (out, fan_in)
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    root = s[:limit].sqrt()
    d = (root[:, None] * vh[:limit]).to(down.dtype).reshape(limit, *down.shape[1:])
    p = (u[:, :limit] * root).to(up.dtype).reshape(up.shape[0], limit, *up.shape[2:])
    return d.contiguous(), p.contiguous()


def lowrank_form(ad: Any) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(down (r, in, *k), up (out, r, *1), s) with ΔW = s·up·down (full rank, no timestep mask) for variants that
    are low-rank products: their own ``lowrank_factors()``, VeRA, T-LoRA, plain LoRA; None for the others."""
    from ..variants.lora import LoRA

    if hasattr(ad, "lowrank_factors"):  # variants with their own low-rank form (SingLoRA, DyLoRA, AdaLoRA, ...)
        return ad.lowrank_factors()
    if ad.variant == "vera":
        a, b = ad._projections(ad.dtype)
        return ad.vera_lambda_d[:, None] * a, ad.vera_lambda_b[:, None] * b, 1.0
    if ad.variant == "tlora" and hasattr(ad, "lora_S"):  # full T-LoRA: [B·S, −B0·S0] [A; A0]
        sv = ad.lora_S.view(1, -1, *([1] * (ad.lora_B.dim() - 2)))
        s0 = ad.lora_S0.view_as(sv)
        return torch.cat([ad.lora_A, ad.lora_A0]), torch.cat([ad.lora_B * sv, -ad.lora_B0 * s0], dim=1), ad.scaling
    if ad.variant == "tlora" or (isinstance(ad, LoRA) and type(ad).delta_weight is LoRA.delta_weight):
        return ad.lora_A, ad.lora_B, ad.scaling  # vanilla T-LoRA (full mask), LoRA, rsLoRA, LoRA-FA
    return None


def plain_lora(part: Part, adapters: dict[str, Any]) -> Part:
    """T-LoRA (full rank, no timestep mask) or VeRA as an exactly equal plain LoRA, for formats without them.

    T-LoRA: ΔW = s·(B diag(S) A − B0 diag(S0) A0) = s'·[B·S, −B0·S0] [A; A0], rank 2r, at most min(out, in)
    (``exact_rank``: an SVD of the product when 2r exceeds it, so the file reloads on its own model), alpha = s·rank.
    VeRA: ΔW = (λb ⊙ B_s)(λd ⊙ A_s), rank r, alpha = r.
    """
    ranks, alphas, tensors = {}, {}, {}
    for m in part.modules:
        ad = adapters[m]
        with torch.no_grad():
            form = lowrank_form(ad)
            down, up, s = form if form is not None else (ad.lora_A, ad.lora_B, ad.scaling)
            down, up = exact_rank(down, up, min(ad.info.out_features, ad.info.fan_in))
        r = down.shape[0]
        ranks[m], alphas[m] = r, s * r
        tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"] = down.detach().clone(), up.detach().clone()
    return Part(part.component, spec_from_modules("lora", ranks, alphas), list(part.modules), tensors, group=part.group)


def _row_windows(parts: list[Part], fmt: str) -> dict[str, torch.Tensor]:
    """A LoKr read from a fused module it does not split on (``row_offset``: BFL ``img_attn.qkv``) has its rows of
    W1 ⊗ W2: the original layouts (kohya, bfl) fuse the parts back (``dit.fuse_lokr``, given their offsets here); the
    other external formats name no such part."""
    out: dict[str, torch.Tensor] = {}
    for p in parts:
        off = (p.spec.options or {}).get("row_offset")
        if off is None:
            continue
        if fmt not in ("kohya", BFL) or p.component != dit.TRANSFORMER:
            raise AdapterFileError(
                f"module '{p.modules[0]}': a LoKr on part of a fused module (rows from {off} of W1 ⊗ W2, as read from "
                f"a BFL/kohya file) has no {fmt} form; expected format='kohya' or 'bfl' (the fused module), the "
                "canonical format (save_adapter's default), or the original file")
        out |= {f"{dit.flat(dit.OT_PREFIX, m)}.{kohya.ROW_OFFSET}": torch.tensor(off) for m in p.modules}
    return out


def _original_layout(tensors: dict[str, torch.Tensor], fmt: str, family: str | None, unet_config: Any,
                     views: dict[str, ModuleView]) -> dict[str, torch.Tensor]:
    """kohya tensors on diffusers names -> the original (BFL / Stability) module names: kohya's ``lora_unet_…`` or,
    for ``bfl``, ``diffusion_model.<dotted>`` (``dit.to_bfl``)."""
    if family not in ("flux", "flux2", "sd3") or dit.TRANSFORMER not in views:
        if fmt == BFL:
            raise AdapterFileError(f"format 'bfl' names the modules of a Flux.1 / Flux.2 transformer; the adapter is on "
                                   f"{sorted(views)} of a {family or 'unknown'} model; expected format='kohya'")
        return tensors
    ot = {k: v for k, v in tensors.items() if k.startswith(dit.OT_PREFIX + "_")}
    targets, swapped = dit.family_map(family, unet_config)
    original = dit.from_onetrainer(ot, targets, swapped, views[dit.TRANSFORMER])
    rest = {k: v for k, v in tensors.items() if k not in ot}
    if fmt != BFL:
        return rest | original
    if rest or family == "sd3":
        raise AdapterFileError(f"key '{next(iter(rest), 'lora_unet')}': format 'bfl' holds a Flux.1 / Flux.2 "
                               "transformer's adapter only (no text encoders, not SD3); expected format='kohya'")
    return dit.to_bfl(original, targets, peft_names=family == "flux2")


def write_parts(path: Path, parts: list[Part], fmt: str, views: dict[str, ModuleView], meta: dict[str, str],
                family: str | None = None, unet_config: Any = None,
                shared: dict[str, dict[str, torch.Tensor]] | None = None,
                extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Parts -> a kohya / diffusers file or a PEFT folder (canonical files are written by ``api.save_adapter``)."""
    windows = _row_windows(parts, fmt)
    main = parts[0].spec
    meta = {"variant": main.variant, "rank": str(main.rank), "alpha": str(main.alpha if main.alpha is not None else main.rank),
            **({"base_model_family": family} if family else {}), **meta}
    if fmt in ("kohya", BFL):
        tensors = kohya.write(parts, family, unet_config, views) | windows
        tensors = _original_layout(tensors, fmt, family, unet_config, views)  # the names kohya/ComfyUI/BFL read
        tensors |= extra_tensors or {}
        write_safetensors(path, tensors, kohya.metadata(parts, family, meta))
    elif fmt == "diffusers":
        tensors, dmeta = diffusers_format.write(parts, views)
        write_safetensors(path, tensors, {**meta, **dmeta})
    elif fmt == "peft":
        peft_format.write_folder(path, parts, views, meta, shared)
    elif fmt == TLORA_OFFICIAL:
        path = write_official(path, parts, views, meta)
    else:
        raise AdapterFileError(f"{path}: format {fmt!r}; expected kohya, diffusers, peft, {TLORA_OFFICIAL} or {BFL}")
    return path


def write_official(path: Path, parts: list[Part], views: dict[str, ModuleView], meta: dict[str, str]) -> Path:
    """A ``.safetensors`` path: that file; a folder: the official run layout its ``inference.py`` reads,
    ``checkpoint-0/pytorch_lora_weights.safetensors`` + ``logs/hparams.yml``. Returns the weights file."""
    family = meta.get("base_model_family")
    if tlora_official.is_flux_part(parts, views) and family not in (None, "flux"):
        raise AdapterFileError(f"{path}: a T-LoRA on a {FAMILY_NAMES.get(family, family)} transformer; the official "
                               "T-LoRA layouts are for SDXL UNets and Flux.1 transformers; expected the canonical format")
    tensors, tmeta = tlora_official.write(parts, views)
    meta = {k: v for k, v in meta.items() if k not in ("variant", "rank", "alpha")} | tmeta
    if path.suffix == ".safetensors":
        write_safetensors(path, tensors, meta)
        return path
    flux = tlora_official.is_flux_part(parts, views)
    if flux:  # flux/train.py: torch.save(AttnProcsLayers(...).state_dict(), checkpoint-N/lora.pt)
        weights = path / "checkpoint-0" / tlora_official.FLUX_FILE
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, weights.with_suffix(".tmp"))
        weights.with_suffix(".tmp").replace(weights)
    else:
        weights = path / "checkpoint-0" / "pytorch_lora_weights.safetensors"
        write_safetensors(weights, tensors, meta)
    hp = path / "logs" / "hparams.yml"
    hp.parent.mkdir(parents=True, exist_ok=True)
    tmp = hp.with_suffix(".tmp")
    tmp.write_text((tlora_official.flux_hparams if flux else tlora_official.hparams)(meta, path))
    tmp.replace(hp)
    return weights
