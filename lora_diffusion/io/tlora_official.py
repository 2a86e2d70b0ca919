"""Checkpoints of the official T-LoRA code (github.com/ControlGenAI/T-LoRA, SDXL trainer), both directions.

The trainer replaces every UNet attention processor and saves them with diffusers' ``save_attn_procs``
(``checkpoint-N/pytorch_lora_weights.safetensors``); keys are ``<block>.attn1.processor.to_q_lora.<param>`` for
``to_q / to_k / to_v / to_out`` (-> ``to_out.0``):

- ``--trainer_type ortho_lora`` (full T-LoRA): ``q_layer.weight`` (r, in), ``p_layer.weight`` (out, r),
  ``lambda_layer`` (1, r) and their frozen init copies ``base_q.weight``, ``base_p.weight``, ``base_lambda``:
  ΔW_t = P diag(λ ⊙ m_t) Q − P0 diag(λ0 ⊙ m_t) Q0. Here: our ``tlora`` with ``frozen="stored"`` (the copies are
  read from the file, not regenerated from a seed).
- ``--trainer_type lora`` (vanilla T-LoRA): ``down.weight`` / ``up.weight``, ΔW_t = up · M_t · down; the same keys as
  diffusers' <= 0.14 attention-processor files (``old_diffusers.py`` reads those), made a vanilla T-LoRA when a
  schedule is known.

The FLUX trainer (``flux/train.py``) saves ``torch.save(AttnProcsLayers(transformer.attn_processors).state_dict())``
as ``checkpoint-N/lora.pt``: keys ``<transformer_blocks.N | single_transformer_blocks.N>.attn.processor.<p>_lora.
{down,up}.weight`` with p in to_q / to_k / to_v / to_out (-> ``to_out.0``) / to_q_proj / to_k_proj / to_v_proj (->
``add_q/k/v_proj``); vanilla T-LoRA layers only (up · M_t · down). Every processor gets all seven layers, but a
single-stream block's processor calls only to_q/k/v (no context, no to_out), so its other four are never used and are
skipped here. Read with ``torch.load(weights_only=True)`` (tensors only, no code). Its schedule: ``logs/hparams.yml``
two levels up (``tlora``, ``rank``, ``min_rank``; the mask from the scheduler's 0..1000 timesteps, as ours on Flux:
lora_diffusion/families.py); ``tlora: false`` is a plain LoRA (min_rank = rank).

No alpha: the adapter output is added with scale 1. The schedule r(t) = ⌊((T − t)/T)^α (r − r_min)⌋ + r_min comes
from the file's metadata (``tlora_*`` keys, written by ``write``) or the run's ``logs/hparams.yml`` two levels up
(``lora_rank``, ``min_rank``, ``alpha_rank_scale``, ``trainer_class``); without either, r_min = r/2 (the paper's) is
used and a warning says so.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..core.errors import AdapterFileError
from .bundle import Bundle, ModuleView, Part, spec_from_modules

log = logging.getLogger(__name__)
ORTHO = {"q_layer.weight": "lora_A", "p_layer.weight": "lora_B", "lambda_layer": "lora_S",
         "base_q.weight": "lora_A0", "base_p.weight": "lora_B0", "base_lambda": "lora_S0"}
VANILLA = {"down.weight": "lora_A", "up.weight": "lora_B"}
PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_KEY = re.compile(r"(?:unet\.)?(?P<block>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<param>.+)")
META = ("tlora_rank", "tlora_min_rank", "tlora_alpha_rank_scale", "tlora_trainer_type")


_FLUX_KEY = re.compile(r"(?:transformer\.)?(?P<block>(?:single_)?transformer_blocks\.\d+)\.attn\.processor\."
                       r"(?P<p>to_q|to_k|to_v|to_out|to_q_proj|to_k_proj|to_v_proj)_lora\."
                       r"(?P<param>down\.weight|up\.weight|q_layer\.weight|p_layer\.weight|lambda_layer|base_q\.weight|"
                       r"base_p\.weight|base_lambda)")
FLUX_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0", "to_q_proj": "add_q_proj",
             "to_k_proj": "add_k_proj", "to_v_proj": "add_v_proj"}
FLUX_FILE = "lora.pt"


def is_official(keys: list[str]) -> bool:
    return is_official_flux(keys) or any(k.endswith(("_lora.q_layer.weight", "_lora.lambda_layer")) for k in keys)


def is_official_flux(keys: list[str]) -> bool:
    return bool(keys) and all(_FLUX_KEY.fullmatch(k) for k in keys)


def flux_checkpoint(src: Path) -> Path | None:
    """The official FLUX trainer's ``lora.pt`` when ``src`` is that file or a ``checkpoint-N`` folder holding it."""
    if src.is_dir() and (src / FLUX_FILE).is_file() and not any(src.glob("*.safetensors")):
        return src / FLUX_FILE
    return src if src.is_file() and src.name == FLUX_FILE else None


def read_flux_pt(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of an official FLUX ``lora.pt`` (``weights_only``: a pickle that holds anything but tensors is
    refused, nothing in it runs)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterFileError(f"{path}: not a tensors-only torch file ({type(e).__name__}: {str(e).splitlines()[0]}); "
                               "expected the official T-LoRA FLUX checkpoint (checkpoint-N/lora.pt)") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise AdapterFileError(f"{path}: expected a dict of tensors (the official T-LoRA FLUX checkpoint)")
    if not is_official_flux(list(sd)):
        bad = next((k for k in sd if not _FLUX_KEY.fullmatch(k)), "<no tensors>")
        raise AdapterFileError(f"{path}: key '{bad}': not a key of the official T-LoRA FLUX checkpoint; expected "
                               "'transformer_blocks.N.attn.processor.to_q_lora.down.weight' and the like")
    return sd, {}


def schedule(meta: dict[str, str], src: Path | None) -> dict[str, Any] | None:
    """{"rank", "min_rank", "rank_exponent"} from ``tlora_*`` metadata or the run's logs/hparams.yml; None if neither."""
    if "tlora_min_rank" in meta:
        return {"rank": int(meta.get("tlora_rank", 0)), "min_rank": int(meta["tlora_min_rank"]),
                "rank_exponent": float(meta.get("tlora_alpha_rank_scale", 1.0))}
    hp = src.parent.parent / "logs" / "hparams.yml" if src is not None else None
    if hp is None or not hp.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(hp.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise AdapterFileError(f"{hp}: not a readable hparams.yml ({e}); expected the official trainer's log") from None
    if cfg.get("trainer_class") == "sdxl_lora":  # plain LoRA / Ortho-LoRA run: no mask
        return {"rank": int(cfg.get("lora_rank", 0)), "min_rank": int(cfg.get("lora_rank", 0)), "rank_exponent": 1.0}
    return {"rank": int(cfg.get("lora_rank", 0)), "min_rank": int(cfg.get("min_rank", 1)),
            "rank_exponent": float(cfg.get("alpha_rank_scale", 1.0))}


def read(tensors: dict[str, torch.Tensor], meta: dict[str, str], views: dict[str, ModuleView], src: Path) -> Bundle:
    """An ortho_lora (full T-LoRA) checkpoint -> one tlora Part on the UNet (FLUX checkpoint: ``read_flux``)."""
    if is_official_flux(list(tensors)):
        return read_flux(tensors, meta, views, src)
    if "unet" not in views:
        raise AdapterFileError(f"{src}: an official T-LoRA checkpoint adapts a UNet; the target has {sorted(views)}")
    view = views["unet"]
    by_mod: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None or m["param"] not in ORTHO:
            raise AdapterFileError(f"{src}: key '{key}': not a key of the official T-LoRA (ortho_lora) format; expected "
                                   f"'<block>.attn1.processor.to_q_lora.<param>' with param in {sorted(ORTHO)}")
        path = f"{m['block']}.{PROJ[m['p']]}"
        if path not in view:
            raise AdapterFileError(f"{src}: key '{key}': module '{path}' is not in the model (official T-LoRA format); "
                                   "expected an attention projection of its UNet")
        by_mod.setdefault(path, {})[ORTHO[m["param"]]] = (key, t)
    ranks, tensors_out, origin = {}, {}, {}
    for path, ps in by_mod.items():
        missing = [f for f, ours in ORTHO.items() if ours not in ps]
        if missing:
            raise AdapterFileError(f"{src}: module '{path}' lacks '{missing[0]}' (official T-LoRA format); expected "
                                   f"all of {sorted(ORTHO)}")
        ranks[path] = ps["lora_A"][1].shape[0]
        for ours, (key, t) in ps.items():
            tensors_out[f"{path}.{ours}"] = t.reshape(-1) if ours in ("lora_S", "lora_S0") else t
            origin[f"{path}.{ours}"] = key
    spec = tlora_spec(ranks, schedule(meta, src), src, ortho=True)
    return Bundle([Part("unet", spec, list(by_mod), tensors_out, origin)], dict(meta), "T-LoRA official (ortho_lora)")


def read_flux(tensors: dict[str, torch.Tensor], meta: dict[str, str], views: dict[str, ModuleView],
              src: Path) -> Bundle:
    """An official FLUX checkpoint -> one vanilla tlora Part on the transformer."""
    role = "transformer" if "transformer" in views else ("" if "" in views else None)
    if role is None:
        raise AdapterFileError(f"{src}: an official T-LoRA FLUX checkpoint adapts a Flux transformer; the target has "
                               f"{sorted(views)}")
    view = views[role]
    ortho = any(".q_layer." in k for k in tensors)  # the SDXL trainer's ortho_lora names on Flux processors
    names = ORTHO if ortho else VANILLA
    by_mod: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        m = _FLUX_KEY.fullmatch(key)
        assert m is not None  # is_official_flux
        path = f"{m['block']}.attn.{FLUX_PROJ[m['p']]}"
        if m["block"].startswith("single_") and m["p"] not in ("to_q", "to_k", "to_v"):
            continue  # created by the official processor, never called in a single-stream block
        if path not in view:
            raise AdapterFileError(f"{src}: key '{key}': module '{path}' is not in the model (official T-LoRA FLUX "
                                   "checkpoint); expected a Flux transformer with this block")
        if m["param"] not in names:
            raise AdapterFileError(f"{src}: key '{key}': a {'vanilla' if ortho else 'ortho'} T-LoRA parameter in a "
                                   f"{'ortho' if ortho else 'vanilla'} checkpoint; expected one of {sorted(names)}")
        by_mod.setdefault(path, {})[names[m["param"]]] = (key, t)
    ranks, out, origin = {}, {}, {}
    for path, ps in by_mod.items():
        missing = [f for f, ours in names.items() if ours not in ps]
        if missing:
            raise AdapterFileError(f"{src}: module '{path}' lacks '{missing[0]}' (official T-LoRA FLUX checkpoint); "
                                   f"expected all of {sorted(names)}")
        if _never_trained(ps):
            continue  # a layer the official processor creates but this run never changed (ΔW = 0 at every t)
        ranks[path] = ps["lora_A"][1].shape[0]
        for ours, (key, t) in ps.items():
            out[f"{path}.{ours}"] = t.reshape(-1) if ours in ("lora_S", "lora_S0") else t
            origin[f"{path}.{ours}"] = key
    spec = tlora_spec(ranks, flux_schedule(meta, src), src, ortho=ortho)
    return Bundle([Part(role, spec, list(ranks), out, origin)], dict(meta), "T-LoRA official FLUX (lora.pt)")


def _never_trained(ps: dict[str, tuple[str, torch.Tensor]]) -> bool:
    """up = 0 (vanilla; the official init), or P = P0 = 0 (ortho): ΔW_t = 0 at every timestep."""
    return all(not ps[k][1].any() for k in ("lora_B", "lora_B0") if k in ps)


def flux_schedule(meta: dict[str, str], src: Path) -> dict[str, Any] | None:
    """The FLUX run's schedule from ``tlora_*`` metadata or its logs/hparams.yml (``tlora``, ``rank``, ``min_rank``)."""
    if "tlora_min_rank" in meta:
        return schedule(meta, None)
    hp = src.parent.parent / "logs" / "hparams.yml"
    if not hp.is_file():
        return None
    import yaml

    try:
        cfg = yaml.safe_load(hp.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise AdapterFileError(f"{hp}: not a readable hparams.yml ({e}); expected the official trainer's log") from None
    rank = int(cfg.get("rank", 16))
    if not cfg.get("tlora", False):  # a plain LoRA run of the same trainer: no mask
        return {"rank": rank, "min_rank": rank, "rank_exponent": 1.0}
    return {"rank": rank, "min_rank": int(cfg.get("min_rank", 1)), "rank_exponent": 1.0}


def tlora_spec(ranks: dict[str, int], sched: dict[str, Any] | None, src: Path, ortho: bool) -> Any:
    r = max(ranks.values())
    if sched is None:
        log.warning("%s: no T-LoRA schedule in the metadata or ../../logs/hparams.yml; using min_rank = rank/2 = %d "
                    "(the paper's); pass the run's hparams.yml along to use its own", src, r // 2)
        sched = {"min_rank": r // 2, "rank_exponent": 1.0}
    options = {"min_rank": min(int(sched["min_rank"]), r), "rank_exponent": float(sched["rank_exponent"]),
               "ortho": ortho, "num_train_timesteps": 1000} | ({"frozen": "stored"} if ortho else {})
    return spec_from_modules("tlora", ranks, dict.fromkeys(ranks), options)


def as_vanilla_tlora(bundle: Bundle, sched: dict[str, Any], src: Path) -> Bundle:
    """A diffusers <= 0.14 attention-processor LoRA that is a vanilla T-LoRA checkpoint (a schedule is known)."""
    for part in bundle.parts:
        ranks = {m: part.spec.rank_for(m) for m in part.modules}
        part.spec = tlora_spec(ranks, sched, src, ortho=False)
    bundle.format = "T-LoRA official (vanilla lora)"
    return bundle


def _flat(path: str) -> tuple[str, str]:
    for p in ("to_q", "to_k", "to_v", "to_out.0"):
        if path.endswith("." + p):
            return path[: -len(p) - 1], p.removesuffix(".0")
    raise AdapterFileError(f"module '{path}': the official T-LoRA format adapts only attention to_q/to_k/to_v/to_out.0; "
                           "expected those targets (e.g. 'unet-attn')")


def with_frozen(part: Part, adapters: dict[str, Any]) -> Part:
    """A T-LoRA part with its frozen copies A0, B0, λ0 among the tensors and the scale s folded into B and B0."""
    tensors = dict(part.tensors)
    for m in part.modules:
        ad = adapters[m]
        with torch.no_grad():
            tensors[f"{m}.lora_B"] = ad.lora_B.detach() * ad.scaling
            if ad.cfg.options.ortho:
                tensors |= {f"{m}.lora_A0": ad.lora_A0, f"{m}.lora_B0": ad.lora_B0 * ad.scaling, f"{m}.lora_S0": ad.lora_S0}
    return Part(part.component, part.spec, list(part.modules), tensors, group=part.group)


def is_flux_part(parts: list[Part], views: dict[str, ModuleView]) -> bool:
    """A T-LoRA on a Flux transformer (a pipeline's or the bare model's): written in the official FLUX layout."""
    return any(p.component in ("transformer", "") and any(re.match(r"(single_)?transformer_blocks\.\d+\.", m)
                                                          for m in p.modules) for p in parts)


_FLUX_PATH = re.compile(r"(?P<block>(?:single_)?transformer_blocks\.\d+)\.attn\.(?P<proj>[a-z_.0]+)")


def write_flux(parts: list[Part], views: dict[str, ModuleView]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A Flux T-LoRA (from ``with_frozen``) -> the official FLUX processor keys, all seven layers of every block
    (the official ``AttnProcsLayers.load_state_dict`` is strict; layers not adapted here are zero: ΔW = 0) at one
    rank, and ``tlora_*`` metadata. Vanilla T-LoRA: ``down/up`` (what ``flux/train.py`` writes); Ortho T-LoRA: the
    SDXL trainer's ``q_layer/p_layer/lambda_layer`` + frozen copies, which the official FLUX code does not read (it
    has no ortho) but the layout-generic readers do (ours, bghira/ComfyUI-T-LoRA)."""
    part = _flux_part(parts)
    view = views.get(part.component, {})
    ortho, r = bool(part.spec.options.get("ortho", True)), part.spec.rank
    names = {v: k for k, v in (ORTHO if ortho else VANILLA).items()}
    blocks = sorted({m["block"] for p in view if (m := _FLUX_PATH.fullmatch(p)) and m["proj"] == "to_q"},
                    key=lambda b: (b.startswith("single_"), int(b.rsplit(".", 1)[1])))
    out: dict[str, torch.Tensor] = {}
    for block in blocks:
        inner = view[f"{block}.attn.to_q"].out_features
        for theirs, proj in FLUX_PROJ.items():
            m = f"{block}.attn.{proj}"
            for ours, param in names.items():
                t = part.tensors[f"{m}.{ours}"].detach().float() if m in part.modules else torch.zeros(
                    _zero_shape(ours, r, inner))
                out[f"{block}.attn.processor.{theirs}_lora.{param}"] = (
                    t[None] if ours in ("lora_S", "lora_S0") else t).contiguous()
    o = part.spec.options
    return out, {"tlora_rank": str(r), "tlora_min_rank": str(o.get("min_rank") if o.get("min_rank") is not None else r // 2),
                 "tlora_alpha_rank_scale": "1.0", "tlora_trainer_type": "ortho_lora" if ortho else "lora", "format": "pt"}


def _zero_shape(ours: str, r: int, inner: int) -> tuple[int, ...]:
    return (r,) if ours in ("lora_S", "lora_S0") else (r, inner) if ours in ("lora_A", "lora_A0") else (inner, r)


def _flux_part(parts: list[Part]) -> Part:
    """The one Flux T-LoRA part the official FLUX layout can hold: attention q/k/v/out and the context q/k/v
    projections (not ``to_add_out``: the official processor has no layer for it), one rank, r(t) without exponent."""
    part = parts[0]
    if len(parts) != 1 or part.spec.variant != "tlora":
        raise AdapterFileError(f"component '{part.component}' / variant '{part.spec.variant}': the official T-LoRA FLUX "
                               "layout holds one T-LoRA on the transformer; expected variant 'tlora' there only")
    allowed = set(FLUX_PROJ.values())
    for m in part.modules:
        hit = _FLUX_PATH.fullmatch(m)
        if not hit or hit["proj"] not in allowed or (hit["block"].startswith("single_") and hit["proj"] not in
                                                      ("to_q", "to_k", "to_v")):
            raise AdapterFileError(f"module '{m}': the official T-LoRA FLUX layout adapts only attention to_q/to_k/"
                                   "to_v/to_out.0 and add_q/k/v_proj of the joint blocks (to_q/k/v of the single "
                                   "blocks); expected those targets (e.g. targets=['re:.*attn\\.(to_[qkv]|to_out\\.0|"
                                   "add_[qkv]_proj)'])")
    ranks = {part.spec.rank_for(m) for m in part.modules}
    if len(ranks) != 1 or ranks != {part.spec.rank}:
        raise AdapterFileError(f"ranks {sorted(ranks)}: the official T-LoRA FLUX layout has one rank for every layer; "
                               "expected one rank")
    if float(part.spec.options.get("rank_exponent", 1.0)) != 1.0:
        raise AdapterFileError(f"rank_exponent {part.spec.options['rank_exponent']}: the official T-LoRA FLUX schedule "
                               "r(t) = ⌊(1000 - t)/1000 · (r - r_min)⌋ + r_min has no exponent; expected 1")
    return part


def flux_hparams(meta: dict[str, str], folder: Path) -> str:
    """The logs/hparams.yml the official FLUX ``run_inference.py --exp <folder> --checkpoint_idx 0`` reads."""
    token, _, cls = (meta.get("trigger_word") or "sks").partition(" ")
    return json.dumps({
        "tlora": int(meta["tlora_min_rank"]) < int(meta["tlora_rank"]), "rank": int(meta["tlora_rank"]),
        "min_rank": int(meta["tlora_min_rank"]), "output_dir": str(folder.resolve()), "exp_name": folder.name,
        "pretrained_model_name_or_path": meta.get("base_model") or "black-forest-labs/FLUX.1-dev",
        "placeholder_token": token, "class_name": cls}, indent=1) + "\n"


def write(parts: list[Part], views: dict[str, ModuleView]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """T-LoRA parts (from ``with_frozen``: UNet attention projections) -> official keys and ``tlora_*`` metadata."""
    if is_flux_part(parts, views):
        return write_flux(parts, views)
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        if part.component != "unet" or part.spec.variant != "tlora":
            raise AdapterFileError(f"component '{part.component}' / variant '{part.spec.variant}': the official T-LoRA "
                                   "format holds a UNet T-LoRA only; expected variant 'tlora' on the UNet")
        ortho = part.spec.options.get("ortho", True)
        names = {v: k for k, v in (ORTHO if ortho else VANILLA).items()}
        for m in part.modules:
            info = views.get("unet", {}).get(m)
            if info is not None and info.kind != "linear":
                raise AdapterFileError(f"module '{m}': the official T-LoRA format holds Linear layers only")
            block, proj = _flat(m)
            for ours, theirs in names.items():
                t = part.tensors[f"{m}.{ours}"].detach().float()
                out[f"{block}.processor.{proj}_lora.{theirs}"] = (t[None] if ours in ("lora_S", "lora_S0") else t).contiguous()
    spec = parts[0].spec
    o, r = spec.options, spec.rank
    min_rank = o.get("min_rank") if o.get("min_rank") is not None else r // 2
    meta = {"tlora_rank": str(r), "tlora_min_rank": str(min_rank), "tlora_alpha_rank_scale": str(o.get("rank_exponent", 1.0)),
            "tlora_trainer_type": "ortho_lora" if o.get("ortho", True) else "lora", "format": "pt"}
    return out, meta


def hparams(meta: dict[str, str], folder: Path) -> str:
    """The logs/hparams.yml the official ``inference.py --config_path … --checkpoint_idx 0`` reads: the schedule, the
    trainer choice, and the keys its inferencer looks up (output_dir, base model, revision, placeholder token)."""
    return json.dumps({
        "trainer_class": "sdxl_tlora", "trainer_type": meta["tlora_trainer_type"], "lora_rank": int(meta["tlora_rank"]),
        "min_rank": int(meta["tlora_min_rank"]), "alpha_rank_scale": float(meta["tlora_alpha_rank_scale"]),
        "sig_type": "last", "output_dir": str(folder.resolve()), "exp_name": folder.name,
        "pretrained_model_name_or_path": meta.get("base_model") or "stabilityai/stable-diffusion-xl-base-1.0",
        "revision": None, "placeholder_token": meta.get("trigger_word") or "sks"}, indent=1) + "\n"
