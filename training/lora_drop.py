"""LoRA-drop in the trainers: the importance stage before training (method: lora_diffusion/variants/loradrop.py).

    --variant loradrop [--lora_drop_threshold 0.9] [--lora_drop_steps N] [--lora_drop_samples K]
                       [--lora_drop_strict] [--lora_drop_plan lora_drop.json] [--lora_drop_match_params]

1. a stratified sample D_s of the training data (LLM: records by length quartile; diffusion: (image, timestep)
   examples with one timestep per stratum of [0, T)), fixed for the stage;
2. a plain LoRA (the run's rank, alpha, targets, seed) trained for ``--lora_drop_steps`` steps on D_s with the
   trainer's own loss (``training.loop.fit``: progress bar, non-finite-loss stop);
3. forward hooks sum ‖ΔW x‖² per layer over D_s; the cut keeps the layers reaching the threshold;
4. that LoRA is removed; the run trains the LoRA-drop adapter (fresh init) built from the plan.

The plan is written to ``<output_dir>/lora_drop.json`` before training starts; a resumed run (or
``--lora_drop_plan FILE``) reads it instead of running the stage again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.io.files import write_json
from lora_diffusion.variants.loradrop import DropPlan, match_uniform, measure_importance, plan

from .config import ConfigError, LoRADropArgs

log = logging.getLogger(__name__)
STAGE = "loradrop_stage1"  # the first-stage adapter's name while it exists
PLAN_FILE = "lora_drop.json"
VARIANT = "loradrop"


def stratified(strata: Sequence[Any], k: int, seed: int) -> list[int]:
    """``k`` indices drawn without replacement, each stratum (equal keys) represented in proportion to its size
    (largest remainders), deterministic in ``seed``; all indices when k >= len(strata)."""
    if k >= len(strata):
        return list(range(len(strata)))
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    exact = {s: k * len(ix) / len(strata) for s, ix in groups.items()}
    take = {s: int(v) for s, v in exact.items()}
    for s in sorted(groups, key=lambda s: take[s] - exact[s])[:k - sum(take.values())]:
        take[s] += 1
    rng = random.Random(seed)
    return sorted(i for s, ix in groups.items() for i in rng.sample(ix, take[s]))


def length_strata(lengths: Sequence[int], bins: int = 4) -> list[int]:
    """The length quartile (``bins`` quantile bins) of each record."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out = [0] * len(lengths)
    for rank, i in enumerate(order):
        out[i] = rank * bins // max(len(lengths), 1)
    return out


class _Cycle:
    def __init__(self, items: Sequence[Any]) -> None:
        self.items, self.pos = list(items), 0

    def next_batch(self) -> Any:
        item = self.items[self.pos % len(self.items)]
        self.pos += 1
        return item


def importance_stage(accelerator: Any, model: nn.Module, spec: ld.AdapterSpec, sample: Sequence[Any],
                     loss_fn: Callable[[Any], torch.Tensor], args: LoRADropArgs, lr: float,
                     progress: bool = True) -> DropPlan:
    """Steps 2-3 above on ``model`` (nothing of the stage stays on it, even on an error): the plan."""
    from .loop import LoopConfig, fit

    first = dataclasses.replace(spec, variant="lora", options={k: v for k, v in spec.options.items() if k == "init"})
    ld.add_adapter(model, first, STAGE)
    try:
        params = [p for _, p in ld.adapter_parameters(model, STAGE)]
        opt_ = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt_, lambda _: 1.0)
        fit(accelerator, model, opt_, sched, _Cycle(sample), loss_fn,
            LoopConfig(int(args.lora_drop_steps), desc="LoRA-drop importance stage", progress=progress))
        model.eval()
        scores = measure_importance(model, STAGE, lambda: [loss_fn(item) for item in sample])
        return plan(model, STAGE, scores, args.lora_drop_threshold, args.lora_drop_strict)
    finally:
        ld.remove_adapters(model, [STAGE])
        model.train()


def resolve_plan(out: Path, args: LoRADropArgs, resume: bool, make: Callable[[], DropPlan],
                 accelerator: Any = None, match: Callable[[DropPlan], DropPlan] | None = None) -> DropPlan:
    """The plan of this run: ``--lora_drop_plan``, the one a resumed run wrote, or ``make()`` (then written to
    ``out/lora_drop.json`` atomically). Under several processes the main process's plan is used by every rank.
    ``match`` (--lora_drop_match_params) resizes a plan that has no rank yet; the resized plan is the one written."""
    source = Path(args.lora_drop_plan) if args.lora_drop_plan else (out / PLAN_FILE if resume else None)
    fresh = not (source is not None and source.is_file())
    if not fresh:
        log.info("LoRA-drop: layers from %s (no importance stage)", source)
        result = read_plan(source)
    else:
        result = make()
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            result = broadcast_object_list([result])[0]
    if match is not None and result.rank is None:
        result, fresh = match(result), True
    if fresh and (accelerator is None or accelerator.is_main_process):
        write_plan(out / PLAN_FILE, result)
    return result


def matcher(model: nn.Module, spec: ld.AdapterSpec, args: LoRADropArgs) -> Callable[[DropPlan], DropPlan] | None:
    """--lora_drop_match_params: the plan resized to a uniform LoRA's trainable count (``match_uniform``)."""
    if not args.lora_drop_match_params:
        return None
    from lora_diffusion.core.layerinfo import layer_info
    from lora_diffusion.inject.targets import find_targets

    def match(p: DropPlan) -> DropPlan:
        infos = {n: layer_info(m, n) for n, m in find_targets(model, spec).items()}
        q = match_uniform(p, infos, spec.rank, args.lora_drop_strict)
        log.info("LoRA-drop at a uniform rank-%d LoRA's size: %d layers keep their own adapter (the cut kept %d), "
                 "rank %d", spec.rank, len(q.kept), len(p.kept), q.rank)
        return q

    return match


def read_plan(path: Path) -> DropPlan:
    try:
        return DropPlan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--lora_drop_plan {path}: not a LoRA-drop plan ({e!r}); expected the lora_drop.json a "
                          "loradrop run writes") from None


def write_plan(path: Path, p: DropPlan) -> None:
    write_json(path, p.to_dict())


def apply_plan(model: nn.Module, spec: ld.AdapterSpec, p: DropPlan) -> list[str]:
    """Add the LoRA-drop adapter of plan ``p`` (as ``ld.add_adapter``: fresh init, only it trainable)."""
    log.info("%s", p.summary())
    return ld.add_adapter(model, p.spec(spec))
