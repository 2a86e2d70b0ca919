"""Model families as the app sees them: which preset a base model gets (resolution, precision, memory savers,
sampling) and what the trainer is told (``--model_family``, targets, pivotal tuning).

The family comes from the model itself: ``lora_diffusion.families.detect_family`` reads the folder's (or cached hub
repo's) ``model_index.json``; a single ``.safetensors`` file is told apart by its tensors (SD or SDXL; Flux/SD3 load
from folders only); only an uncached hub id, which has nothing to read before its download, falls back to the
trainer's own guess from the name (``training.config.guess_family``), and the trainer corrects that guess once the
pipeline is loaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .settings import DEMO, DEMO_DIT, Settings, demo_dit_path

log = logging.getLogger("app")

_PHOTO = {"sample_prompts": "a photo of {0}#a {0} on the beach", "prompt_template": "a photo of {0}"}
#: on the demo models the caption names the image's two colors when it can (``describe_colors``: the recipe measured
#: best, repainting on; ``app.services.captions``), else it is the bare template
_DEMO_PROMPTS = {"sample_prompts": "a yellow {0} on a black background#a green {0} on a white background",
                 "prompt_template": "a {0}", "describe_colors": True}
#: per preset: what a run on it needs beyond the variant's defaults (resolution, precision, memory savers), how its
#: samples are drawn, and what the trainer is told (``model_family``; ``targets`` None: the trainer's default;
#: ``pivotal`` False: the family has no pivotal tuning in the trainer yet: Flux)
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"resolution": 32, "num_inference_steps": 20, "guidance_scale": 4.0, "model_family": "sd",
             **_DEMO_PROMPTS},
    "sd1": {"resolution": 512, "mixed_precision": "fp16", "num_inference_steps": 25, "guidance_scale": 7.0,
            "model_family": "sd", **_PHOTO},
    "sdxl": {"resolution": 1024, "mixed_precision": "bf16", "gradient_checkpointing": True, "num_inference_steps": 25,
             "guidance_scale": 5.0, "model_family": "sdxl", **_PHOTO},
    # Flux.1-dev: its guidance *input* 3.5 (no CFG pass), 28 steps (diffusers' FluxPipeline docs, ai-toolkit samples)
    "flux": {"resolution": 1024, "mixed_precision": "bf16", "gradient_checkpointing": True, "num_inference_steps": 28,
             "guidance_scale": 3.5, "model_family": "flux", "targets": "dit-attn", "pivotal": False, **_PHOTO},
    # Flux.1-schnell (no guidance embedding): 4 steps, guidance unused
    "flux-schnell": {"resolution": 1024, "mixed_precision": "bf16", "gradient_checkpointing": True,
                     "num_inference_steps": 4, "guidance_scale": 0.0, "model_family": "flux", "targets": "dit-attn",
                     "pivotal": False, **_PHOTO},
    # SD3.5 medium/large: CFG 4.5 (medium's model card; large: 3.5-4.5), 28 steps
    "sd3": {"resolution": 1024, "mixed_precision": "bf16", "gradient_checkpointing": True, "num_inference_steps": 28,
            "guidance_scale": 4.5, "model_family": "sd3", "targets": "dit-attn", **_PHOTO},
    # the embedded SD3-architecture demo model (assets/demo-sd3): the demo world at 32 px, sampled as it was measured
    # (the stock pipeline's 28 steps, guidance 7; docs/demo_model.md); the trainer's demo recipe picks its targets
    "demo-sd3": {"resolution": 32, "num_inference_steps": 28, "guidance_scale": 7.0, "model_family": "sd3",
                 **_DEMO_PROMPTS},
}
#: the library's family names (``describe()['base_family']``) of the files each preset's models load
LIBRARY_FAMILY = {"demo": "demo", "sd1": "sd1", "sdxl": "sdxl", "flux": "flux", "flux-schnell": "flux", "sd3": "sd3",
                  "demo-sd3": "sd3"}
#: what the Personalize and Generate tabs call a preset's family
LABELS = {"demo": "demo model (SD UNet)", "sd1": "SD1.x/2.x", "sdxl": "SDXL", "flux": "Flux.1-dev",
          "flux-schnell": "Flux.1-schnell", "sd3": "SD3/3.5", "demo-sd3": "demo model (SD3 transformer)"}
DIT = ("flux", "sd3")  # the trainer's transformer families


def model_family(settings: Settings, model: str | None) -> str:
    """The preset of a base model the server offers (a key of :data:`PRESETS`); read from the model, not its name."""
    source = settings.model_source(model)
    if source is None:
        return "demo"
    if _is_demo_dit(source):
        return "demo-sd3"
    family = detect(source)
    if family == "flux":
        return "flux" if _guidance_embeds(source) else "flux-schnell"
    return {"sd": "sd1", "sdxl": "sdxl", "sd3": "sd3"}[family]


def detect(source: str) -> str:
    """The trainer's family name (sd, sdxl, flux, sd3) of a model source."""
    from lora_diffusion.families import detect_family

    found = detect_family(source)
    if found is not None:
        return found
    path = Path(source)
    if path.suffix == ".safetensors" and path.is_file():
        from lora_diffusion.generate import _single_file_class

        try:
            return "sdxl" if "XL" in _single_file_class(path).__name__ else "sd"
        except Exception:  # a Flux/SD3 single file or a damaged one: the loader reports it when used
            return "sd"
    from training.config import guess_family

    return guess_family(source)


def trainer_family(settings: Settings, model: str | None) -> str:
    """``--model_family`` for the trainer: the preset's, or ``auto`` when it was guessed from an uncached hub id's
    name (the trainer then corrects the guess, and the defaults that depend on it, once the pipeline is loaded)."""
    from lora_diffusion.families import detect_family

    source = settings.model_source(model)
    family = PRESETS[model_family(settings, model)]["model_family"]
    if source is None or Path(source).exists() or detect_family(source) is not None:
        return family
    return "auto"


def preset(settings: Settings, model: str | None) -> dict[str, Any]:
    return PRESETS[model_family(settings, model)]


def is_dit(family: str) -> bool:
    return PRESETS[family]["model_family"] in DIT


def _guidance_embeds(folder: str) -> bool:
    """Flux.1-dev has a guidance embedding, schnell not (transformer/config.json; unknown: dev)."""
    cfg = Path(folder) / "transformer" / "config.json"
    try:
        return bool(json.loads(cfg.read_text()).get("guidance_embeds", True)) if cfg.is_file() else True
    except (OSError, ValueError):
        return True


def _is_demo_dit(source: str) -> bool:
    dit = demo_dit_path()
    try:
        return dit is not None and Path(source).resolve() == dit.resolve()
    except OSError:
        return False


def model_for(settings: Settings, family: str | None) -> str:
    """The served model a library file of ``family`` loads on (export, squeeze): the first of that family (a
    transformer file whose widths do not tell: the first Flux or SD3 model); else the demo model, else the first."""
    for name in settings.models:
        try:
            lib = LIBRARY_FAMILY[model_family(settings, name)]
        except Exception:  # noqa: BLE001 - a model that cannot be read now is reported when it is used
            continue
        if lib == family or (family == "dit" and lib in ("flux", "sd3")):
            return name
    return DEMO if DEMO in settings.models else next(iter(settings.models))


def served_families(settings: Settings) -> set[str]:
    """The library family names of every model the server offers (files of none of them are marked)."""
    out = set()
    for name in settings.models:
        try:
            out.add(LIBRARY_FAMILY[model_family(settings, name)])
        except Exception as e:  # a model that cannot be read now is reported when it is used
            log.warning("base model %s: family not known (%s)", name, e)
    return out


__all__ = ["DEMO", "DEMO_DIT", "LABELS", "PRESETS", "demo_dit_path", "detect", "is_dit", "model_family", "model_for",
           "preset", "served_families", "trainer_family"]
