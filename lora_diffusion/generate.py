"""Generate images with adapters on a standard diffusers pipeline.

    python -m lora_diffusion.generate --adapter subject.safetensors --prompt "a photo of {0} on a beach" \\
        --token "sks dog" [--model <hub id | folder | file.safetensors>] [--scale 0.8] [--steps 25]

T-LoRA's rank mask follows the denoising timestep through a forward pre-hook on the denoiser (the UNet of SD/SDXL,
the transformer of Flux/SD3): before each call the hook reads the call's ``timestep`` argument, brings it to the
0..1000 scale (Flux passes σ = t/1000: ×1000; lora_diffusion/families.py) and calls ``set_timestep(model, t)``.
The pipeline is not forked, so the stock diffusers pipelines, schedulers and classifier-free guidance work.
diffusers is imported lazily; this module never imports accelerate or the trainer.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import api
from .core.errors import AdapterError
from .embeddings import expand_prompt
from .families import BY_PIPELINE, denoiser, family_of, timestep_position, timestep_scale

log = logging.getLogger(__name__)
SUPPORTED = tuple(BY_PIPELINE)  # SD1.x/2.x, SDXL, Flux.1, SD3/3.5
HOOK_ATTR = "_lora_timestep_hook"
GUIDANCE = {"flux": 3.5, "sd3": 7.0}  # the stock pipelines' default guidance_scale (SD/SDXL here: 5.0)


class ModelLoadError(AdapterError):
    """A base model that cannot be found or loaded (not cached offline, unsupported, corrupt)."""


# --- the timestep hook ---
def _timestep_pre_hook(num_train_timesteps: int | None, scale: float, position: int | None, module: nn.Module,
                       args: tuple, kwargs: dict) -> None:
    t = kwargs.get("timestep", args[position] if position is not None and len(args) > position else None)
    if t is None:
        return
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if scale != 1.0:  # Flux: σ = t/1000 -> t; float64 and 1e-3 rounding so t/1000*1000 lands back on t
            t = torch.round(t.double() * scale, decimals=3).float()
    elif scale != 1.0:
        t = round(float(t) * scale, 3)
    api.set_timestep(module, t, num_train_timesteps)


def install_timestep_hook(model: nn.Module, num_train_timesteps: int | None = None) -> RemovableHandle:
    """Make every ``model(..., timestep=..., ...)`` call (UNet or DiT) set the adapters' timestep first (idempotent)."""
    old = getattr(model, HOOK_ATTR, None)
    if old is not None:
        old.remove()
    hook = functools.partial(_timestep_pre_hook, num_train_timesteps, timestep_scale(model), timestep_position(model))
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(model, HOOK_ATTR, handle)
    return handle


def remove_timestep_hook(unet: nn.Module) -> None:
    handle = getattr(unet, HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(unet, HOOK_ATTR)
    api.set_timestep(unet, None)


def apply_adapters(pipe: Any, paths: Sequence[str | os.PathLike], scales: Sequence[float] | None = None,
                   names: Sequence[str] | None = None) -> list[str]:
    """Load adapter files onto a pipeline, activate them with ``scales`` and install the timestep hook."""
    scales = list(scales) if scales else [1.0] * len(paths)
    if len(scales) != len(paths):
        raise AdapterError(f"{len(paths)} adapters but {len(scales)} scales")
    loaded = [api.load_adapter(pipe, p, name=(names[i] if names else None)) for i, p in enumerate(paths)]
    if loaded:
        api.set_adapters(pipe, loaded, scales)
    install_timestep_hook(denoiser(pipe), pipe.scheduler.config.num_train_timesteps)
    return loaded


# --- loading a base pipeline ---
def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def resolve_source(source: str | os.PathLike | None) -> str:
    """The base model to load: ``source``, else the embedded demo model (``lora_diffusion.demo.model``)."""
    from .demo.model import DemoModelError, check_demo_name, default_model_path, resolve_demo_name

    if source is not None:
        try:
            check_demo_name(source)
        except DemoModelError as e:
            raise ModelLoadError(str(e)) from None
        return str(resolve_demo_name(source))  # `demo-sd3`: the embedded DiT demo model's folder

    try:
        return str(default_model_path())
    except DemoModelError as e:
        raise ModelLoadError(
            f"no base model given, and {e} Or pass one with --pretrained_model_name_or_path (generate: --model): "
            "a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, a local diffusers folder, or a single "
            ".safetensors checkpoint") from None


def _single_file_class(path: Path) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    for marker, family in ((".double_blocks.", "Flux.1"), (".joint_blocks.", "SD3/3.5")):
        if any(marker in "." + k for k in keys):
            raise ModelLoadError(f"{path}: a {family} single-file checkpoint; Flux.1 and SD3 load from their diffusers "
                                 "folder or hub id (model_index.json with transformer/, vae/, text encoders), e.g. "
                                 "black-forest-labs/FLUX.1-dev")
    xl = any(k.startswith("conditioner.embedders.1") for k in keys)
    return StableDiffusionXLPipeline if xl else StableDiffusionPipeline


def load_pipeline(source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, revision: str | None = None,
                  single_file_config: str | None = None, vae: str | None = None,
                  components: dict[str, Any] | None = None) -> Any:
    """A StableDiffusion(XL)/Flux/StableDiffusion3 pipeline from a hub id, a diffusers folder or (SD/SDXL) a single
    .safetensors file. ``components`` replace or drop (None) pipeline components, e.g. SD3 without T5:
    ``{"text_encoder_3": None, "tokenizer_3": None}`` (not loaded at all)."""
    import diffusers

    src = resolve_source(source)
    path = Path(src)
    kw: dict[str, Any] = {"torch_dtype": dtype}
    try:
        if path.suffix in (".ckpt", ".pt", ".bin"):
            raise ModelLoadError(f"{src}: pickled checkpoints are refused (they can run code); use a .safetensors file")
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise ModelLoadError(f"{src}: no such file")
            cls = _single_file_class(path)
            pipe = cls.from_single_file(str(path), config=single_file_config, **kw)
        else:
            config = _load_config(src, revision, path.exists())
            name = config.get("_class_name")
            if name not in SUPPORTED:
                raise ModelLoadError(f"{src}: a {name}; supported pipelines: {list(SUPPORTED)}")
            if name == "StableDiffusionPipeline":
                kw.update(safety_checker=None, requires_safety_checker=False)
            kw.update(components or {})
            pipe = getattr(diffusers, name).from_pretrained(src, revision=revision, **kw)
    except ModelLoadError:
        raise
    except Exception as e:  # hub/network/format errors: one clear line instead of a stack trace
        hint = ("; not a local folder or file, and not in the Hugging Face cache — without a network, download it "
                "elsewhere (huggingface-cli download ...) or pass a local diffusers folder or .safetensors file")
        local = path.exists()
        raise ModelLoadError(f"could not load the base model '{src}'{'' if local else hint} ({_first_line(e)})") from e
    if vae is not None:
        pipe.vae = _load_vae(vae, dtype)
    return pipe


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname or "huggingface.co", 443), timeout).close()
        return True
    except OSError:
        return False


def _load_config(src: str, revision: str | None, local: bool) -> dict[str, Any]:
    """model_index.json from a folder, the HF cache, or (if reachable) the Hub — no minute of retries offline."""
    import diffusers

    try:
        return diffusers.DiffusionPipeline.load_config(src, revision=revision, local_files_only=True)
    except Exception:
        if local or _hub_reachable():
            return diffusers.DiffusionPipeline.load_config(src, revision=revision)
        raise ModelLoadError(f"could not load the base model '{src}': not a local folder or file, not in the Hugging "
                             "Face cache, and the Hub is unreachable (offline); download it where there is a network "
                             "(huggingface-cli download ...) or pass a local diffusers folder or .safetensors file") from None


def _load_vae(src: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(src, torch_dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"could not load the VAE '{src}' ({_first_line(e)})") from e


# --- generation ---
def generate(pipe: Any, prompts: Sequence[str], steps: int = 25, guidance_scale: float = 5.0, seed: int = 0,
             num_images: int = 1, height: int | None = None, width: int | None = None,
             negative_prompt: str | None = None, progress: Callable[[float, str], None] | None = None) -> list[Any]:
    """PIL images, ``num_images`` per prompt, seed ``seed + i`` for image i of each prompt. ``progress(fraction,
    what)`` is called after every denoising step when given."""
    model = denoiser(pipe)
    if getattr(model, HOOK_ATTR, None) is None:
        install_timestep_hook(model, pipe.scheduler.config.num_train_timesteps)
    device = model.device
    images: list[Any] = []
    total = steps * num_images * len(prompts)
    for prompt in prompts:
        for i in range(num_images):
            k = len(images)  # images done so far

            def on_step(p: Any, step: int, t: Any, kw: dict, k: int = k) -> dict:
                if progress is not None:
                    progress((k * steps + step + 1) / total, f"image {k + 1}/{num_images * len(prompts)}")
                return kw

            g = torch.Generator(device="cpu").manual_seed(seed + i)
            negative = expand_prompt(pipe, negative_prompt) if negative_prompt else negative_prompt
            out = pipe(expand_prompt(pipe, prompt), num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=g, height=height, width=width, negative_prompt=negative, output_type="pil",
                       callback_on_step_end=on_step if progress is not None else None)
            images.extend(out.images)
    log.info("generated %d image(s) on %s", len(images), device)
    return images


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:60].strip("_") or "image"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub id, diffusers folder or .safetensors (default: the demo model)")
    p.add_argument("--single_file_config", default=None, help="configs for a single-file model")
    p.add_argument("--adapter", action="append", default=[], help="adapter file (repeat for several)")
    p.add_argument("--scale", action="append", type=float, default=[], help="scale per adapter (repeat)")
    p.add_argument("--prompt", action="append", required=True, help="prompt; {0} is replaced by --token (repeat)")
    p.add_argument("--token", default="sks", help="what {0} stands for, e.g. 'sks dog'")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="default: 5 (SD/SDXL), 3.5 (Flux: its guidance input), 7 (SD3), the pipelines' own defaults")
    p.add_argument("--num_images", type=int, default=1)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", type=Path, default=Path("outputs/samples"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    try:
        pipe = load_pipeline(a.model, dtype, single_file_config=a.single_file_config).to(a.device)
        apply_adapters(pipe, a.adapter, a.scale or None)
    except AdapterError as e:
        raise SystemExit(f"error: {e}") from None
    prompts = [q.format(a.token) for q in a.prompt]
    gs = a.guidance_scale if a.guidance_scale is not None else GUIDANCE.get(family_of(pipe).name, 5.0)
    images = generate(pipe, prompts, a.steps, gs, a.seed, a.num_images, a.height, a.width, a.negative_prompt)
    a.output.mkdir(parents=True, exist_ok=True)
    for k, im in enumerate(images):
        path = a.output / f"{_slug(prompts[k // a.num_images])}-{k % a.num_images}.png"
        im.save(path)
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
