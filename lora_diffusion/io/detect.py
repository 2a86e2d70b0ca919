"""Which format a file is in, and which base model family it was made for, from keys, shapes and metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import canonical

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.")
PEFT_PREFIX = "base_model.model."
_LORA_PARAMS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector", ".vera_lambda_", ".hada_w", ".lokr_w")
OLD_DIFFUSERS = ("_lora.down", "_lora.up", ".lora.down", ".lora.up", "lora_linear_layer")


def detect_format(keys: Sequence[str], meta: Mapping[str, str]) -> str:
    """"canonical" | "kohya" | "diffusers" | "peft" | "old-diffusers" | "unknown"."""
    if canonical.is_canonical(dict(meta)):
        return "canonical"
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(p in k for k in keys for p in OLD_DIFFUSERS):
        return "old-diffusers"
    if keys and all(any(p in k for p in _LORA_PARAMS) for k in keys):
        return "diffusers"  # with component prefixes, or a bare model's ("down_blocks.0...lora_A.weight")
    return "unknown"


_FAMILY_META = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"))
_ARCH = (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"))
_CROSS_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def family_from_keys(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """From cross-attention's key input width (768 SD1, 1024 SD2, 2048 SDXL), else SDXL-only names.

    (``lora_te1`` alone is not SDXL: diffusers' ``convert_state_dict_to_kohya`` writes it for SD1 too.)
    """
    for k, s in shapes.items():
        if ("attn2_to_k" in k or "attn2.to_k" in k) and ("lora_down" in k or "lora_A" in k) and len(s) >= 2:
            fam = _CROSS_DIM.get(int(s[1]))
            if fam:
                return fam
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) or "input_blocks_" in k or "label_emb_" in k for k in shapes):
        return "sdxl"
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
    return {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}.get(meta.get("base_model_family", ""))


def file_family(shapes: Mapping[str, Sequence[int]], meta: Mapping[str, str]) -> str | None:
    """Keys and shapes decide (they cannot lie about what the tensors fit); metadata is the fallback."""
    return family_from_keys(shapes) or family_from_metadata(meta)
