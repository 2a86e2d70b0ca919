"""kohya-ss / A1111 / Civitai LoRA and LoCon, and LyCORIS LoHa / LoKr (+ ``dora_scale``) files.

Keys are ``<prefix>_<module path with '.' -> '_'>.<param>``, prefixes ``lora_unet`` / ``lora_te`` (SD1/2) /
``lora_te1`` + ``lora_te2`` (SDXL). SDXL UNet paths are SGM names (``input_blocks.4.1...``, see ``sgm.py``).
Flat names are mapped back to module paths by matching the model's own module names (both spellings
for the UNet), never by string surgery. Scale = alpha/rank per module; no ``.alpha`` key means alpha = rank.
LyCORIS LoHa/LoKr tensors keep their names (ours are LyCORIS'); LoKr options (factor, decomposition,
Tucker) are inferred per module from the shapes. Tucker LoCon (``lora_mid``) is folded into ``lora_down``
(exact). A file mixing variants (or option sets) becomes one Part per group (see docs/formats.md).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import AdapterFileError
from ..core.layerinfo import LayerInfo
from ..core.registry import parse_options
from ..core.spec import ModuleConfig
from ..variants.lokr import LoKr, lokr_shapes
from .bundle import TEXT_MODEL, Bundle, ModuleView, Part, most_common, spec_from_modules
from .peft_format import bake_scale, lora_scales
from .sgm import to_sgm

log = logging.getLogger(__name__)

PREFIX_ROLE = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3",
               "lora_te": "text_encoder", "lora_transformer": "transformer"}  # lora_transformer: OneTrainer's DiT
LORA_NAMES = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B"}  # file -> ours
LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ROW_OFFSET = "lokr_row_offset"  # internal (io/dit.py): a fused module's part is rows [o, o + out) of W1 ⊗ W2
EXTRA_NAMES = ("alpha", "dora_scale", "lora_mid.weight")
UNSUPPORTED = {"diff": "full fine-tune (diff)", "diff_b": "full fine-tune (diff)", "on_input": "IA3", "weight": "IA3",
               "oft_blocks": "OFT", "oft_diag": "BOFT/OFT", "a1.weight": "GLoRA", "w_norm": "norm", "b_norm": "norm"}
TLORA_NAMES = {"q_layer.weight": "lora_A", "p_layer.weight": "lora_B", "lambda_layer": "lora_S"}  # LyCORIS tlora


@dataclass
class _Module:
    role: str
    path: str
    variant: str
    rank: int
    alpha: float | None
    tensors: dict[str, torch.Tensor]  # our param names
    origin: dict[str, str]  # our param name -> file key
    candidates: list[dict[str, Any]] = field(default_factory=lambda: [{}])  # option sets that fit the shapes
    dora: bool = False


def name_index(views: dict[str, ModuleView], unet_config: Any = None) -> dict[str, tuple[str, str]]:
    """kohya flat name (both UNet spellings) -> (component, module path)."""
    idx: dict[str, tuple[str, str]] = {}
    for role, view in views.items():
        prefixes = [p for p, r in PREFIX_ROLE.items() if r == role]
        for path in view:
            for p in prefixes:
                idx[f"{p}_{path.replace('.', '_')}"] = (role, path)
                if role.startswith("text_encoder") and not path.startswith(TEXT_MODEL):  # kohya's (transformers < 5) spelling
                    idx[f"{p}_text_model_{path.replace('.', '_')}"] = (role, path)
            if role == "unet" and unet_config is not None:
                sgm = to_sgm(path, unet_config)
                if sgm:
                    idx.setdefault(f"lora_unet_{sgm.replace('.', '_')}", (role, path))
    return idx


def _err(src: str, key: str, what: str) -> AdapterFileError:
    return AdapterFileError(f"{src}: key '{key}': {what}")


def _expect(src: str, key: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` with ``shape``; a (r, in) <-> (r, in, 1, 1) difference (1x1 conv vs linear) is reshaped."""
    if tuple(t.shape) == shape:
        return t
    if t.numel() == math.prod(shape) and [d for d in t.shape if d != 1] == [d for d in shape if d != 1]:
        return t.reshape(shape)
    raise _err(src, key, f"shape {tuple(t.shape)} does not fit the model; expected {shape}")


def _parse_lora(src: str, flat: str, ts: dict[str, torch.Tensor], info: LayerInfo) -> tuple[str, int, dict, dict, list]:
    down, up = ts.get("lora_down.weight"), ts.get("lora_up.weight")
    if down is None or up is None:
        missing = "lora_down.weight" if down is None else "lora_up.weight"
        raise _err(src, f"{flat}.{missing}", "missing; a LoRA module needs both lora_down.weight and lora_up.weight")
    r = down.shape[0]
    k1 = (1,) * info.ndim_kernel
    if "lora_mid.weight" in ts:  # Tucker LoCon: fold the core into down (exact): down'[m] = sum_n mid[m, n] * down[n]
        mid = _expect(src, f"{flat}.lora_mid.weight", ts["lora_mid.weight"], (r, r, *info.kernel_size))
        d2 = _expect(src, f"{flat}.lora_down.weight", down, (r, info.in_features, *k1)).flatten(1)
        down = torch.einsum("m n k l, n j -> m j k l", mid.float(), d2.float()).to(down.dtype)
    down = _expect(src, f"{flat}.lora_down.weight", down, (r, info.in_features, *info.kernel_size))
    up = _expect(src, f"{flat}.lora_up.weight", up, (info.out_features, r, *k1))
    origin = {"lora_A": f"{flat}.lora_down.weight", "lora_B": f"{flat}.lora_up.weight"}
    return "lora", r, {"lora_A": down, "lora_B": up}, origin, [{}]


def _parse_loha(src: str, flat: str, ts: dict[str, torch.Tensor], info: LayerInfo) -> tuple[str, int, dict, dict, list]:
    tucker = "hada_t1" in ts
    if tucker and not (info.kind == "conv2d" and any(k != 1 for k in info.kernel_size)):
        raise _err(src, f"{flat}.hada_t1", f"a Tucker core, but the module is a {info.kind} {info.weight_shape}; "
                   "expected a conv with a kernel larger than 1x1")
    r = ts["hada_t1"].shape[0] if tucker else ts["hada_w1_b"].shape[0] if "hada_w1_b" in ts else 0
    names = LOHA_NAMES if tucker else LOHA_NAMES[:4]
    missing = [n for n in names if n not in ts]
    if missing or r == 0:
        raise _err(src, f"{flat}.{missing[0] if missing else 'hada_w1_b'}", f"missing; a LoHa module needs {list(names)}")
    return "loha", r, {n: ts[n] for n in names}, {n: f"{flat}.{n}" for n in names}, [{"use_tucker": tucker}] + (
        [] if tucker else [{"use_tucker": True}] if not any(k != 1 for k in info.kernel_size) else [])


def _lokr_found(src: str, flat: str, ts: dict[str, torch.Tensor], info: LayerInfo) -> tuple[int, tuple]:
    kk = math.prod(info.kernel_size)
    try:
        full_w1, full_w2, tucker = "lokr_w1" in ts, "lokr_w2" in ts, "lokr_t2" in ts
        a, c = ts["lokr_w1"].shape[:2] if full_w1 else (ts["lokr_w1_a"].shape[0], ts["lokr_w1_b"].shape[1])
        if full_w2:
            b, d = ts["lokr_w2"].shape[:2]
        elif tucker:
            b, d = ts["lokr_w2_a"].shape[1], ts["lokr_w2_b"].shape[1]
        else:
            b, d = ts["lokr_w2_a"].shape[0], ts["lokr_w2_b"].shape[1] // kk
    except KeyError as e:
        raise _err(src, f"{flat}.{e.args[0]}", "missing; a LoKr module needs lokr_w1 (or lokr_w1_a/_b) and lokr_w2 "
                   "(or lokr_w2_a/_b [+ lokr_t2])") from None
    # both factors full: LyCORIS stores alpha = lora_dim (ignored, scale 1); that rank also reproduces its full/low-rank choice
    alpha = float(ts["alpha"].float().item()) if "alpha" in ts else 1.0
    r = ts["lokr_w1_a"].shape[1] if not full_w1 else (ts["lokr_t2"].shape[0] if tucker else
                                                     ts["lokr_w2_a"].shape[1] if not full_w2 else max(1, round(alpha)))
    return r, (a, b, c, d, full_w1, full_w2, tucker)


def _parse_lokr(src: str, flat: str, ts: dict[str, torch.Tensor], info: LayerInfo) -> tuple[str, int, dict, dict, list]:
    if ROW_OFFSET in ts:  # a part of a LoKr on a fused module (io/dit.py split_module): rows of W1 ⊗ W2
        ts = dict(ts)
        off = int(ts.pop(ROW_OFFSET))
        r, _ = _lokr_found(src, flat, ts, info)
        variant, r, tensors, origin, cands = _lokr_explicit(src, flat, ts, info, r, [n for n in LOKR_NAMES if n in ts],
                                                            off)
        return variant, r, tensors, origin, cands
    r, want = _lokr_found(src, flat, ts, info)
    a, b, c, d = want[:4]
    cands = []
    for factor in dict.fromkeys([-1, a, b, c, d]):
        for unbal in (False, True):
            for both in (False, True):
                for tuck in (False, True):
                    for full in (False, True):
                        opts = {"factor": factor, "decompose_both": both, "use_tucker": tuck, "full_matrix": full,
                                "unbalanced_factorization": unbal}
                        sh = lokr_shapes(info, ModuleConfig(flat, r, r, 0.0, False, 0, parse_options(LoKr, opts)))
                        if (sh.a, sh.b, sh.c, sh.d, sh.full_w1, sh.full_w2, sh.tucker) == want:
                            cands.append(opts)
    names = [n for n in LOKR_NAMES if n in ts]
    if not cands:  # a layout no current LyCORIS option set makes (pre-release files): take it from the tensors
        return _lokr_explicit(src, flat, ts, info, r, names)
    return "lokr", r, {n: ts[n] for n in names}, {n: f"{flat}.{n}" for n in names}, cands


def _lokr_explicit(src: str, flat: str, ts: dict[str, torch.Tensor], info: LayerInfo, r: int,
                   names: list[str], row_offset: int | None = None) -> tuple[str, int, dict, dict, list]:
    """W1 (a, c) and W2 (b, d) as matrices over (out, fan_in), ΔW = (W1 ⊗ W2).reshape(weight.shape) (A1111/ComfyUI);
    with ``row_offset`` o: ΔW = (W1 ⊗ W2)[o : o + out] (a part of a fused module)."""
    if "lokr_t2" in ts:
        raise _err(src, f"{flat}.lokr_t2", "a Tucker LoKr core in a factor layout no LyCORIS option set makes; "
                   f"expected W2 with its kernel (b, d, kh, kw) for the module {info.weight_shape}")
    w1 = ts["lokr_w1"].flatten(1) if "lokr_w1" in ts else None
    w2 = ts["lokr_w2"].flatten(1) if "lokr_w2" in ts else None
    a, c = w1.shape if w1 is not None else (ts["lokr_w1_a"].shape[0], ts["lokr_w1_b"].flatten(1).shape[1])
    b, d = w2.shape if w2 is not None else (ts["lokr_w2_a"].shape[0], ts["lokr_w2_b"].flatten(1).shape[1])
    rows = info.out_features + (row_offset or 0)
    if (a * b != rows if row_offset is None else a * b < rows) or c * d != info.fan_in:
        raise _err(src, f"{flat}.{names[0]}", f"LoKr factors W1 ({a}x{c}) and W2 ({b}x{d}) give a ({a * b}x{c * d}) "
                   f"Kronecker product; expected out·fan_in = {info.out_features}x{info.fan_in} for the module "
                   f"{info.weight_shape}" + (f" (from row {row_offset})" if row_offset else ""))
    tensors = {n: ts[n].flatten(1) if n in ("lokr_w1", "lokr_w2", "lokr_w1_b", "lokr_w2_b") else ts[n] for n in names}
    opts = {"shape": [a, b, c, d], "decompose_both": w1 is None, "full_matrix": w2 is not None}
    if row_offset is not None:
        opts["row_offset"] = row_offset
    return "lokr", r, tensors, {n: f"{flat}.{n}" for n in names}, [opts]


def _parse_tlora(src: str, flat: str, ts: dict[str, torch.Tensor], info: LayerInfo) -> tuple[str, int, dict, dict, list]:
    """LyCORIS ``tlora`` (TLoraModule): Q (r, in), P (out, r), λ (1, r); its frozen copies are not in the file (LyCORIS
    rebuilds them at load from the principal SVD triplets of the base weight: ``base_from_weight`` does the same)."""
    missing = [n for n in TLORA_NAMES if n not in ts]
    if missing:
        raise _err(src, f"{flat}.{missing[0]}", f"missing; a LyCORIS T-LoRA module needs {list(TLORA_NAMES)}")
    if info.kind != "linear":
        raise _err(src, f"{flat}.q_layer.weight", f"a LyCORIS T-LoRA module on a {info.kind} {info.weight_shape}; "
                   "expected a Linear layer (LyCORIS' conv T-LoRA drops the kernel of its frozen copies)")
    r = ts["q_layer.weight"].shape[0]
    tensors = {"lora_A": _expect(src, f"{flat}.q_layer.weight", ts["q_layer.weight"], (r, info.in_features)),
               "lora_B": _expect(src, f"{flat}.p_layer.weight", ts["p_layer.weight"], (info.out_features, r)),
               "lora_S": _expect(src, f"{flat}.lambda_layer", ts["lambda_layer"], (1, r)).reshape(r)}
    return "tlora", r, tensors, {k: f"{flat}.{n}" for n, k in TLORA_NAMES.items()}, [{}]


def base_from_weight(weight: torch.Tensor, r: int) -> dict[str, torch.Tensor]:
    """T-LoRA frozen copies as LyCORIS rebuilds them when it loads a file (``use_data_init``, ``sig_type="principal"``):
    the r largest singular triplets of the base weight, A0 = Vᵀ[:r], B0 = U[:, :r], λ0 = S[:r]."""
    u, s, vh = torch.linalg.svd(weight.detach().float().flatten(1), full_matrices=False)
    return {"lora_A0": vh[:r].contiguous(), "lora_B0": u[:, :r].contiguous(), "lora_S0": s[:r].contiguous()}


def tlora_schedule(meta: dict[str, str]) -> dict[str, Any]:
    """LyCORIS sets T-LoRA masks from the training loop and stores no schedule; ``ss_network_args`` may name one
    (``min_rank``, ``alpha_rank_scale``). Without it: full rank at every step, as LyCORIS runs without a mask."""
    try:
        args = json.loads(meta.get("ss_network_args", "{}"))
    except json.JSONDecodeError:
        args = {}
    out: dict[str, Any] = {"ortho": True, "frozen": "stored", "sig_type": "principal", "num_train_timesteps": 1000}
    if isinstance(args, dict) and "min_rank" in args:
        out |= {"min_rank": int(args["min_rank"]), "rank_exponent": float(args.get("alpha_rank_scale", 1.0))}
    return out


def _parse_module(src: str, flat: str, ts: dict[str, torch.Tensor], role: str, path: str, info: LayerInfo) -> _Module:
    known = set(LORA_NAMES) | set(LOHA_NAMES) | set(LOKR_NAMES) | set(EXTRA_NAMES) | set(TLORA_NAMES) | {ROW_OFFSET}
    for s in ts:
        if s not in known:
            algo = UNSUPPORTED.get(s)
            what = f"LyCORIS {algo} modules are not supported" if algo else "unknown parameter"
            raise _err(src, f"{flat}.{s}", f"{what}; expected LoRA (lora_down/lora_up), LoHa (hada_*), LoKr (lokr_*) or "
                       "T-LoRA (q_layer/p_layer/lambda_layer) keys, plus alpha / dora_scale")
    if "lambda_layer" in ts or "q_layer.weight" in ts:
        variant, r, tensors, origin, cands = _parse_tlora(src, flat, ts, info)
    elif any(s.startswith("hada_") for s in ts):
        variant, r, tensors, origin, cands = _parse_loha(src, flat, ts, info)
    elif any(s.startswith("lokr_") for s in ts):
        variant, r, tensors, origin, cands = _parse_lokr(src, flat, ts, info)
    else:
        variant, r, tensors, origin, cands = _parse_lora(src, flat, ts, info)
    alpha = float(ts["alpha"].float().item()) if "alpha" in ts else None
    m = _Module(role, path, variant, r, alpha, tensors, origin, cands)
    if "dora_scale" in ts:
        _add_dora(src, flat, ts["dora_scale"], info, m)
    return m


def _add_dora(src: str, flat: str, scale: torch.Tensor, info: LayerInfo, m: _Module) -> None:
    key = f"{flat}.dora_scale"
    if scale.numel() == info.out_features and scale.shape[0] == info.out_features:
        m.tensors = {f"inner.{k}": v for k, v in m.tensors.items()} | {"magnitude": scale.reshape(-1)}
        m.origin = {f"inner.{k}": v for k, v in m.origin.items()} | {"magnitude": key}
        m.dora = True
        return
    if scale.shape[:1] == (1,) and scale.numel() == info.fan_in:
        raise _err(src, key, f"dora_scale {tuple(scale.shape)} has the old per-input orientation (LyCORIS < 3.1.1, "
                   "wd_on_out=False), which this library does not apply; expected the per-output "
                   f"({info.out_features}, 1, ...) form (re-export it with a current LyCORIS)")
    raise _err(src, key, f"shape {tuple(scale.shape)} does not fit the module {info.weight_shape}; "
               f"expected ({info.out_features}, 1{', 1' * info.ndim_kernel})")


def _choose(mods: list[_Module]) -> list[str]:
    """Per module, an option set (as JSON) that fits it; greedily the one fitting most modules, so few groups."""
    left = set(range(len(mods)))
    fits = [{json.dumps(c, sort_keys=True) for c in m.candidates} for m in mods]
    chosen = [""] * len(mods)
    while left:
        best = Counter(o for i in left for o in fits[i]).most_common(1)[0][0]
        for i in [i for i in left if best in fits[i]]:
            chosen[i] = best
            left.discard(i)
    return chosen


def read(tensors: dict[str, torch.Tensor], meta: dict[str, str], views: dict[str, ModuleView], src: str,
         unet_config: Any = None, skip_components: bool = False) -> Bundle:
    """kohya/LyCORIS tensors -> Bundle, mapped onto the modules of ``views`` ({component: ModuleView}).

    ``skip_components``: for a bare model, the file's parts for other components are skipped (logged).
    """
    idx = name_index(views, unet_config)
    skipped = Counter()
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        flat, dot, suffix = key.partition(".")
        if not dot:
            raise _err(src, key, "expected '<module>.<param>' (e.g. 'lora_unet_..._to_q.lora_down.weight')")
        by_module.setdefault(flat, {})[suffix] = t
    mods = []
    for flat, ts in by_module.items():
        role = next((r for p, r in PREFIX_ROLE.items() if flat.startswith(p + "_")), "")
        if flat not in idx and skip_components and role not in views:
            skipped[role] += len(ts)
            continue
        if flat not in idx:
            roles = sorted(views) or ["none"]
            raise _err(src, f"{flat}.{next(iter(ts))}", f"module '{flat}' is not in the model (components {roles}); "
                       "expected a kohya name of one of its Linear/Conv2d modules")
        role, path = idx[flat]
        mods.append(_parse_module(src, flat, ts, role, path, views[role][path]))
    for role, n in skipped.items():
        log.warning("%s: skipped %d tensors for component '%s' (the target is a bare %s)", src, n, role, sorted(views))
    if not mods:
        raise AdapterFileError(f"{src}: no module of the file is in the model (components {sorted(views)})")
    return Bundle(_group(mods), dict(meta), "kohya")


def _group(mods: list[_Module]) -> list[Part]:
    chosen = _choose(mods)
    groups: dict[tuple[str, str, bool, str], list[_Module]] = {}
    for m, opts in zip(mods, chosen):
        groups.setdefault((m.role, m.variant, m.dora, opts), []).append(m)
    parts = []
    for role in dict.fromkeys(m.role for m in mods):
        keys = sorted((k for k in groups if k[0] == role), key=lambda k: -len(groups[k]))
        for i, key in enumerate(keys):
            _, variant, dora, opts = key
            ms = groups[key]
            options = json.loads(opts)
            spec = spec_from_modules("dora" if dora else variant, {m.path: m.rank for m in ms},
                                     {m.path: m.alpha for m in ms},
                                     {"inner": variant, "inner_options": options} if dora else options)
            group = "" if i == 0 else ("dora_" if dora else "") + variant + (f"{i}" if i > 1 else "")
            parts.append(Part(role, spec, [m.path for m in ms],
                              {f"{m.path}.{k}": v for m in ms for k, v in m.tensors.items()},
                              {f"{m.path}.{k}": v for m in ms for k, v in m.origin.items()}, group))
    return parts


# --- writing ---
OUR_TO_KOHYA = {v: k for k, v in LORA_NAMES.items()}
ROLE_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2",
               "transformer": "lora_transformer"}
FAMILY_TE_PREFIX = {"sdxl": {"text_encoder": "lora_te1"},  # sd-scripts' lora_flux.py / lora_sd3.py:
                    "flux": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},  # CLIP-L, T5
                    "sd3": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}}


def _t5(path: str) -> bool:
    return path.startswith("encoder.block.") or ".SelfAttention." in path or ".DenseReluDense." in path


def flat_name(role: str, path: str, family: str | None, unet_config: Any = None) -> str:
    prefix = FAMILY_TE_PREFIX.get(family or "", {}).get(role) or ROLE_PREFIX.get(role)
    if prefix is None:
        raise AdapterFileError(f"component '{role or type(role).__name__}': the kohya format names only unet and "
                               "text encoders; expected a diffusers pipeline component")
    if role == "unet" and family == "sdxl" and unet_config is not None:
        path = to_sgm(path, unet_config) or path
    if role.startswith("text_encoder") and not path.startswith(TEXT_MODEL) and not _t5(path):
        path = TEXT_MODEL + path  # the spelling A1111, ComfyUI and kohya expect (CLIP; T5 names stay as they are)
    return f"{prefix}_{path.replace('.', '_')}"


def _module_scale(part: Part, module: str, names: set[str]) -> float:
    spec = part.spec
    r = spec.rank_for(module)
    inner = spec.options.get("inner", "lora") if spec.variant == "dora" else spec.variant
    if inner == "lokr" and {"lokr_w1", "lokr_w2"} <= names:
        return 1.0  # both Kronecker factors full: LyCORIS ignores alpha
    a = spec.alpha_for(module)
    a = float(r if a is None else a)
    return a / (math.sqrt(r) if spec.rslora or inner == "rslora" else r)


def write(parts: list[Part], family: str | None, unet_config: Any = None,
          views: dict[str, ModuleView] | None = None) -> dict[str, torch.Tensor]:
    """Parts (variants lora, rslora, dora, loha, lokr) -> kohya/LyCORIS tensors. LoRA modules share the file's most
    common alpha, the rest of a module's scale is in its ``lora_up``; LoHa/LoKr: alpha = scale * rank per module."""
    out: dict[str, torch.Tensor] = {}
    alphas = [s * p.spec.rank_for(m) for p in parts for m, s in (lora_scales(p) or {}).items()]
    one_alpha = most_common(alphas) if alphas else None  # the file's usual alpha; others are folded into lora_up
    for part in parts:
        part = bake_scale(part, one_alpha)  # one alpha: diffusers' kohya converter keeps only the most common one
        inner = part.spec.options.get("inner", "lora") if part.spec.variant == "dora" else part.spec.variant
        if inner not in ("lora", "rslora", "loha", "lokr"):
            raise AdapterFileError(f"variant '{part.spec.variant}' has no kohya/LyCORIS form; expected lora, rslora, "
                                   "dora, loha or lokr (export T-LoRA/VeRA through save_adapter, which materialises them)")
        for module in part.modules:
            flat = flat_name(part.component, module, family, unet_config)
            own = {k[len(module) + 1:]: v for k, v in part.tensors.items() if k.startswith(module + ".")}
            names = {k.removeprefix("inner.") for k in own}
            r = part.spec.rank_for(module)
            info = (views or {}).get(part.component, {}).get(module)
            ndim = len(info.weight_shape) if info is not None else own_dim(own)
            for k, v in own.items():
                k = k.removeprefix("inner.")
                if k == "magnitude":
                    out[f"{flat}.dora_scale"] = v.reshape(v.shape[0], *([1] * (ndim - 1)))
                else:
                    out[f"{flat}.{OUR_TO_KOHYA.get(k, k)}"] = v
            out[f"{flat}.alpha"] = torch.tensor(_module_scale(part, module, names) * r)
    return out


def own_dim(own: dict[str, torch.Tensor]) -> int:
    """The base weight's number of dims (2 linear, 4 conv), read off the LoRA/LoHa/LoKr factors."""
    for k in ("inner.lora_B", "lora_B", "inner.lora_A", "lora_A"):
        if k in own:
            return own[k].dim()
    return 4 if any(v.dim() == 4 for v in own.values()) else 2


def metadata(parts: list[Part], family: str | None, extra: dict[str, str]) -> dict[str, str]:
    """kohya ``ss_*`` and SAI ``modelspec.*`` keys (what A1111, ComfyUI and Civitai read), plus ``extra``."""
    main = next((p for p in parts if p.component == "unet"), parts[0]).spec
    inner = main.options.get("inner", "lora") if main.variant == "dora" else main.variant
    algo = {"lora": "locon", "rslora": "locon", "loha": "loha", "lokr": "lokr"}.get(inner, "locon")
    lycoris = inner in ("loha", "lokr") or main.variant == "dora"
    alpha = main.alpha if main.alpha is not None else main.rank
    version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "flux2": "flux2",
               "sd3": "sd3"}.get(family or "", "")
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
            "flux": "flux-1-dev", "flux2": "flux-2-dev", "sd3": "stable-diffusion-3-medium"}
    meta = {
        "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
        "ss_network_dim": str(main.rank), "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"algo": algo, "dora_wd": main.variant == "dora"} if lycoris else {}),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
    }
    if version:
        meta["ss_base_model_version"] = version
        meta["modelspec.architecture"] = f"{arch[family or '']}/{'lycoris' if lycoris else 'lora'}"
    if extra.get("trigger_word"):
        meta["modelspec.trigger_phrase"] = extra["trigger_word"]
    if extra.get("name"):
        meta["ss_output_name"] = meta["modelspec.title"] = extra["name"]
    return {**meta, **extra}
