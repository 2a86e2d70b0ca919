"""Empty (``meta`` device) SD1.x / SD2.x / SDXL pipelines: module names and shapes for converting files without a model.

Only what differs from the diffusers / transformers defaults is written down (the real configs' structure).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

UNET: dict[str, dict[str, Any]] = {
    "sd1": {"cross_attention_dim": 768, "sample_size": 64},
    "sd2": {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
            "sample_size": 96},
    "sdxl": {"block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10],
             "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128},
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
CLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280}
TEXT = {"sd1": {"text_encoder": CLIP_L}, "sd2": {"text_encoder": CLIP_H},
        "sdxl": {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G}}
# diffusion transformers: the published transformer/config.json values (tests/fixtures, sources in its README)
FLUX1_DEV = {"attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
             "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
             "patch_size": 1, "pooled_projection_dim": 768}
SD35_LARGE = {"attention_head_dim": 64, "caption_projection_dim": 2432, "in_channels": 16, "joint_attention_dim": 4096,
              "num_attention_heads": 38, "num_layers": 38, "out_channels": 16, "patch_size": 2,
              "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm", "sample_size": 128}
SD35_MEDIUM = SD35_LARGE | {"caption_projection_dim": 1536, "num_attention_heads": 24, "num_layers": 24,
                            "pos_embed_max_size": 384, "dual_attention_layers": list(range(13))}
# Flux.2 (diffusers' Flux2Transformer2DModel defaults are FLUX.2-dev's); klein 4B: 3072 wide, 5 + 20 blocks
FLUX2_DEV = {"attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32], "guidance_embeds": True, "in_channels": 128,
             "joint_attention_dim": 15360, "mlp_ratio": 3.0, "num_attention_heads": 48, "num_layers": 8,
             "num_single_layers": 48, "patch_size": 1, "rope_theta": 2000, "timestep_guidance_channels": 256}
FLUX2_KLEIN_4B = FLUX2_DEV | {"guidance_embeds": False, "joint_attention_dim": 7680, "num_attention_heads": 24,
                              "num_layers": 5, "num_single_layers": 20}
DIT = {"flux": FLUX1_DEV, "sd3": SD35_MEDIUM, "sd35-large": SD35_LARGE, "flux2": FLUX2_DEV,
       "flux2-klein-4b": FLUX2_KLEIN_4B}
FAMILY_OF = {"sd35-large": "sd3", "flux2-klein-4b": "flux2"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu"}


class Skeleton:
    """A stand-in pipeline: ``components`` holds meta-device models (no memory, no weights)."""

    def __init__(self, family: str) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        if family not in UNET and family not in DIT:
            raise ValueError(f"base family {family!r}; expected one of {sorted(UNET) + sorted(DIT)}")
        self.family = FAMILY_OF.get(family, family)
        if family in DIT:
            self.components = _dit_components(family)
            return
        with torch.device("meta"):
            comps: dict[str, nn.Module] = {"unet": UNet2DConditionModel(**UNET[family])}
            for name, cfg in TEXT[family].items():
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                comps[name] = cls(CLIPTextConfig(**cfg))
        self.components = comps


def _dit_components(family: str) -> dict[str, nn.Module]:
    """Flux.1-dev (CLIP-L, T5-XXL), SD3.5 medium / large (CLIP-L, CLIP-G, T5-XXL) or a Flux.2 transformer (its LLM
    text encoder is in no LoRA layout read here) on the meta device."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if family.startswith("flux2"):
        with torch.device("meta"):
            return {"transformer": Flux2Transformer2DModel(**DIT[family])}
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        if family == "flux":
            return {"transformer": FluxTransformer2DModel(**DIT[family]),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)), "text_encoder_2": t5}
        return {"transformer": SD3Transformer2DModel(**DIT[family]),
                "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, projection_dim=768)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), "text_encoder_3": t5}
