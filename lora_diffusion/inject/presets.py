"""Named target presets for diffusers UNets, CLIP text encoders and transformers causal LMs."""

from __future__ import annotations

from torch import nn

from ..core.errors import TargetError

_ATTN = r"re:.*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_PROJ = r"re:.*\.attentions\.\d+\.(proj_in|proj_out)"
_FF = r"re:.*\.ff\.net\.(0\.proj|2)"
_CONV = r"re:.*\.resnets\.\d+\.(conv1|conv2|conv_shortcut)"
_LLM_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj", "attn.c_attn", "attn.c_proj"]
_LLM_MLP = ["gate_proj", "up_proj", "down_proj", "mlp.c_fc", "mlp.c_proj"]

PRESETS: dict[str, list[str]] = {
    # diffusers UNet2DConditionModel: to_q/to_k/to_v/to_out.0 of self- (attn1) and cross-attention (attn2)
    "unet-attn": [_ATTN],
    "unet-attn-proj": [_ATTN, _PROJ],
    "unet-attn-ff": [_ATTN, _FF],
    "unet-full": [_ATTN, _PROJ, _FF, _CONV],
    # transformers CLIPTextModel
    "clip-text": [r"re:.*self_attn\.(q_proj|k_proj|v_proj|out_proj)"],
    "clip-text-mlp": [r"re:.*self_attn\.(q_proj|k_proj|v_proj|out_proj)", r"re:.*mlp\.(fc1|fc2)"],
    # transformers causal LMs (Llama-style and GPT-2)
    "llm": _LLM_ATTN + _LLM_MLP,
    "llm-attn": _LLM_ATTN,
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def default_preset(model: nn.Module) -> str:
    """Pick a preset from the model's class: UNets get attention, CLIP its attention, else an LLM."""
    cls = type(model).__name__
    if "UNet" in cls:
        return "unet-attn"
    if cls.startswith("CLIPText"):
        return "clip-text"
    if hasattr(model, "config") and hasattr(model, "generate"):
        return "llm"
    raise TargetError(
        f"no default targets for a {cls}; set AdapterSpec.targets to module-name patterns "
        f"or one of the presets {preset_names()}")


def resolve_patterns(targets: str | list[str] | None, model: nn.Module) -> list[str]:
    if targets is None:
        targets = default_preset(model)
    if isinstance(targets, str):
        return list(PRESETS[targets]) if targets in PRESETS else [targets]
    out: list[str] = []
    for t in targets:
        out.extend(PRESETS.get(t, [t]))
    return out
