"""``train_llm --mixture xlora|mole --adapters a.safetensors,b.safetensors``: train a mixture of frozen adapters.

The adapters are loaded frozen (checked against the base model and against each other), the mixture is installed
with ``lora_diffusion.fusion.fuse`` and only what it learns trains: X-LoRA's classifier, MoLE's gates (its
balancing loss reaches the loss through ``TrainingHooks``). The output ``adapter.safetensors`` is a mixture file:
the adapters, the learned weights and the base model's fingerprint, loadable with ``ld.load_adapter`` and
``python -m lora_diffusion.chat --adapter``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion import llm
from lora_diffusion.fusion import Fusion, fuse, save_mixture
from lora_diffusion.fusion.mixture import check_same_base

from .checkpoint import TrainableParams
from .config import ConfigError, opt

log = logging.getLogger("train_llm")
METHODS = ("xlora", "mole")


@dataclass
class LLMMixtureArgs:
    mixture: str | None = opt(None, "train a mixture of the frozen --adapters instead of a new adapter: xlora | mole; "
                                    "or moa: new heterogeneous experts and routers (training/llm_moa.py)",
                              choices=[None, *METHODS, "moa"])
    adapters: str | None = opt(None, "comma-separated adapter files or PEFT folders the mixture combines")
    mixture_options: dict = opt({}, "mixture options as JSON; X-LoRA takes PEFT's XLoraConfig names, e.g. "
                                    "'{\"top_k_lora\": 2, \"layerwise_scalings\": true}'")


def adapter_paths(args: LLMMixtureArgs) -> dict[str, Path]:
    """{name: path} from --adapters (names from the file stems, made unique); errors name the argument."""
    paths = [Path(p.strip()) for p in (args.adapters or "").split(",") if p.strip()]
    if len(paths) < 2:
        raise ConfigError(f"--adapters: a mixture combines at least 2 adapters; got {len(paths)}")
    out: dict[str, Path] = {}
    for p in paths:
        if not p.exists():
            raise ConfigError(f"--adapters: no such file or folder: {p}")
        base = re.sub(r"[^A-Za-z0-9_-]", "_", p.stem if p.is_file() else p.name) or "adapter"
        name, k = base, 1
        while name in out:
            k += 1
            name = f"{base}_{k}"
        out[name] = p
    return out


def add_mixture(args: LLMMixtureArgs, model: nn.Module) -> Fusion:
    """Load the adapters frozen and install the mixture; nothing stays applied if any step fails."""
    paths = adapter_paths(args)
    check_same_base({n: p for n, p in paths.items() if p.is_file()}, model)
    loaded: list[str] = []
    try:
        for name, p in paths.items():
            llm.load_llm_adapter(model, p, name=name) if p.is_file() else ld.load_adapter(model, p, name=name)
            loaded.append(name)
        fusion = fuse(model, loaded, method=args.mixture, **args.mixture_options)
    except BaseException:
        if loaded:
            ld.remove_adapters(model, loaded)
        raise
    n = sum(p.numel() for p in fusion.parameters())
    log.info("%s over %s: %d trainable parameters (the adapters are frozen)", args.mixture, loaded, n)
    return fusion


def optimizer(fusion: Fusion, lr: float, cfg: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(fusion.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay)


def checkpoint_state(fusion: Fusion) -> dict[str, Any]:
    """What a checkpoint adds for the mixture: the fusion's model-level modules (X-LoRA's classifier is not a
    submodule of the model; MoLE's gates are, and ``TrainableParams(model)`` already holds them)."""
    return {"mixture": TrainableParams(fusion.modules)} if len(fusion.modules) else {}


def save(model: nn.Module, fusion: Fusion, path: Path, metadata: dict[str, str], overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    meta = {llm.META_BASE_MODEL: llm.base_name(model),
            llm.META_BASE_CONFIG: json.dumps(llm.base_fingerprint(model), sort_keys=True), **metadata}
    return save_mixture(model, fusion, path, metadata=meta)
