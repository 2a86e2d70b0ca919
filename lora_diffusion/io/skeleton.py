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


class Skeleton:
    """A stand-in pipeline: ``components`` holds meta-device models (no memory, no weights)."""

    def __init__(self, family: str) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        if family not in UNET:
            raise ValueError(f"base family {family!r}; expected one of {sorted(UNET)}")
        self.family = family
        with torch.device("meta"):
            comps: dict[str, nn.Module] = {"unet": UNet2DConditionModel(**UNET[family])}
            for name, cfg in TEXT[family].items():
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                comps[name] = cls(CLIPTextConfig(**cfg))
        self.components = comps
