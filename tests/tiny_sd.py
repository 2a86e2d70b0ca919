"""Tiny Stable Diffusion (1.x- and XL-shaped) pipelines built from configs, saved to a folder.

Nothing is downloaded: the tokenizer's vocabulary is written by hand (characters plus a few
whole words such as ``sks`` and ``dog``), every model has random weights. Used by the trainer and
generation tests and by ``benchmarks/bench_trainer.py``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_diffusion.io.files import single_thread

WORDS = ["a", "photo", "of", "sks", "dog", "cat", "in", "the", "snow", "on", "beach", "rendering"]


def write_tokenizer(folder: Path) -> Path:
    """A CLIP BPE tokenizer whose vocabulary holds single characters and the words in ``WORDS``."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-{}")
    vocab: list[str] = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for w in WORDS:  # merge the word left to right: ((s k) s</w>) ...
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def _text_encoder(vocab_size: int, hidden: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, projection_dim=hidden,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32)


def tiny_sd_unet(cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline (UNet 32/64 channels, VAE /2, 2-layer CLIP) to ``folder``."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    tok = _tokenizer(write_tokenizer(folder / "_tok"))
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_text_encoder(len(tok)), tokenizer=tok,
                                   unet=tiny_sd_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionXLPipeline (two CLIP encoders of width 32, text_time conditioning)."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok = _tokenizer(write_tokenizer(folder / "_tok"))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_text_encoder(len(tok)), tokenizer=tok,
                                     text_encoder_2=_text_encoder(len(tok), projection=True), tokenizer_2=tok,
                                     unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.save_pretrained(folder)
    return folder


def write_images(folder: Path, n: int = 1, size: int = 40, seed: int = 0) -> Path:
    """``n`` smooth random RGB images (a blob on a gradient) of ``size`` x ``size`` pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.03)
        img = np.stack([blob, xx * (1 - blob), yy * 0.5 + 0.2 * blob], -1)
        Image.fromarray((img * 255).clip(0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    return folder


# --- pytest fixtures (import them into a test module to use them) ---
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sd_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("subject"), n=1, size=40)


@pytest.fixture(autouse=True)
def _one_thread():
    """2 shared CPU cores: one thread per test process is faster and steadier."""
    with single_thread():
        yield


def tiny_config(model: Path, images: Path, out: Path, **overrides):
    """A TLoRAConfig for the tiny model: rank 4 (min 2), 32 px, 4 steps, no checkpoints, CPU."""
    from training.config import TLoRAConfig, leaf_index

    cfg = TLoRAConfig()
    values = dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(images), output_dir=str(out),
                  class_name="dog", lora_rank=4, min_rank=2, resolution=32, max_train_steps=4,
                  checkpointing_steps=None, cpu=True, progress=False, report_to="none")
    values.update(overrides)
    index = leaf_index(TLoRAConfig)
    for k, v in values.items():
        sec, name = index[k]
        setattr(getattr(cfg, sec), name, v)
    return cfg
