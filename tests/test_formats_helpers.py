"""Builders shared by the format tests: tiny SD1.x- and SDXL-shaped pipelines, random PEFT/kohya LoRAs.

No tests here. Nothing is downloaded: the tokenizers are never used by ``load_lora_weights``, so the
pipelines are assembled with ``tokenizer=None``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def text_encoder(hidden: int = 32, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def sd15_unet_config(cross: int = 32) -> dict:
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=cross, attention_head_dim=8, norm_num_groups=8)


def sdxl_like_unet_config() -> dict:
    """SDXL's block structure (no attention in the first block, transformer_layers_per_block growing, linear
    projections, text_time added conditioning) at toy width."""
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=64,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=8)


def sd15_pipeline(seed: int = 0, cross: int = 32):
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd15_unet_config(cross)).eval()
    return StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder(cross, seed=seed), tokenizer=None, unet=unet,
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sdxl_pipeline(seed: int = 0):
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sdxl_like_unet_config()).eval()
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=text_encoder(32, seed=seed),
                                     text_encoder_2=text_encoder(32, projection=True, seed=seed + 1), tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=DDPMScheduler())


def peft_state_dict(model: nn.Module, targets: list[str], seed: int, ranks: tuple[int, ...] = (4, 2)) -> dict[str, torch.Tensor]:
    """Random (non-zero) PEFT LoRA weights for ``model``, made by PEFT itself on a copy (ranks vary per module)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    m = copy.deepcopy(model)
    names = [n for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))
             and any(n == t or n.endswith("." + t) for t in targets)]
    rank_pattern = {f"^{n}": ranks[i % len(ranks)] for i, n in enumerate(names)}
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=ranks[0], lora_alpha=ranks[0], target_modules=names, rank_pattern=rank_pattern,
                                       init_lora_weights=False), m)
    return {k: v.detach().clone() * 0.5 for k, v in get_peft_model_state_dict(m).items()}


def kohya_from_peft(components: dict[str, dict[str, torch.Tensor]], seed: int = 0) -> dict[str, torch.Tensor]:
    """diffusers' own PEFT -> kohya converter, with alphas varied: some alpha != rank, some modules without alpha."""
    from diffusers.utils import convert_state_dict_to_kohya

    sd = {f"{c}.{k}": v for c, d in components.items() for k, v in d.items()}
    out = convert_state_dict_to_kohya(sd)
    g = torch.Generator().manual_seed(seed)
    for i, k in enumerate(sorted(k for k in out if k.endswith(".alpha"))):
        if i % 3 == 1:
            out[k] = torch.tensor(float(torch.randint(1, 9, (1,), generator=g)))
        elif i % 3 == 2:
            del out[k]  # no alpha: alpha = rank
    return out


def adaptable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Linear/Conv2d weight by module path, looking through PEFT and our wrappers (their base layer)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and "lora_" not in n and ".adapters." not in n:
            out[n.replace(".base_layer", "")] = m.weight.detach().clone()
    return out


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12)) for k in a)


def unet_call(unet, seed: int = 0, sdxl: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, 500, enc, **kw).sample


def te_call(te) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 9, 17, 1], [0, 3, 3, 40, 1]])
    with torch.no_grad():
        return te(ids)[0]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())) and not math.isnan(float(a.sum()))
