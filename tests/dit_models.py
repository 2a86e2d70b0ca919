"""Reduced Flux.1 / SD3.5 transformers built from the real configs (fewer blocks, small widths) and their inputs."""

from __future__ import annotations

import torch

from .conftest import load_config

SMALL = {"num_attention_heads": 2, "attention_head_dim": 16, "joint_attention_dim": 32, "pooled_projection_dim": 16}


def dit_config(fixture: str, **over) -> dict:
    cfg = {k: v for k, v in load_config(fixture).items() if not k.startswith("_")}
    if cfg.get("num_single_layers") is not None:  # Flux
        cfg |= SMALL | {"num_layers": 2, "num_single_layers": 2, "axes_dims_rope": [4, 6, 6]}
    else:  # SD3.5: the last block is context_pre_only; medium's first blocks have attn2
        cfg |= SMALL | {"num_layers": 3, "caption_projection_dim": 32, "sample_size": 8, "pos_embed_max_size": 8}
        if cfg.get("dual_attention_layers"):
            cfg["dual_attention_layers"] = [0]
    return cfg | over


def tiny_dit(fixture: str = "flux1-dev-transformer.json", seed: int = 0, **over):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cfg = dit_config(fixture, **over)
    cls = FluxTransformer2DModel if "num_single_layers" in cfg else SD3Transformer2DModel
    torch.manual_seed(seed)
    return cls(**cfg).double().eval()


def dit_call(model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    txt = torch.randn(1, 5, cfg.joint_attention_dim, generator=g, dtype=torch.float64)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g, dtype=torch.float64)
    t = torch.tensor([0.6], dtype=torch.float64)
    with torch.no_grad():
        if "Flux" in type(model).__name__:
            x = torch.randn(1, 4, cfg.in_channels, generator=g, dtype=torch.float64)
            ids = torch.zeros(4, 3)
            ids[:, 1], ids[:, 2] = torch.arange(4) // 2, torch.arange(4) % 2
            guidance = torch.tensor([3.5], dtype=torch.float64) if cfg.guidance_embeds else None
            return model(x, txt, pooled, t, ids, torch.zeros(5, 3), guidance=guidance).sample
        x = torch.randn(1, cfg.in_channels, 4, 4, generator=g, dtype=torch.float64)
        return model(x, txt, pooled, t * 1000).sample


FLUX2 = "flux2-dev-transformer.json"
# Flux.2's RoPE needs head dim 128 (axes 4 x 32); 3 heads give W2 heights that do not divide the 384-row q/k/v parts
FLUX2_SMALL = {"num_layers": 2, "num_single_layers": 2, "num_attention_heads": 3, "joint_attention_dim": 32,
               "in_channels": 16}


def tiny_flux2(fixture: str = FLUX2, seed: int = 0, **over):
    """A reduced Flux.2 transformer (2 double + 2 single blocks, 384 wide) from the real config, float64."""
    from diffusers import Flux2Transformer2DModel

    cfg = {k: v for k, v in load_config(fixture).items() if not k.startswith("_")} | FLUX2_SMALL | over
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**cfg).double().eval()


def flux2_call(model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(1, 4, cfg.in_channels, generator=g, dtype=torch.float64)
    txt = torch.randn(1, 5, cfg.joint_attention_dim, generator=g, dtype=torch.float64)
    img_ids, txt_ids = torch.zeros(1, 4, 4), torch.zeros(1, 5, 4)
    img_ids[0, :, 1], img_ids[0, :, 2], txt_ids[0, :, 3] = torch.arange(4) // 2, torch.arange(4) % 2, torch.arange(5)
    guidance = torch.tensor([3.5], dtype=torch.float64) if cfg.guidance_embeds else None
    with torch.no_grad():
        return model(x, txt, torch.tensor([0.6], dtype=torch.float64), img_ids, txt_ids, guidance=guidance).sample


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
    return T5EncoderModel(cfg).double().eval()


def tiny_dit_pipeline(fixture: str = "flux1-dev-transformer.json", seed: int = 0):
    """A Flux or SD3 pipeline of reduced components (tokenizers, VAE and scheduler left out: loading LoRAs never
    uses them): Flux = CLIP-L-style text_encoder + T5 text_encoder_2; SD3 = two CLIPs with projection + T5."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from .test_formats_helpers import text_encoder

    transformer = tiny_dit(fixture, seed)
    if "Flux" in type(transformer).__name__:
        return FluxPipeline(scheduler=None, vae=None, text_encoder=text_encoder(seed=seed).double(), tokenizer=None,
                            text_encoder_2=tiny_t5(seed), tokenizer_2=None, transformer=transformer)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=None, vae=None,
                                    text_encoder=text_encoder(projection=True, seed=seed).double(), tokenizer=None,
                                    text_encoder_2=text_encoder(hidden=48, projection=True, seed=seed + 1).double(),
                                    tokenizer_2=None, text_encoder_3=tiny_t5(seed), tokenizer_3=None)


def te_out(encoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder(torch.tensor([[0, 5, 9, 3, 1]])).last_hidden_state
