"""Tiny Flux.1- and SD3-shaped pipelines built from configs, saved to a folder (random weights, no download).

The transformers are diffusers' own ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` at width 32 with one
double-stream (joint) block and, for Flux, one single-stream block; the text encoders are 2-layer CLIP models and a
2-layer T5 encoder. The T5 side uses the same hand-written CLIP BPE tokenizer as ``tiny_sd`` (a real T5
SentencePiece model cannot be downloaded here); the pipelines only call it as a tokenizer, so this changes
nothing about how the T5 embeddings reach the transformer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .tiny_sd import _text_encoder, _tokenizer, write_tokenizer


def _t5(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def _vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_flux_transformer(guidance_embeds: bool = True):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))


def tiny_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                 pooled_projection_dim=32, out_channels=4)


def build_tiny_flux(folder: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Save a tiny FluxPipeline (dev-like: guidance embedding; ``guidance_embeds=False``: schnell-like)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    tok = _tokenizer(write_tokenizer(folder / "_tok"))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=_vae(4), text_encoder=_text_encoder(len(tok)), tokenizer=tok,
                        text_encoder_2=_t5(len(tok)), tokenizer_2=tok,
                        transformer=tiny_flux_transformer(guidance_embeds))
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusion3Pipeline (two CLIP encoders of width 16 with projections, T5 of width 32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tok = _tokenizer(write_tokenizer(folder / "_tok"))
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4),
        text_encoder=_text_encoder(len(tok), 16, projection=True), tokenizer=tok,
        text_encoder_2=_text_encoder(len(tok), 16, projection=True), tokenizer_2=tok,
        text_encoder_3=_t5(len(tok)), tokenizer_3=tok, transformer=tiny_sd3_transformer())
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def flux_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def sd3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))
