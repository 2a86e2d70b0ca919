"""The base family a file records in its metadata (our canonical files: ``base_model_family``) against the one its
keys and widths suggest: the metadata wins where only widths tell (a reduced-width SD3 reads as "dit"), key names
win where they contradict it, and a file is refused, naming it, on a pipeline of another family."""

from __future__ import annotations

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.io.detect import file_family
from lora_diffusion.io.files import read_safetensors, write_safetensors
from lora_diffusion.io.library import describe

pytestmark = pytest.mark.usefixtures("one_thread")

FLUX, SD35L = "flux1-dev-transformer.json", "sd35-large-transformer.json"


def _pair(name: str, out: int, inp: int, r: int = 4, down: str = ".lora_A.weight", up: str = ".lora_B.weight"):
    g = torch.Generator().manual_seed(len(name))
    return {name + down: torch.randn(r, inp, generator=g), name + up: torch.randn(out, r, generator=g)}


# transformer_blocks only (the layout Flux and SD3 share), 32 wide (neither Flux's 3072 nor SD3.5's 1536 / 2432)
REDUCED_DIT = {**_pair("transformer.transformer_blocks.0.attn.to_q", 32, 32),
               **_pair("transformer.transformer_blocks.0.attn.add_k_proj", 32, 32)}
SD3_NAMES = _pair("lora_unet_joint_blocks_0_context_block_attn_qkv", 96, 32, down=".lora_down.weight",
                  up=".lora_up.weight")
FLUX2_NAMES = _pair("transformer.transformer_blocks.0.ff.linear_in", 192, 32)
SDXL_CROSS = _pair("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, 2048,
                   down=".lora_down.weight", up=".lora_up.weight")
SDXL_NAMES = _pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048, down=".lora_down.weight",
                   up=".lora_up.weight")


def _family(tmp_path, sd: dict, meta: dict) -> str | None:
    """What ``describe`` (the library index, the app, blend) says, checked against ``file_family`` on the header."""
    path = tmp_path / "f.safetensors"
    write_safetensors(path, sd, meta)
    found = describe(path)["base_family"]
    tensors, read_meta = read_safetensors(path)
    assert file_family({k: tuple(v.shape) for k, v in tensors.items()}, read_meta) == found
    return found


@pytest.mark.parametrize("meta,family", [
    ({"base_model_family": "sd3"}, "sd3"),  # what save_adapter records from an SD3 pipeline (the DiT demo model)
    ({"base_model_family": "flux"}, "flux"),
    ({"ss_base_model_version": "sd3", "modelspec.architecture": "stable-diffusion-3-medium/lora"}, "sd3"),
    ({}, "dit"),  # no metadata: today's answer from the shapes (Flux or SD3)
    ({"base_model_family": "sdxl"}, "dit"),  # a transformer's blocks are never a UNet's, whatever the metadata says
])
def test_reduced_width_transformer_file_takes_the_family_its_metadata_names(tmp_path, meta, family):
    assert _family(tmp_path, REDUCED_DIT, meta) == family


@pytest.mark.parametrize("sd,meta,family", [
    (SD3_NAMES, {}, "sd3"), (SD3_NAMES, {"base_model_family": "flux"}, "sd3"),  # SD3-only names
    (FLUX2_NAMES, {}, "flux2"), (FLUX2_NAMES, {"base_model_family": "flux"}, "flux2"),  # Flux.2-only names
    (SDXL_NAMES, {"ss_base_model_version": "sd_v1"}, "sdxl"),  # SDXL-only (SGM) block names
    (SDXL_CROSS, {}, "sdxl"),  # widths alone: 2048-wide cross-attention
    (SDXL_CROSS, {"ss_base_model_version": "sd_v1"}, "sd1"),  # widths only guess: the metadata wins
    (SDXL_CROSS, {"base_model_family": "flux"}, "sdxl"),  # UNet blocks are never a transformer's
])
def test_key_names_win_over_metadata_that_contradicts_them(tmp_path, sd, meta, family):
    assert _family(tmp_path, sd, meta) == family


def _reduced_sd3_pipeline():
    """An SD3 pipeline whose 2 joint blocks have every module Flux's double-stream blocks have, at Flux's widths."""
    from diffusers import StableDiffusion3Pipeline

    from .test_formats_helpers import text_encoder
    from .tiny_dit import tiny_dit

    return StableDiffusion3Pipeline(transformer=tiny_dit(SD35L, num_layers=2), scheduler=None, vae=None,
                                    text_encoder=text_encoder(projection=True).double(), tokenizer=None,
                                    text_encoder_2=text_encoder(hidden=48, projection=True, seed=1).double(),
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def test_canonical_sd3_file_is_refused_on_flux_naming_the_file_and_loads_on_sd3(tmp_path):
    from .tiny_dit import dit_call, tiny_dit_pipeline

    sd3 = _reduced_sd3_pipeline()
    ld.add_adapter(sd3.transformer, ld.AdapterSpec(variant="lora", rank=2, targets="dit-attn"))
    path = ld.save_adapter(sd3, tmp_path / "mine.safetensors")
    assert describe(path)["base_family"] == "sd3"
    flux = tiny_dit_pipeline(FLUX)
    names = {n for n, _ in flux.transformer.named_modules()}
    assert {k.split(".lora_")[0].removeprefix("transformer.") for k in read_safetensors(path)[0]} <= names
    before = dit_call(flux.transformer)
    with pytest.raises(ld.AdapterFileError, match=r"mine\.safetensors: this LoRA is for SD3, a transformer model; "
                                                  r"the model is Flux, a transformer model; expected a Flux LoRA"):
        ld.load_adapter(flux, path)
    with pytest.raises(ld.AdapterFileError, match=r"mine\.safetensors: this LoRA is for SD3"):
        ld.load_adapter(flux.transformer, path)
    assert ld.list_adapters(flux) == [] and torch.equal(dit_call(flux.transformer), before)
    other = _reduced_sd3_pipeline()
    assert ld.load_adapter(other, path) == "mine" and ld.list_adapters(other) == ["mine"]
