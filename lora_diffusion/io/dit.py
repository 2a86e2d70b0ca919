"""Diffusion-transformer (Flux.1, SD3/SD3.5) LoRA layouts <-> diffusers module names.

kohya (sd-scripts), ComfyUI and XLabs name the original (BFL / Stability) modules, where one Linear can stand for
several diffusers Linears: Flux's ``img_attn.qkv`` is ``attn.to_q/to_k/to_v``, its single blocks' ``linear1`` is
``attn.to_q/to_k/to_v`` + ``proj_mlp``. A LoRA on a fused module (down A, up B) is split exactly: every part keeps A
and takes its rows of B (and of a DoRA magnitude, which is per output row). Written back, the parts are fused
exactly: A = [s1·A1; s2·A2; ...], B = blockdiag(B1, B2, ...), alpha = rank (scale 1). The final-layer modulation
stores (shift, scale) where diffusers' ``norm_out.linear`` has (scale, shift): the two halves of B are swapped.

The maps are built from the model's own config and module names, so a reduced test model maps like the real one;
the intermediate form is OneTrainer's kohya layout ``lora_transformer_<diffusers path with _>``, which
``kohya.read`` / ``kohya.write`` handle like any kohya file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from ..core.errors import AdapterFileError
from .bundle import ModuleView
from .kohya import ROW_OFFSET

TRANSFORMER = "transformer"
OT_PREFIX = "lora_transformer"  # OneTrainer's kohya prefix for the diffusers transformer
LORA_PARAMS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
FAMILY_OF_CLASS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3", "Flux2Transformer2DModel": "flux2"}
FAMILY = {"flux": "Flux", "sd3": "SD3", "flux2": "Flux.2"}
# kohya text-encoder prefixes per family and pipeline component (sd-scripts lora_flux.py / lora_sd3.py); Flux.2's
# text encoder is a Mistral / Qwen3 LLM, which no Flux.2 LoRA layout read here adapts
TE_PREFIX = {"flux2": {}, "flux": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"},
             "sd3": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}}
# sd-scripts' first Flux release wrote T5 as lora_te2; ComfyUI-converted files name CLIP-L lora_te
TE_ALIASES = {"flux": {"lora_te2": "text_encoder_2", "lora_te": "text_encoder"}, "sd3": {"lora_te": "text_encoder"}}
COMFY_TE = {"clip_l": "lora_te1", "clip_g": "lora_te2", "t5xxl": "lora_te3"}  # ComfyUI's text_encoders.<name>.transformer.
PARAM_SUFFIXES = ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
                  (".lora_down.weight", "lora_down.weight"), (".lora_up.weight", "lora_up.weight"))


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def flux_map(cfg: Any) -> tuple[dict[str, list[str]], set[str]]:
    """BFL module name -> the diffusers Linears it stands for (rows in order); the names whose halves swap."""
    m: dict[str, list[str]] = {
        "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
        "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
        "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
        "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
        "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
        "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
        "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
        "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"],
    }
    for i in range(_get(cfg, "num_layers", 19)):
        d, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for side, attn, ff, norm in (("img", ("to_q", "to_k", "to_v"), "ff", "norm1"),
                                     ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "ff_context", "norm1_context")):
            m[f"{d}.{side}_attn.qkv"] = [f"{t}.attn.{p}" for p in attn]
            m[f"{d}.{side}_attn.proj"] = [f"{t}.attn.{'to_out.0' if side == 'img' else 'to_add_out'}"]
            m[f"{d}.{side}_mlp.0"] = [f"{t}.{ff}.net.0.proj"]
            m[f"{d}.{side}_mlp.2"] = [f"{t}.{ff}.net.2"]
            m[f"{d}.{side}_mod.lin"] = [f"{t}.{norm}.linear"]
    for i in range(_get(cfg, "num_single_layers", 38)):
        s, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        m[f"{s}.linear1"] = [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"]
        m[f"{s}.linear2"] = [f"{t}.proj_out"]
        m[f"{s}.modulation.lin"] = [f"{t}.norm.linear"]
    return m, {"final_layer.adaLN_modulation.1"}


def flux2_map(cfg: Any) -> tuple[dict[str, list[str]], set[str]]:
    """Flux.2 (BFL / ai-toolkit / kohya) module name -> diffusers Linears (``convert_flux2_transformer_checkpoint_to
    _diffusers``): per-block modulation is shared model-wide, MLPs are SwiGLU ``linear_in/out``, and the single
    blocks' ``linear1`` / ``linear2`` are diffusers' fused ``to_qkv_mlp_proj`` / ``to_out`` (one to one)."""
    m: dict[str, list[str]] = {
        "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
        "time_in.in_layer": ["time_guidance_embed.timestep_embedder.linear_1"],
        "time_in.out_layer": ["time_guidance_embed.timestep_embedder.linear_2"],
        "guidance_in.in_layer": ["time_guidance_embed.guidance_embedder.linear_1"],
        "guidance_in.out_layer": ["time_guidance_embed.guidance_embedder.linear_2"],
        "double_stream_modulation_img.lin": ["double_stream_modulation_img.linear"],
        "double_stream_modulation_txt.lin": ["double_stream_modulation_txt.linear"],
        "single_stream_modulation.lin": ["single_stream_modulation.linear"],
        "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"],
    }
    for i in range(_get(cfg, "num_layers", 8)):
        d, t = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        m[f"{d}.img_attn.qkv"] = [f"{t}.to_q", f"{t}.to_k", f"{t}.to_v"]
        m[f"{d}.txt_attn.qkv"] = [f"{t}.add_q_proj", f"{t}.add_k_proj", f"{t}.add_v_proj"]
        m[f"{d}.img_attn.proj"], m[f"{d}.txt_attn.proj"] = [f"{t}.to_out.0"], [f"{t}.to_add_out"]
        for side, ff in (("img", "ff"), ("txt", "ff_context")):
            m[f"{d}.{side}_mlp.0"] = [f"transformer_blocks.{i}.{ff}.linear_in"]
            m[f"{d}.{side}_mlp.2"] = [f"transformer_blocks.{i}.{ff}.linear_out"]
    for i in range(_get(cfg, "num_single_layers", 48)):
        s, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}.attn"
        m[f"{s}.linear1"], m[f"{s}.linear2"] = [f"{t}.to_qkv_mlp_proj"], [f"{t}.to_out"]
    return m, {"final_layer.adaLN_modulation.1"}


def sd3_map(cfg: Any) -> tuple[dict[str, list[str]], set[str]]:
    """SD3 MMDiT (sd-scripts / ComfyUI) module name -> diffusers Linears; the names whose halves swap."""
    m: dict[str, list[str]] = {
        "x_embedder.proj": ["pos_embed.proj"], "context_embedder": ["context_embedder"],
        "t_embedder.mlp.0": ["time_text_embed.timestep_embedder.linear_1"],
        "t_embedder.mlp.2": ["time_text_embed.timestep_embedder.linear_2"],
        "y_embedder.mlp.0": ["time_text_embed.text_embedder.linear_1"],
        "y_embedder.mlp.2": ["time_text_embed.text_embedder.linear_2"],
        "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"],
    }
    swapped = {"final_layer.adaLN_modulation.1"}
    n = _get(cfg, "num_layers", 24)
    for i in range(n):
        j, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        for side, attn, out, ff, norm in (("x_block", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1"),
                                          ("context_block", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                                           "ff_context", "norm1_context")):
            m[f"{j}.{side}.attn.qkv"] = [f"{t}.attn.{p}" for p in attn]
            m[f"{j}.{side}.attn.proj"] = [f"{t}.attn.{out}"]
            m[f"{j}.{side}.mlp.fc1"] = [f"{t}.{ff}.net.0.proj"]
            m[f"{j}.{side}.mlp.fc2"] = [f"{t}.{ff}.net.2"]
            m[f"{j}.{side}.adaLN_modulation.1"] = [f"{t}.{norm}.linear"]
        m[f"{j}.x_block.attn2.qkv"] = [f"{t}.attn2.{p}" for p in ("to_q", "to_k", "to_v")]
        m[f"{j}.x_block.attn2.proj"] = [f"{t}.attn2.to_out.0"]
    swapped.add(f"joint_blocks.{n - 1}.context_block.adaLN_modulation.1")  # AdaLayerNormContinuous: (scale, shift)
    return m, swapped


def xlabs_map(cfg: Any) -> dict[str, list[str]]:
    """XLabs' Flux LoRA (``double_blocks.N.processor.qkv_lora1.down.weight``): its attention processors' LoRAs."""
    m: dict[str, list[str]] = {}
    for i in range(_get(cfg, "num_layers", 19)):
        d, t = f"double_blocks.{i}.processor", f"transformer_blocks.{i}.attn"
        m[f"{d}.qkv_lora1"] = [f"{t}.to_q", f"{t}.to_k", f"{t}.to_v"]
        m[f"{d}.qkv_lora2"] = [f"{t}.add_q_proj", f"{t}.add_k_proj", f"{t}.add_v_proj"]
        m[f"{d}.proj_lora1"] = [f"{t}.to_out.0"]
        m[f"{d}.proj_lora2"] = [f"{t}.to_add_out"]
    for i in range(_get(cfg, "num_single_layers", 38)):
        s, t = f"single_blocks.{i}.processor", f"single_transformer_blocks.{i}"
        m[f"{s}.qkv_lora"] = [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"]
        m[f"{s}.proj_lora"] = [f"{t}.proj_out"]
    return m


def family_map(family: str, cfg: Any) -> tuple[dict[str, list[str]], set[str]]:
    return {"flux": flux_map, "flux2": flux2_map, "sd3": sd3_map}[family](cfg)


def flat(prefix: str, dotted: str) -> str:
    return f"{prefix}_{dotted.replace('.', '_')}"


def block_counts(family: str, cfg: Any) -> str:
    if family in ("flux", "flux2"):
        return (f"{_get(cfg, 'num_layers', 19)} double-stream and {_get(cfg, 'num_single_layers', 38)} "
                "single-stream blocks")
    return f"{_get(cfg, 'num_layers', 24)} joint blocks"


def _missing_block(name: str, family: str, cfg: Any, src: str, key: str) -> AdapterFileError | None:
    m = re.search(r"(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks|joint_blocks)[._](\d+)", name)
    if not m:
        return None
    fam = {"double_blocks": "Flux", "single_blocks": "Flux", "joint_blocks": "SD3"}.get(m.group(1), FAMILY[family])
    fam = FAMILY[family] if family in ("flux", "flux2") and fam == "Flux" else fam
    return AdapterFileError(
        f"{src}: key '{key}': this LoRA is for {fam} and adapts {m.group(1)}.{m.group(2)}; the model is "
        f"{FAMILY[family]} with {block_counts(family, cfg)}, which has no such block; expected a LoRA made for this "
        "model (or its full-size original)")


# the factors whose rows are the module's output rows (sliced per part); the others are shared
ROW_FACTORS = {"lora": ("lora_up.weight", "dora_scale"), "loha": ("hada_w1_a", "hada_w2_a", "dora_scale"),
               "lokr": ("lokr_w1", "lokr_w1_a", "dora_scale")}
KNOWN = {"lora": LORA_PARAMS, "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha", "dora_scale"),
         "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha", "dora_scale")}


def _kind(params: dict[str, torch.Tensor]) -> str:
    return "loha" if any(k.startswith("hada_") for k in params) else "lokr" if any(
        k.startswith("lokr_") for k in params) else "lora"


def _row_block(src: str, key: str, params: dict[str, torch.Tensor], kind: str, rows: int) -> int:
    """How many output rows one row of the sliced factor stands for: 1, or LoKr's W2 height b (ΔW = W1 ⊗ W2 has
    rows i1·b + i2, so a block of rows [s, e) with b | s, e is W1's rows [s/b, e/b) ⊗ W2: exact)."""
    if kind != "lokr":
        return 1
    w2 = params.get("lokr_w2", params.get("lokr_w2_a"))
    w1 = params.get("lokr_w1", params.get("lokr_w1_a"))
    if w1 is None or w2 is None:
        raise AdapterFileError(f"{src}: key '{key}.lokr_w1': missing; a LoKr module needs lokr_w1 (or lokr_w1_a/_b) and "
                               "lokr_w2 (or lokr_w2_a/_b)")
    if w1.shape[0] * w2.shape[0] != rows:
        raise AdapterFileError(f"{src}: key '{key}.lokr_w1': LoKr factors give {w1.shape[0] * w2.shape[0]} output rows; "
                               f"expected {rows}")
    return int(w2.shape[0])


def split_module(src: str, key: str, params: dict[str, torch.Tensor], targets: list[str], swap: bool,
                 views: ModuleView) -> dict[str, dict[str, torch.Tensor]]:
    """One fused module's tensors -> per target path: the row factors (LoRA's up, LoHa's w1_a / w2_a, LoKr's W1,
    a DoRA magnitude) are sliced by the parts' output rows, the rest is shared. Exact: ΔW's rows are the rows of
    those factors (for LoKr when the parts' boundaries are multiples of W2's height)."""
    if len(targets) == 1 and not swap:
        return {targets[0]: params}
    kind = _kind(params)
    extra = sorted(set(params) - set(KNOWN[kind]))
    where = f"this module stands for {len(targets)} diffusers modules {targets}{' with swapped halves' if swap else ''}"
    if extra:
        raise AdapterFileError(f"{src}: key '{key}.{extra[0]}': {where}; only LoRA, LoHa, LoKr and DoRA parameters "
                               "split exactly; expected one of those, or a file in the diffusers layout")
    dims = [views[t].out_features for t in targets]
    block = _row_block(src, key, params, kind, sum(dims))
    ranges, start = [], 0
    for d in dims:
        halves = [(start + d // 2, start + d), (start, start + d // 2)] if swap else [(start, start + d)]
        ranges.append(halves)
        start += d
    if any(x % block for r in ranges for ab in r for x in ab):
        if swap:
            raise AdapterFileError(f"{src}: key '{key}.lokr_w1': {where}; a LoKr with W2 of height {block} splits "
                                   f"exactly only at multiples of {block}, and the parts have {dims} rows; expected a "
                                   "LoRA/LoHa, a LoKr with a smaller factor, or a file in the diffusers layout")
        return lokr_windows(params, targets, [r[0] for r in ranges], block)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for t, r in zip(targets, ranges):
        own = {}
        for k, v in params.items():
            if k not in ROW_FACTORS[kind]:
                own[k] = v.clone()  # each part its own tensor (shared storage would tie them in training and on disk)
                continue
            b = block if k.startswith("lokr_") else 1
            if v.shape[0] * b != sum(dims):
                raise AdapterFileError(f"{src}: key '{key}.{k}': shape {tuple(v.shape)}; expected {sum(dims) // b} rows "
                                       f"({' + '.join(map(str, dims))} for {targets} of the model)")
            own[k] = torch.cat([v[a // b:e // b] for a, e in r]).contiguous()
        out[t] = own
    return out


def lokr_windows(params: dict[str, torch.Tensor], targets: list[str], ranges: list[tuple[int, int]],
                 b: int) -> dict[str, dict[str, torch.Tensor]]:
    """A LoKr on a fused module whose parts do not start at multiples of W2's height b: part rows [s, e) are rows
    [s - b⌊s/b⌋, ...) of W1[⌊s/b⌋ : ⌈e/b⌉] ⊗ W2 (exact; LoKr's ``row_offset`` option, kohya.ROW_OFFSET here)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for t, (s, e) in zip(targets, ranges):
        i0, i1 = s // b, -(-e // b)
        own = {k: (v[i0:i1] if k in ("lokr_w1", "lokr_w1_a") else v[s:e] if k == "dora_scale" else v).clone()
               for k, v in params.items()}
        out[t] = own | {ROW_OFFSET: torch.tensor(s - i0 * b)}
    return out


def _by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``<flat module name>.<param>`` keys -> {flat module name: {param: tensor}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, param = key.partition(".")
        grouped.setdefault(name, {})[param] = t
    return grouped


def to_onetrainer(tensors: dict[str, torch.Tensor], mapping: dict[str, str], targets: dict[str, list[str]],
                  swapped: set[str], views: ModuleView, src: str, family: str, cfg: Any) -> dict[str, torch.Tensor]:
    """Tensors keyed ``<source flat name>.<param>`` -> ``lora_transformer_<path>.<param>`` (OneTrainer's layout).

    ``mapping``: source flat name -> original dotted name (a key of ``targets``)."""
    grouped = _by_module(tensors)
    out: dict[str, torch.Tensor] = {}
    for name, params in grouped.items():
        dotted = mapping.get(name)
        if dotted is None:
            err = _missing_block(name, family, cfg, src, f"{name}.{next(iter(params))}")
            raise err or AdapterFileError(f"{src}: key '{name}.{next(iter(params))}': module '{name}' is not a module "
                                          f"of the {FAMILY[family]} transformer; expected "
                                          "one of its Linear layers")
        paths = [p for p in targets[dotted] if p in views]
        if not paths:
            raise AdapterFileError(f"{src}: key '{name}.{next(iter(params))}': '{dotted}' stands for {targets[dotted]}, "
                                   f"which this model does not have ({block_counts(family, cfg)}); expected a LoRA "
                                   "made for this model")
        if paths != targets[dotted]:
            raise AdapterFileError(f"{src}: key '{name}.{next(iter(params))}': '{dotted}' stands for "
                                   f"{targets[dotted]}; the model has only {paths}")
        for path, own in split_module(src, name, params, paths, dotted in swapped, views).items():
            out |= {f"{flat(OT_PREFIX, path)}.{k}": v for k, v in own.items()}
    return out


def source_names(targets: dict[str, list[str]], prefix: str) -> dict[str, str]:
    return {flat(prefix, d): d for d in targets}


def fuse_module(dotted: str, members: list[str], params: dict[str, dict[str, torch.Tensor]], swap: bool,
                views: ModuleView) -> dict[str, torch.Tensor]:
    """Per-path kohya tensors of the parts of one original module -> that module's tensors (exact)."""
    present = [p for p in members if p in params]
    if len(members) == 1 and not swap:
        return {k: v for k, v in params[members[0]].items() if k != ROW_OFFSET}
    if present and all(_kind(params[p]) == "lokr" for p in present) and not swap:
        return fuse_lokr(dotted, members, params, views)
    odd = [(p, k) for p in present for k in params[p] if k not in LORA_PARAMS]
    if odd:
        raise AdapterFileError(f"module '{odd[0][0]}': its {odd[0][1]} cannot be written as part of the fused module "
                               f"'{dotted}' ({members}); only LoRA and DoRA fuse exactly; expected format='diffusers' "
                               "or 'peft' for this variant")
    dora = [p for p in present if "dora_scale" in params[p]]
    if dora and len(dora) != len(members):
        raise AdapterFileError(f"module '{dora[0]}': a DoRA on part of the fused module '{dotted}' ({members}) has "
                               "no exact kohya form (the other parts' magnitudes come from the base weight); expected "
                               "DoRA on all of them, or format='diffusers'/'peft'")
    downs, ups = [], []
    for p in members:
        out_f = views[p].out_features
        if p not in params:
            ups.append((torch.zeros(out_f, 0), 0))
            continue
        ps = params[p]
        down, up = ps["lora_down.weight"], ps["lora_up.weight"]
        r = down.shape[0]
        alpha = float(ps["alpha"]) if "alpha" in ps else float(r)
        downs.append(down * (alpha / r))
        ups.append((up, r))
    down = torch.cat(downs)
    rank = down.shape[0]
    up = torch.zeros(sum(u.shape[0] for u, _ in ups), rank, dtype=down.dtype)
    row = col = 0
    for u, r in ups:
        up[row:row + u.shape[0], col:col + r] = u
        row, col = row + u.shape[0], col + r
    out = {"lora_down.weight": down.contiguous(), "lora_up.weight": up, "alpha": torch.tensor(float(rank))}
    if dora:
        out["dora_scale"] = torch.cat([params[p]["dora_scale"] for p in members])
    if swap:
        h = up.shape[0] // 2
        out = {k: torch.cat([v[h:], v[:h]]) if k in ("lora_up.weight", "dora_scale") else v for k, v in out.items()}
    return out


def fuse_lokr(dotted: str, members: list[str], params: dict[str, dict[str, torch.Tensor]],
              views: ModuleView) -> dict[str, torch.Tensor]:
    """The parts of one LoKr split from a fused module (``split_module`` / ``lokr_windows``) -> that LoKr: the parts
    share W2 (and W1b, alpha) and each holds W1's rows over its own rows [s, e) from row offset s mod b, so W1 is put
    back row by row (overlapping rows must agree). Parts trained apart have no fused form: refused."""
    where = f"the fused module '{dotted}' ({members})"
    missing = [p for p in members if p not in params]
    if missing:
        raise AdapterFileError(f"module '{missing[0]}': a LoKr on part of {where} has no fused form; expected a LoKr "
                               "on every part, or format='diffusers'/'peft'")
    first = params[members[0]]
    w1_key = "lokr_w1" if "lokr_w1" in first else "lokr_w1_a"
    shared = sorted(k for k in first if k not in (w1_key, ROW_OFFSET))
    w2 = first.get("lokr_w2", first.get("lokr_w2_a"))
    b, rows, start = int(w2.shape[0]), sum(views[p].out_features for p in members), 0
    w1 = torch.zeros(rows // b, first[w1_key].shape[1], dtype=first[w1_key].dtype)
    filled = torch.zeros(rows // b, dtype=torch.bool)
    for p in members:
        own, n = params[p], views[p].out_features
        i0, off = start // b, int(own.get(ROW_OFFSET, torch.tensor(0)))
        same = set(own) - {ROW_OFFSET} == set(first) - {ROW_OFFSET} and all(torch.equal(own[k], first[k]) for k in shared)
        part = own.get(w1_key)
        clash = part is not None and i0 + part.shape[0] <= w1.shape[0] and bool(
            (filled[i0:i0 + part.shape[0]] & (w1[i0:i0 + part.shape[0]] != part).any(1)).any())
        if not same or part is None or off != start - i0 * b or part.shape[0] != -(-(start + n) // b) - i0 or clash:
            raise AdapterFileError(f"module '{p}': its LoKr and those of the other parts of {where} are not one LoKr "
                                   "split by rows (trained apart, or other factors); no fused form; expected "
                                   "format='diffusers'/'peft' or the canonical format")
        w1[i0:i0 + part.shape[0]], filled[i0:i0 + part.shape[0]] = part, True
        start += n
    return {k: first[k] for k in shared} | {w1_key: w1}


def from_onetrainer(tensors: dict[str, torch.Tensor], targets: dict[str, list[str]], swapped: set[str],
                    views: ModuleView, prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """``lora_transformer_<path>.<param>`` tensors -> the original layout ``<prefix>_<original name>.<param>``."""
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    flat_to_path = {flat(OT_PREFIX, p): p for p in views}
    for key, t in tensors.items():
        name, _, param = key.partition(".")
        by_path.setdefault(flat_to_path[name], {})[param] = t
    owner = {p: d for d, ps in targets.items() for p in ps}
    left = sorted(set(by_path) - set(owner))
    if left:
        raise AdapterFileError(f"module '{left[0]}': the original (kohya/ComfyUI) layout has no name for it; expected "
                               "format='diffusers' or 'peft' for adapters on it")
    out: dict[str, torch.Tensor] = {}
    for dotted in dict.fromkeys(owner[p] for p in by_path):
        members = [p for p in targets[dotted] if p in views]
        for k, v in fuse_module(dotted, members, by_path, dotted in swapped, views).items():
            out[f"{flat(prefix, dotted)}.{k}"] = v
    return out


def to_bfl(tensors: dict[str, torch.Tensor], targets: dict[str, list[str]], peft_names: bool) -> dict[str, torch.Tensor]:
    """``lora_unet_<original flat name>.<param>`` -> ``diffusion_model.<original dotted name>.<param>`` (ComfyUI / BFL;
    ``peft_names``: ai-toolkit's Flux.2 LoRA, ``lora_A/B`` with alpha/r folded into A, as diffusers' Flux.2 loader
    reads it; else kohya's ``lora_down/up`` + ``alpha``, as its Flux.1 loader reads ComfyUI files). LoHa / LoKr /
    DoRA parameters as they are (LyCORIS names, alpha kept)."""
    dotted = source_names(targets, "lora_unet")
    grouped = _by_module(tensors)
    out: dict[str, torch.Tensor] = {}
    for name, ps in grouped.items():
        base = f"diffusion_model.{dotted[name]}"
        if "lora_down.weight" in ps and peft_names:
            down = ps.pop("lora_down.weight")
            alpha = float(ps.pop("alpha")) if "alpha" in ps else float(down.shape[0])
            out[f"{base}.lora_A.weight"] = (down * (alpha / down.shape[0])).contiguous()
            out[f"{base}.lora_B.weight"] = ps.pop("lora_up.weight")
        out |= {f"{base}.{k}": v for k, v in ps.items()}
    return out


def t5_like(paths: Iterable[str]) -> bool:
    return any(".SelfAttention." in p or p.startswith("encoder.block.") for p in paths)


def _normalize(key: str) -> tuple[str, str, str]:
    """A file key -> (source kind, flat module name, kohya param name). Kinds: "unet" (original names), "xlabs",
    "onetrainer", "te" (kohya text encoders, left as they are)."""
    k = key.removeprefix("diffusion_model.")
    if k.startswith(("double_blocks.", "single_blocks.")) and ".processor." in k:  # XLabs
        module, _, param = k.rpartition(".")
        module, _, which = module.rpartition(".")
        return "xlabs", flat("xlabs", module), {"down": "lora_down.weight", "up": "lora_up.weight"}.get(which, which)
    if key.startswith("diffusion_model."):  # ComfyUI: original dotted names, PEFT or kohya parameter names
        return ("unet", *_dotted("lora_unet", k))
    if key.startswith("text_encoders."):
        enc, _, rest = key.removeprefix("text_encoders.").partition(".transformer.")
        return ("te", *_dotted(COMFY_TE.get(enc, f"lora_{enc}"), rest))
    name, _, param = key.partition(".")
    if name.startswith("lora_unet_"):
        return "unet", name, param
    if name.startswith(OT_PREFIX + "_"):
        return "onetrainer", name, param
    return "te", name, param


def _dotted(prefix: str, k: str) -> tuple[str, str]:
    """``<dotted module>.<param>`` (PEFT or kohya parameter names) -> (kohya flat name, kohya param)."""
    for suffix, param in PARAM_SUFFIXES:
        if k.endswith(suffix):
            return flat(prefix, k[:-len(suffix)]), param
    module, _, param = k.rpartition(".")
    return flat(prefix, module), param


def _te_kind(names: Iterable[str]) -> str:
    return "T5" if any("encoder_block_" in n or "SelfAttention" in n for n in names) else "CLIP"


def _check_text(family: str, te: dict[str, dict[str, torch.Tensor]], views: dict[str, ModuleView], src: str) -> None:
    """A text-encoder part must be the kind of encoder the pipeline has under that name (CLIP vs T5)."""
    by_prefix: dict[str, list[str]] = {}
    for name in te:
        by_prefix.setdefault(name.split("_")[0] + "_" + name.split("_")[1], []).append(name)
    fam = FAMILY[family]
    for prefix, names in by_prefix.items():
        role = TE_ALIASES.get(family, {}).get(prefix) or next(
            (r for r, p in TE_PREFIX[family].items() if p == prefix), None)
        if role is None:
            raise AdapterFileError(f"{src}: key '{names[0]}': a text-encoder part '{prefix}_…', which a {fam} kohya "
                                   f"file does not have; expected {sorted(TE_PREFIX[family].values())}")
        if role not in views:
            continue  # not loaded here (a bare transformer): kohya.read skips it
        have, want = ("T5" if t5_like(views[role]) else "CLIP"), _te_kind(names)
        if have != want:
            raise AdapterFileError(f"{src}: key '{names[0]}': the file's text-encoder part '{prefix}_…' is for a {want} "
                                   f"encoder; the {fam} pipeline's {role} is a {have} encoder; expected {have} module "
                                   f"names ({'lora_te3_encoder_block_…' if have == 'T5' else prefix + '_text_model_…'})")


def to_kohya(tensors: dict[str, torch.Tensor], family: str, cfg: Any, views: dict[str, ModuleView],
             src: str) -> dict[str, torch.Tensor]:
    """Any Flux/SD3 kohya / ComfyUI / XLabs / OneTrainer file -> kohya tensors on diffusers names (OneTrainer's
    ``lora_transformer_…`` for the transformer, ``lora_te*`` for the pipeline's text encoders)."""
    targets, swapped = family_map(family, cfg)
    names = source_names(targets, "lora_unet") | (source_names(xlabs_map(cfg), "xlabs") if family == "flux" else {})
    targets = targets | (xlabs_map(cfg) if family == "flux" else {})
    kinds: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "xlabs": {}, "onetrainer": {}, "te": {}}
    te: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        kind, name, param = _normalize(key)
        kinds[kind][f"{name}.{param}"] = t
        if kind == "te":
            te.setdefault(name, {})[param] = t
    _check_text(family, te, views, src)
    out = dict(kinds["onetrainer"])
    original = {**kinds["unet"], **kinds["xlabs"]}
    if original:
        if TRANSFORMER not in views:
            raise AdapterFileError(f"{src}: key '{next(iter(original))}': a transformer LoRA; the target has "
                                   f"{sorted(views)}; expected a {family} pipeline or its transformer")
        out |= to_onetrainer(original, names, targets, swapped, views[TRANSFORMER], src, family, cfg)
    for key, t in kinds["te"].items():
        name, _, param = key.partition(".")
        prefix = name.split("_")[0] + "_" + name.split("_")[1]
        role = TE_ALIASES.get(family, {}).get(prefix) or next(r for r, p in TE_PREFIX[family].items() if p == prefix)
        kohya_prefix = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}[role]
        out[f"{kohya_prefix}{name[len(prefix):]}.{param}"] = t
    return out


_SINGLE = re.compile(r"single_(?:transformer_)?blocks[._](\d+)[._]")
_DOUBLE = re.compile(r"(?:^|[._])(?:transformer_blocks|double_blocks|joint_blocks)[._](\d+)[._]")


def check_blocks(keys: Iterable[str], family: str, cfg: Any, src: str) -> None:
    """Refuse a file that adapts blocks the model does not have (a LoRA for a deeper model of the family)."""
    n_double, n_single = _get(cfg, "num_layers", 0), _get(cfg, "num_single_layers", 0) or 0
    for key in keys:
        if key.startswith(("lora_te", "text_encoder")):
            continue
        single = _SINGLE.search(key)
        m = single or _DOUBLE.search(key.replace("single_", "\0"))
        if m and int(m.group(1)) >= (n_single if single else n_double):
            raise _missing_block(m.group(0).strip("._"), family, cfg, src, key) or AdapterFileError(key)
