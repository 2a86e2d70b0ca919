"""Tiny diffusion transformers for tests (random weights, no download), two kinds:

- Saved pipelines (``build_tiny_flux`` / ``build_tiny_sd3``, fixtures ``flux_model`` / ``sd3_model``): diffusers'
  own ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` at width 32 with one double-stream (joint) block and,
  for Flux, one single-stream block; 2-layer CLIP text encoders and a 2-layer T5 encoder; loaded through
  ``from_pretrained`` by the trainer and ``generate``. The T5 side uses the same hand-written CLIP BPE tokenizer as
  ``tiny_sd`` (a real T5 SentencePiece model cannot be downloaded here); the pipelines only call it as a tokenizer,
  so this changes nothing about how the T5 embeddings reach the transformer.
- Reduced real configs for numeric parity (``tiny_dit``, ``tiny_flux2``, ``tiny_dit_pipeline``): the published
  Flux.1 / SD3.5 / FLUX.2 transformer configs (tests/fixtures) with fewer blocks and small widths, float64, and
  their calls (``dit_call``, ``flux2_call``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import load_config
from .tiny_sd import _text_encoder, _tokenizer, write_tokenizer


def _t5(vocab_size: int, d_model: int = 32, **over):
    """A 2-layer T5 encoder of width ``d_model``; ``over``: other T5Config fields (``tiny_t5``: T5 v1.1's gated MLP)."""
    from transformers import T5Config, T5EncoderModel

    cfg = dict(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0) | over
    return T5EncoderModel(T5Config(**cfg))


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


# --- reduced real configs (numeric parity) ----------------------------------------------------------------------
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
    """The T5 v1.1-style (gated-gelu) encoder of the reduced pipelines, float64."""
    torch.manual_seed(seed)
    return _t5(64, d_ff=48, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32).double().eval()


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


def write_ring_dotted_loras(folder: Path, out: Path) -> dict[str, Path]:
    """Two LoRAs on a tiny DiT's transformer, written as our trainer writes them: ``ring`` (lora_kind concept) and
    ``dotted`` (style), random factors (seeds 0 and 1) large enough to change the output."""
    import lora_diffusion as ld
    from lora_diffusion.generate import load_pipeline

    pipe, files = load_pipeline(str(folder)), {}
    for i, (name, kind) in enumerate((("ring", "concept"), ("dotted", "style"))):
        ld.add_adapter(pipe.transformer, ld.AdapterSpec(rank=4, targets="dit-attn", seed=i), name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for _, p in ld.adapter_parameters(pipe.transformer, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        files[name] = out / f"{name}.safetensors"
        ld.save_adapter(pipe, files[name], name, metadata={"lora_kind": kind})
    return files


@pytest.fixture(scope="session")
def flux_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def sd3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))
