"""``lora_diffusion.generate``: adapters on a stock diffusers pipeline, T-LoRA's mask set per denoising step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core.functional import active_rank
from lora_diffusion.generate import apply_adapters, generate, install_timestep_hook, load_pipeline, remove_timestep_hook
from lora_diffusion.inject.walker import adapted_layers, model_state

from .tiny_sd import _one_thread, sd_model, sdxl_model  # noqa: F401

RANK, MIN_RANK = 8, 2


def make_adapter(pipe, path: Path, variant: str = "tlora", seed: int = 0, **options) -> Path:
    spec = ld.AdapterSpec(variant=variant, rank=RANK, targets="unet-attn", seed=seed,
                          options={"min_rank": MIN_RANK, **options} if variant == "tlora" else {})
    ld.add_adapter(pipe.unet, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in ld.adapter_parameters(pipe.unet):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ld.save_adapter(pipe.unet, path)
    ld.remove_adapters(pipe.unet)
    return path


def record_ranks(unet) -> list[tuple[float, int]]:
    """A second pre-hook (after the library's): (timestep of the call, active rank the T-LoRA layers see)."""
    name, layer = next(iter(adapted_layers(unet)))
    adapter = next(iter(layer.adapters.values()))
    seen: list[tuple[float, int]] = []

    def hook(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        ctx = model_state(unet).holder.state
        mask = adapter.mask(ctx)
        seen.append((float(torch.as_tensor(t).flatten()[0]), int(mask.reshape(-1, RANK)[0].sum())))

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_tlora_rank_follows_every_denoising_step(scheduler, sd_model, tmp_path):  # noqa: F811
    import diffusers

    pipe = load_pipeline(sd_model)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    apply_adapters(pipe, [make_adapter(pipe, tmp_path / "s.safetensors")])
    seen = record_ranks(pipe.unet)
    generate(pipe, ["a photo of sks dog"], steps=6, guidance_scale=5.0, height=32, width=32)
    assert len(seen) == 6  # one UNet call per step, both CFG halves in it
    expected = [active_rank(t, RANK, MIN_RANK, 1000) for t, _ in seen]
    assert [r for _, r in seen] == expected
    assert len(set(expected)) > 2  # the mask really changes along the trajectory
    assert seen[0][1] < seen[-1][1]  # noisy first steps use fewer ranks


def test_hook_changes_the_image_and_can_be_removed(sd_model, tmp_path):  # noqa: F811
    pipe = load_pipeline(sd_model)
    pipe.set_progress_bar_config(disable=True)
    apply_adapters(pipe, [make_adapter(pipe, tmp_path / "s.safetensors")])
    kw = dict(steps=4, height=32, width=32, seed=1)
    with_mask = generate(pipe, ["a photo of sks dog"], **kw)[0]
    remove_timestep_hook(pipe.unet)
    ld.set_timestep(pipe.unet, None)
    pipe("x", num_inference_steps=1, height=32, width=32)  # without the hook nothing sets a timestep
    assert model_state(pipe.unet).holder.state.timestep is None
    install_timestep_hook(pipe.unet, 1000)
    again = generate(pipe, ["a photo of sks dog"], **kw)[0]
    assert list(with_mask.getdata()) == list(again.getdata())  # deterministic with the hook
    remove_timestep_hook(pipe.unet)
    g = torch.Generator().manual_seed(1)
    full = pipe("a photo of sks dog", num_inference_steps=4, height=32, width=32, generator=g).images[0]
    assert list(full.getdata()) != list(with_mask.getdata())


def test_several_adapters_with_scales_on_sdxl(sdxl_model, tmp_path):  # noqa: F811
    pipe = load_pipeline(sdxl_model)
    pipe.set_progress_bar_config(disable=True)
    a = make_adapter(pipe, tmp_path / "subject.safetensors", "tlora", seed=1)
    b = make_adapter(pipe, tmp_path / "style.safetensors", "lora", seed=2)
    names = apply_adapters(pipe, [a, b], [0.8, 0.5])
    assert names == ["subject", "style"]
    seen = record_ranks(pipe.unet)
    images = generate(pipe, ["a photo of sks dog"], steps=3, height=32, width=32, num_images=2)
    assert len(images) == 2 and len(seen) == 6
    assert all(r == active_rank(t, RANK, MIN_RANK, 1000) for t, r in seen)


@pytest.mark.slow
def test_cli(sd_model, tmp_path):  # noqa: F811
    pipe = load_pipeline(sd_model)
    f = make_adapter(pipe, tmp_path / "s.safetensors")
    cmd = [sys.executable, "-m", "lora_diffusion.generate", "--model", str(sd_model), "--adapter", str(f), "--scale",
           "0.7", "--prompt", "a photo of {0} on the beach", "--token", "sks dog", "--steps", "2", "--height", "32",
           "--width", "32", "--output", str(tmp_path / "out"), "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env={**__import__("os").environ,
                                                                                "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert [x.name for x in (tmp_path / "out").iterdir()] == ["a_photo_of_sks_dog_on_the_beach-0.png"]


def test_library_does_not_import_training_or_accelerate() -> None:
    code = ("import sys, lora_diffusion.generate; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('training', 'accelerate')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    assert out == "[]"
