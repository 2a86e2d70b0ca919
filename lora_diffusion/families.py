"""Pipeline families: which denoiser a diffusers pipeline has and on which scale it gets the timestep.

T-LoRA's rank schedule is defined on the 0..T training-timestep scale (T = ``num_train_timesteps`` = 1000) where
t = T is pure noise and t = 0 the clean image:

    r(t) = floor(((T - t)/T)^γ · (r - r_min)) + r_min

UNets (SD1.x/2.x, SDXL) receive that t directly. The flow-matching transformers (Flux.1, SD3/3.5) noise by
x_t = (1 - σ) x0 + σ ε with σ in [0, 1]; their schedulers' timesteps are t = σ·T on the same 0..1000 scale
(``FlowMatchEulerDiscreteScheduler.timesteps = sigmas * 1000``), and σ = 1 is pure noise, as t = T is on SD. So the
schedule is the same function of t = 1000·σ: r_min at pure noise, r at the clean end, linear in the noise fraction in
between (the official T-LoRA Flux trainer computes its mask from these scheduler timesteps). What differs is only
how each transformer is called: SD3's pipeline passes ``timestep = t`` (0..1000), Flux's passes ``timestep = t/1000``
(= σ, the transformer multiplies by 1000 inside); :data:`FAMILIES` records that factor so the generation hook
(``generate.install_timestep_hook``) and the trainer both hand the adapters t = 1000·σ.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str  # "sd" | "sdxl" | "flux" | "sd3"
    pipeline: str  # the diffusers pipeline class
    denoiser: str  # the pipeline component the adapters go on: "unet" | "transformer"
    model_class: str  # the denoiser's class
    timestep_scale: float  # t (0..1000) = timestep_scale × the denoiser's ``timestep`` argument
    flow: bool  # rectified-flow objective (x_t = (1-σ)x0 + σε, target ε - x0) instead of DDPM ε/v


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd", "StableDiffusionPipeline", "unet", "UNet2DConditionModel", 1.0, False),
    Family("sdxl", "StableDiffusionXLPipeline", "unet", "UNet2DConditionModel", 1.0, False),
    Family("flux", "FluxPipeline", "transformer", "FluxTransformer2DModel", 1000.0, True),
    Family("sd3", "StableDiffusion3Pipeline", "transformer", "SD3Transformer2DModel", 1.0, True),
)}
BY_PIPELINE = {f.pipeline: f for f in FAMILIES.values()}


class FamilyError(ValueError):
    """A pipeline or model of a family this project does not train or generate with."""


def family_of(pipe: Any) -> Family:
    """The family of a pipeline object (by its class)."""
    name = type(pipe).__name__
    if name in BY_PIPELINE:
        return BY_PIPELINE[name]
    for f in FAMILIES.values():  # subclasses (e.g. a custom pipeline derived from FluxPipeline)
        if any(c.__name__ == f.pipeline for c in type(pipe).__mro__):
            return f
    raise FamilyError(f"a {name}: supported pipelines are {sorted(BY_PIPELINE)}")


def denoiser(pipe: Any) -> nn.Module:
    """The UNet or transformer of a pipeline."""
    return getattr(pipe, family_of(pipe).denoiser)


def timestep_scale(model: nn.Module) -> float:
    """The factor from the model's ``timestep`` argument to t on 0..1000 (Flux: 1000, others: 1)."""
    for f in FAMILIES.values():
        if type(model).__name__ == f.model_class:
            return f.timestep_scale
    return 1.0


def timestep_position(model: nn.Module) -> int | None:
    """Index of ``timestep`` among the positional arguments of ``model.forward`` (UNet 1, Flux/SD3 3)."""
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("timestep") if "timestep" in names else None


def detect_family(source: str | None) -> str | None:
    """The family of a model source from its ``model_index.json`` (a local diffusers folder, or a hub repo already
    in the Hugging Face cache; never the network); None when it cannot be told (single files, uncached ids, the
    default demo model: an SD pipeline)."""
    import json
    from pathlib import Path

    if source is None:
        return None
    path = Path(source) / "model_index.json"
    try:
        if path.is_file():
            name = json.loads(path.read_text()).get("_class_name")
        else:
            from diffusers import DiffusionPipeline

            name = DiffusionPipeline.load_config(str(source), local_files_only=True).get("_class_name")
    except Exception:  # not a folder, not cached: the loader reports what is wrong
        return None
    f = BY_PIPELINE.get(name)
    return f.name if f else None
