"""Which format a file is in, and which base model family it was made for, from keys, shapes and metadata."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from . import canonical, cloneofsimo, tlora_official

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "transformer.")
PEFT_PREFIX = "base_model.model."
_LORA_PARAMS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".vera_lambda_", ".hada_w", ".lokr_w")
OLD_DIFFUSERS = ("_lora.down", "_lora.up", ".lora.down", ".lora.up", "lora_linear_layer")


def is_xlabs(keys: Sequence[str]) -> bool:
    """XLabs' Flux LoRA: ``double_blocks.N.processor.qkv_lora1.down.weight`` (optionally ``diffusion_model.``)."""
    return bool(keys) and all(k.removeprefix("diffusion_model.").startswith(("double_blocks.", "single_blocks."))
                              and ".processor." in k for k in keys)


def is_comfy_dit(keys: Sequence[str]) -> bool:
    """ComfyUI / BFL-style DiT LoRA: original module names under ``diffusion_model.`` (``lora_A/B`` or
    ``lora_down/up``), text encoders as in kohya."""
    return any(k.startswith("diffusion_model.") for k in keys) and all(
        k.startswith(("diffusion_model.", "text_encoders.", *KOHYA_PREFIXES)) for k in keys)


def detect_format(keys: Sequence[str], meta: Mapping[str, str]) -> str:
    """"canonical" | "kohya" | "lycoris" | "diffusers" | "peft" | "tlora-official" | "cloneofsimo" | "old-diffusers" |
    "xlabs" | "comfy-dit" | "unknown"."""
    if canonical.is_canonical(dict(meta)):
        return "canonical"
    keys = [k for k in keys if not k.startswith("bundle_emb.")]  # kohya's bundled embeddings (io/embeddings.py)
    if cloneofsimo.is_cloneofsimo(list(keys), dict(meta)):
        return "cloneofsimo"
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if is_xlabs(keys):
        return "xlabs"
    if is_comfy_dit(keys):
        return "comfy-dit"
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if keys and all(k.startswith("lycoris_") for k in keys):
        return "lycoris"  # LyCORIS on a diffusers model by module name (SimpleTuner's Flux/SD3 LyCORIS)
    if tlora_official.is_official(list(keys)):
        return "tlora-official"
    if any(p in k for k in keys for p in OLD_DIFFUSERS):
        return "old-diffusers"
    if keys and all(any(p in k for p in _LORA_PARAMS) for k in keys):
        return "diffusers"  # with component prefixes, or a bare model's ("down_blocks.0...lora_A.weight")
    return "unknown"


_FAMILY_META = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("sd3", "sd3"), ("flux2", "flux2"),
                ("flux_2", "flux2"), ("flux", "flux"))
_ARCH = (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"),
         ("stable-diffusion-3", "sd3"), ("flux-2", "flux2"), ("flux2", "flux2"), ("flux", "flux"))
_CROSS_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_DIM = {768: "sd1", 1024: "sd2"}  # the (only) CLIP text encoder's width
# Transformer (DiT) models: kohya/BFL names and diffusers names. A T5 encoder ("encoder_block", "encoder.block")
# can sit behind lora_te2_ / text_encoder_2 (Flux) or lora_te3_ / text_encoder_3 (SD3): never SDXL evidence.
_FLUX = ("double_blocks", "single_blocks", "single_transformer_blocks", "img_attn", "txt_attn")
_SD3 = ("joint_blocks", "context_block", "_x_block_", ".x_block.", "text_encoder_3.")
# SD3.5 medium's second attention (a UNet's attn2 sits under down_blocks/…/transformer_blocks: not matched)
_SD3_ATTN2 = re.compile(r"(transformer\.|lora_transformer_)?transformer_blocks[._]\d+[._]attn2[._]")
_T5 = ("encoder_block_", "encoder.block.")
# a transformer_blocks-only diffusers / OneTrainer file fits Flux and SD3 alike: "dit" (both, by their shapes)
_DIT = ("transformer.transformer_blocks.", "lora_transformer_transformer_blocks_")
TRANSFORMER_FAMILIES = {"flux": "Flux", "flux2": "Flux.2", "sd3": "SD3", "dit": "a diffusion transformer (Flux or SD3)"}
# Flux.2 only: model-wide modulation, fused single-block projections, SwiGLU linear_in/out (diffusers names)
_FLUX2 = ("stream_modulation", "to_qkv_mlp_proj", "ff_linear_in", "ff.linear_in", "ff_context_linear_in",
          "ff_context.linear_in", "linear_out")
_UNET = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")


# Diffusion transformers this project does not adapt, by module names no supported family has (diffusers, kohya
# flattened and ComfyUI/BFL spellings): a file for one of them is refused naming it, never read as Flux/SD3/UNet
UNSUPPORTED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Qwen-Image", ("img_mod.1.", "img_mod_1.", "txt_mod.1.", "txt_mod_1.", "img_mlp.net.", "img_mlp_net_",
                    "txt_mlp.net.", "txt_mlp_net_")),
    ("Z-Image / Lumina 2", ("noise_refiner", "context_refiner")),
    ("HiDream", ("double_stream_blocks", "single_stream_blocks")),
    ("Chroma", ("distilled_guidance_layer",)),
    ("Wan", ("self_attn.q.", "self_attn_q.", "cross_attn.k.", "cross_attn_k.", "condition_embedder")),
    ("AuraFlow", ("joint_transformer_blocks",)),
    ("SANA", ("conv_inverted", "conv_depth")),
)


def unsupported_family(keys: Sequence[str]) -> str | None:
    """The name of a diffusion-transformer family this project does not support, when the keys name one."""
    for name, markers in UNSUPPORTED:
        if any(m in k for k in keys for m in markers):
            return name
    return None


def is_unet_file(keys: Sequence[str]) -> bool:
    """Keys naming UNet blocks (diffusers or SGM names): a LoRA for SD1/SD2/SDXL-style UNets."""
    return any(k.startswith(("lora_unet_", "unet.")) and any(b in k for b in _UNET) for k in keys)


def _down(k: str) -> bool:
    return "lora_down" in k or "lora_A" in k or k.endswith(".down.weight")


def family_from_keys(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The base family from key names and shapes (metadata can be wrong or missing).

    Transformer families first (Flux, SD3: their block names), then cross-attention's key input width (768 SD1,
    1024 SD2, 2048 SDXL), SDXL-only UNet names and a CLIP (not T5) second text encoder, then the single text
    encoder's width (768 SD1, 1024 SD2; SDXL's first one is 768 too, so ``lora_te1_`` does not count), then a
    conv proj_in (SD1; SD2 and SDXL use Linear). (``lora_te1`` alone is not SDXL: diffusers'
    ``convert_state_dict_to_kohya`` writes it for SD1 too.)
    """
    keys = list(shapes)
    if any(p in k for k in keys for p in _FLUX2):
        return "flux2"
    if any(p in k for k in keys for p in _FLUX):
        return flux_generation(shapes) or "flux"
    if any(p in k for k in keys for p in _SD3) or any(_SD3_ATTN2.match(k) for k in keys):
        return "sd3"
    if any(k.startswith(_DIT) for k in keys):  # the real widths tell them apart: Flux 3072, SD3.5 medium 1536, large 2432
        widths = {int(s[1]) for k, s in shapes.items() if k.startswith(_DIT) and "attn" in k and _down(k) and len(s) == 2}
        return "flux" if 3072 in widths else "sd3" if widths & {1536, 2432} else "dit"
    cross = [int(s[1]) for k, s in shapes.items() if ("attn2_to_k" in k or "attn2.to_k" in k) and _down(k) and len(s) >= 2]
    for width in cross:
        if width in _CROSS_DIM:
            return _CROSS_DIM[width]
    te2_clip = any(k.startswith(("lora_te2_", "text_encoder_2.")) and not any(t in k for t in _T5) for k in keys)
    if te2_clip or any("input_blocks_" in k or "label_emb_" in k for k in keys):
        return "sdxl"
    for k, s in shapes.items():
        if k.startswith(("lora_te_", "text_encoder.")) and "q_proj" in k and _down(k) and len(s) >= 2:
            fam = _TE_DIM.get(int(s[1]))
            if fam:
                return fam
    # (a cross-attention width none of these families has, e.g. the 64 of the demo model, is not SD1 either)
    if not cross and any("proj_in" in k and _down(k) and len(s) == 4 for k, s in shapes.items()):
        return "sd1"
    return None


def module_dims(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int]]:
    """Module -> (out, in) from LoRA down/up (or lora_A/B) and LoKr factor shapes (out = a·b, in = c·d)."""
    parts: dict[str, dict[str, Sequence[int]]] = {}
    for k, s in shapes.items():
        for suffix in (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".lokr_w1",
                       ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b"):
            if k.endswith(suffix) and len(s) >= 2:
                parts.setdefault(k[:-len(suffix)], {})[suffix.split(".")[1]] = s
    out = {}
    for m, p in parts.items():
        if ("lora_down" in p or "lora_A" in p) and ("lora_up" in p or "lora_B" in p):
            out[m] = (int((p.get("lora_up") or p["lora_B"])[0]), int((p.get("lora_down") or p["lora_A"])[1]))
            continue
        a, c = (p["lokr_w1"][:2] if "lokr_w1" in p else (p.get("lokr_w1_a", (0,))[0], p.get("lokr_w1_b", (0, 0))[1]))
        b, d = (p["lokr_w2"][:2] if "lokr_w2" in p else (p.get("lokr_w2_a", (0,))[0], p.get("lokr_w2_b", (0, 0))[1]))
        if a * b * c * d:
            out[m] = (int(a * b), int(c * d))
    return out


def flux_generation(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Flux.1 or Flux.2 from a BFL-named file's shapes; None when they do not tell (attention at width 3072 only).
    Flux.1: MLP 4x (GELU), single linear1 = 3h + 4h, linear2 in 5h, width 3072. Flux.2: SwiGLU MLP (in 2·3h),
    linear1 = 3h + 6h, linear2 in 4h, widths 3072 (klein 4B), 4096 (klein 9B), 6144 (dev)."""
    for m, (o, i) in module_dims(shapes).items():
        if m.endswith(("mlp_0", "mlp.0", "linear1")):  # out/in: 4 / 7 (Flux.1), 6 / 9 (Flux.2)
            found = {4: "flux", 7: "flux", 6: "flux2", 9: "flux2"}.get(round(o / i))
        elif m.endswith("linear2"):  # in/out: 5 (Flux.1), 4 (Flux.2)
            found = {5: "flux", 4: "flux2"}.get(round(i / o))
        else:
            found = "flux2" if m.endswith(("qkv", "attn_proj", "attn.proj")) and {o, i} & {4096, 6144} else None
        if found:
            return found
    return None


def family_from_metadata(meta: Mapping[str, str]) -> str | None:
    version = meta.get("ss_base_model_version", "")
    for prefix, fam in _FAMILY_META:
        if version.startswith(prefix):
            return fam
    if meta.get("ss_v2") == "True":
        return "sd2"
    arch = meta.get("modelspec.architecture", "")
    for prefix, fam in _ARCH:
        if arch.startswith(prefix):
            return fam
    return {f: f for f in ("sd1", "sd2", "sdxl", "sd3", "flux", "flux2")}.get(meta.get("base_model_family", ""))


_UNET_FAMILIES = ("sd1", "sd2", "sdxl")
# families whose files share these key names: the metadata may pick among them (widths only guess)
_SHARED_NAMES = {None: _UNET_FAMILIES, "dit": ("flux", "flux2", "sd3"), "flux": ("flux", "flux2")}


def file_family(shapes: Mapping[str, Sequence[int]], meta: Mapping[str, str]) -> str | None:
    """The base family: the one the metadata names (our canonical files record the model's, ``base_model_family``)
    where the key names fit it, else the keys' and shapes' answer; metadata alone is the fallback.

    Widths only guess (a reduced-width SD3 such as the DiT demo model has neither 1536 nor 2432: "dit"), so the
    metadata wins over them; key names do not (a Flux.2-only, SD3-only or SDXL-only name, or a transformer's blocks
    against a UNet family in the metadata, keep the keys' family), so loading never fits a file to a family whose
    modules its names do not have."""
    found, named = family_from_keys(shapes), family_from_metadata(meta)
    if found is None or named is None:
        return found or named
    by_names = family_from_keys({k: () for k in shapes})  # the key names alone (no widths): None, "dit", a family
    return named if named in _SHARED_NAMES.get(by_names, (by_names,)) else found
