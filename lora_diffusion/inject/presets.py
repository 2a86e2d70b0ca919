"""Named target presets for diffusers UNets and diffusion transformers (Flux, SD3), CLIP / T5 text encoders and
transformers causal LMs."""

from __future__ import annotations

from torch import nn

from ..core.errors import TargetError

_ATTN = r"re:.*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_PROJ = r"re:.*\.attentions\.\d+\.(proj_in|proj_out)"
_FF = r"re:.*\.ff\.net\.(0\.proj|2)"
_CONV = r"re:.*\.resnets\.\d+\.(conv1|conv2|conv_shortcut)"
# diffusion transformers (diffusers FluxTransformer2DModel, SD3Transformer2DModel): double-stream / joint blocks
# ``transformer_blocks.N`` (image stream to_q/k/v/out.0, text stream add_q/k/v_proj/to_add_out, SD3.5's second
# attention attn2), single-stream blocks ``single_transformer_blocks.N`` (Flux: to_q/k/v, proj_mlp, proj_out)
_BLOCKS = r"(.*\.)?(single_)?transformer_blocks\.\d+\."
_DIT_ATTN = rf"re:{_BLOCKS}attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DIT_MLP = rf"re:{_BLOCKS}(ff|ff_context)\.net\.(0\.proj|2)"
_DIT_SINGLE_MLP = rf"re:{_BLOCKS}(proj_mlp|proj_out)"
_DIT_MOD = rf"re:{_BLOCKS}(norm1|norm1_context|norm)\.linear"  # adaLN modulation linears (timestep/pooled text)
# Flux.2 (Flux2Transformer2DModel): single blocks fuse attention and MLP (attn.to_qkv_mlp_proj in, attn.to_out out:
# their only linears, the attention diffusers' Flux.2 DreamBooth script adapts), SwiGLU MLPs ff.linear_in/out, and
# the modulation is shared by all blocks (three model-level linears)
_DIT2_SINGLE = r"re:(.*\.)?single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
_DIT2_MLP = rf"re:{_BLOCKS}(ff|ff_context)\.(linear_in|linear_out)"
_DIT2_MOD = r"re:(.*\.)?(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear"
_T5_ATTN = r"re:(.*\.)?SelfAttention\.(q|k|v|o)"
_T5_MLP = r"re:(.*\.)?DenseReluDense\.(wi|wi_0|wi_1|wo)"
_LLM_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj", "attn.c_attn", "attn.c_proj"]
_LLM_MLP = ["gate_proj", "up_proj", "down_proj", "mlp.c_fc", "mlp.c_proj"]

DIT_CLASSES = ("FluxTransformer2DModel", "SD3Transformer2DModel", "Flux2Transformer2DModel")

PRESETS: dict[str, list[str]] = {
    # diffusers UNet2DConditionModel: to_q/to_k/to_v/to_out.0 of self- (attn1) and cross-attention (attn2)
    "unet-attn": [_ATTN],
    "unet-attn-proj": [_ATTN, _PROJ],
    "unet-attn-ff": [_ATTN, _FF],
    "unet-full": [_ATTN, _PROJ, _FF, _CONV],
    # transformers CLIPTextModel
    "clip-text": [r"re:.*self_attn\.(q_proj|k_proj|v_proj|out_proj)"],
    "clip-text-mlp": [r"re:.*self_attn\.(q_proj|k_proj|v_proj|out_proj)", r"re:.*mlp\.(fc1|fc2)"],
    # diffusion transformers: attention (both streams); + MLPs (kohya's Flux default, diffusers' DreamBooth targets
    # plus the MLPs); + adaLN modulation linears (kohya with include_patterns '.*(img_mod|txt_mod|modulation).*')
    "dit-attn": [_DIT_ATTN, _DIT2_SINGLE],
    "dit-attn-mlp": [_DIT_ATTN, _DIT2_SINGLE, _DIT_MLP, _DIT_SINGLE_MLP, _DIT2_MLP],
    "dit-full": [_DIT_ATTN, _DIT2_SINGLE, _DIT_MLP, _DIT_SINGLE_MLP, _DIT2_MLP, _DIT_MOD, _DIT2_MOD],
    # transformers T5EncoderModel (Flux's text_encoder_2, SD3's text_encoder_3): kohya's T5Attention (+ gated MLP)
    "t5-text": [_T5_ATTN],
    "t5-text-mlp": [_T5_ATTN, _T5_MLP],
    # transformers causal LMs (Llama-style and GPT-2)
    "llm": _LLM_ATTN + _LLM_MLP,
    "llm-attn": _LLM_ATTN,
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def default_preset(model: nn.Module) -> str:
    """Pick a preset from the model's class: UNets get attention, diffusion transformers attention and MLPs, CLIP and
    T5 encoders their attention, else an LLM."""
    cls = type(model).__name__
    if "UNet" in cls:
        return "unet-attn"
    if cls in DIT_CLASSES:
        return "dit-attn-mlp"
    if cls == "T5EncoderModel":
        return "t5-text"
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
