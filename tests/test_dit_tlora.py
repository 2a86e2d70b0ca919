"""T-LoRA on diffusion transformers (Flux.1, SD3): r(t) on the model's timestep scale and the per-step mask in the
stock FluxPipeline / StableDiffusion3Pipeline through the same forward pre-hook ``generate`` installs on UNets."""

from __future__ import annotations

import re

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core.functional import active_rank
from lora_diffusion.families import FAMILIES, family_of, timestep_scale
from lora_diffusion.generate import apply_adapters, generate, install_timestep_hook, load_pipeline

from .tiny_dit import flux_model, sd3_model  # noqa: F401
from .tiny_sd import _one_thread  # noqa: F401

DIT_ATTN = "dit-attn"  # q/k/v/out and the context projections of every attention (lora_diffusion/inject/presets.py)
RANK, MIN_RANK = 8, 2


def _tlora(model, ortho: bool = True) -> list[str]:
    spec = ld.AdapterSpec(variant="tlora", rank=RANK, targets=DIT_ATTN, seed=0,
                          options={"min_rank": MIN_RANK, "ortho": ortho})
    return ld.add_adapter(model, spec)


def _record_ranks(model) -> list[int]:
    """Active rank of the first T-LoRA layer at every forward of ``model`` (read inside the call)."""
    seen: list[int] = []
    layer = next(ad for _, lay in ld.api.adapted_layers(model) for ad in lay.adapters.values())
    holder = ld.api.model_state(model).holder

    def probe(module, args, kwargs):
        seen.append(int(layer.mask(holder.current()).reshape(-1, RANK)[0].sum()))

    model.register_forward_pre_hook(probe, with_kwargs=True)  # runs after the timestep hook (registered first)
    return seen


@pytest.mark.parametrize("fixture", ["flux_model", "sd3_model"])
def test_pipeline_sets_the_mask_of_each_denoising_step(fixture, request):
    pipe = load_pipeline(request.getfixturevalue(fixture))
    pipe.set_progress_bar_config(disable=True)
    model = getattr(pipe, family_of(pipe).denoiser)
    names = _tlora(model)
    assert len(names) > 0
    install_timestep_hook(model, pipe.scheduler.config.num_train_timesteps)
    seen = _record_ranks(model)
    steps = 6
    with torch.no_grad():
        pipe("a photo of sks dog", num_inference_steps=steps, height=32, width=32, guidance_scale=1.0,
             max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    ts = pipe.scheduler.timesteps.tolist()  # the scheduler's t = 1000·σ of each step
    want = [active_rank(t, RANK, MIN_RANK, 1000) for t in ts]
    assert seen == want, (ts, seen, want)
    assert want[0] == MIN_RANK and len(set(want)) > 2  # starts at pure noise (σ = 1) and climbs toward r


def test_flux_timestep_is_rescaled_sd3_is_not(flux_model, sd3_model):  # noqa: F811
    assert FAMILIES["flux"].timestep_scale == 1000.0 and FAMILIES["sd3"].timestep_scale == 1.0
    flux, sd3 = load_pipeline(flux_model), load_pipeline(sd3_model)
    assert timestep_scale(flux.transformer) == 1000.0 and timestep_scale(sd3.transformer) == 1.0


def test_schedule_means_the_same_on_sd_and_flow_scales():
    """σ = 1 (pure noise) ↔ SD's t = T: r_min; σ = 0 ↔ t = 0: r; σ = 1/2 ↔ t = T/2: halfway."""
    for sigma, want in ((1.0, MIN_RANK), (0.0, RANK), (0.5, MIN_RANK + (RANK - MIN_RANK) // 2)):
        assert active_rank(1000 * sigma, RANK, MIN_RANK, 1000) == want


@pytest.mark.parametrize("fixture", ["flux_model", "sd3_model"])
def test_generate_with_a_saved_tlora(fixture, request, tmp_path):
    """generate() on the stock pipeline: the hook is installed by apply_adapters and the adapter changes the image."""
    src = request.getfixturevalue(fixture)
    pipe = load_pipeline(src)
    pipe.set_progress_bar_config(disable=True)
    model = getattr(pipe, family_of(pipe).denoiser)
    base = generate(pipe, ["a photo of sks dog"], steps=3, guidance_scale=1.0, height=32, width=32)[0]
    _tlora(model, ortho=False)
    for _, p in ld.api.adapter_parameters(model):
        torch.nn.init.normal_(p, std=0.5)
    path = ld.save_adapter(model, tmp_path / "t.safetensors")
    fresh = load_pipeline(src)
    fresh.set_progress_bar_config(disable=True)
    apply_adapters(fresh, [path])
    img = generate(fresh, ["a photo of sks dog"], steps=3, guidance_scale=1.0, height=32, width=32)[0]
    assert img.size == base.size == (32, 32)
    assert list(img.getdata()) != list(base.getdata())


def test_generate_cli_on_a_flux_folder(flux_model, tmp_path):  # noqa: F811
    from lora_diffusion.generate import main

    pipe = load_pipeline(flux_model)
    _tlora(pipe.transformer)
    adapter = ld.save_adapter(pipe.transformer, tmp_path / "t.safetensors")
    main(["--model", str(flux_model), "--adapter", str(adapter), "--prompt", "a photo of {0}", "--token", "sks dog",
          "--steps", "2", "--height", "32", "--width", "32", "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_photo_of_sks_dog-0.png"]


@pytest.mark.parametrize("key,family", [("double_blocks.0.img_attn.qkv.weight", "Flux.1"),
                                        ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD3/3.5")])
def test_dit_single_file_is_refused_with_its_family(key, family, tmp_path):
    from safetensors.torch import save_file

    from lora_diffusion.generate import ModelLoadError

    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match=f"a {re.escape(family)} single-file checkpoint"):
        load_pipeline(path)
