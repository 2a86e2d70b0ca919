"""``train_llm --mixture moa``: train a MoA (lora_diffusion/fusion/moa.py) instead of a single adapter.

Unlike X-LoRA/MoLE (``llm_mixture``: frozen ``--adapters`` mixed by a learned router), MoA trains new experts and
routers together: LoRA experts on the block's linears (named "default" like a plain run; ``--lora_rank``,
``--lora_alpha`` (default MoA's 32), ``--targets`` (the 'llm' preset: MoA's q,k,v,o,down)), plus per-block routers,
threshold, prompt and parallel adapter (``--mixture_options`` JSON: adapter_size, prompt_len, swi_x, sparse,
max_threshold, threshold_grad, threshold_tau). Those train with the same optimizer (their own group, role
"mixture") and go into the same canonical ``adapter.safetensors``, which ``load_adapter`` and the chat CLI read.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lora_diffusion.core.errors import AdapterError
from lora_diffusion.fusion.moa import MoAConfig, add_moa, get_moa

from .config import ConfigError

log = logging.getLogger("train_llm")
NAME = "moa"
DEFAULT_PRESET = "llm"


def check(adapter: Any, mixture: Any) -> None:
    """Plain LoRA experts, no --adapters (MoA trains its own), valid --mixture_options."""
    if adapter.variant != "lora":
        raise ConfigError(f"--mixture moa: its experts are plain LoRAs; --variant {adapter.variant!r} is not supported")
    if mixture.adapters:
        raise ConfigError("--mixture moa trains its own experts; --adapters is for xlora/mole (frozen adapters)")
    config(adapter, mixture)


def config(adapter: Any, mixture: Any) -> MoAConfig:
    opts = dict(mixture.mixture_options)
    if adapter.targets != DEFAULT_PRESET:
        opts.setdefault("targets", [t.strip() for t in adapter.targets.split(",") if t.strip()])
    opts.setdefault("rank", adapter.rank)
    if adapter.alpha is not None:
        opts.setdefault("alpha", adapter.alpha)
    try:
        return MoAConfig(**opts)
    except TypeError as e:
        raise ConfigError(f"--mixture_options: {e}; valid keys: {list(MoAConfig.__dataclass_fields__)}") from None
    except AdapterError as e:
        raise ConfigError(f"--mixture_options: {e}") from None


def add(adapter: Any, mixture: Any, model: torch.nn.Module, seed: int) -> list[str]:
    cfg = config(adapter, mixture)
    cfg.seed = seed
    moa = add_moa(model, cfg)
    log.info("MoA (%s): experts %s on %d blocks, %d router/prompt/adapter parameters", "sparse" if cfg.sparse else "soft",
             cfg.experts(), len(moa.blocks), sum(p.numel() for p in moa.parameters()))
    return [f"{b}.{t}" for b in moa.blocks for t in cfg.targets]


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The optimizer group of a MoA's own parameters (none without one)."""
    moa = get_moa(model)
    if moa is None:
        return []
    return [{"params": [p for p in moa.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay,
             "role": "mixture"}]
