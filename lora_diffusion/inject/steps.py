"""What a training loop does for adapters, with no user code: the step counter, post-step hooks,
regularization losses and variant optimizers.

    hooks = TrainingHooks(unet, *text_encoders)     # once, after the adapters are added
    for step in 1..N:
        hooks.begin_step(step)                      # ctx.step = step - 1 (optimizer steps done)
        loss = task_loss + hooks.regularization()   # Σ adapter.regularization() (AdaLoRA's orth penalty)
        loss.backward(); optimizer.step()
        hooks.after_step(step)                      # ctx.step = step; adapter.after_step(step) (Delta-LoRA, AdaLoRA)

``training.loop.fit`` does exactly this, so both trainers (diffusion, LLM) drive every variant the same way.
The hooks run on every process with identical inputs (the step number and the synchronised parameters), so
under data parallelism every rank applies the identical update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.context import ContextHolder
from .walker import adapted_layers


def _overrides(ad: Adapter, method: str) -> bool:
    def func(owner: type) -> object:
        f = getattr(owner, method)
        return getattr(f, "__func__", f)  # classmethods: the function, not a fresh bound method

    return func(type(ad)) is not func(Adapter)


class TrainingHooks:
    """The adapters of ``models`` (wrapped models such as DDP are fine) and the per-model context holders."""

    def __init__(self, *models: nn.Module) -> None:
        self.adapters: list[Adapter] = []
        holders: dict[int, ContextHolder] = {}
        for m in models:
            for _, layer in adapted_layers(m):
                holders[id(layer._holder)] = layer._holder
                self.adapters.extend(layer.adapters.values())
        self.holders = list(holders.values())
        groups: dict[type[Adapter], list[Adapter]] = {}
        for a in self.adapters:
            groups.setdefault(type(a), []).append(a)
        for c, ads in groups.items():
            c.check_training(ads)
        self._post = {c: ads for c, ads in groups.items()
                      if _overrides(ads[0], "after_step") or _overrides(ads[0], "group_after_step")}
        self._reg = {c: ads for c, ads in groups.items()
                     if _overrides(ads[0], "regularization") or _overrides(ads[0], "group_regularization")}
        # fusion combiners with a model-wide loss term (MoLE's balancing loss), grouped by class
        self._comb: dict[type, list[nn.Module]] = {}
        for m in models:
            for _, layer in adapted_layers(m):
                c = layer.combiner
                if c is not None and callable(getattr(type(c), "group_regularization", None)):
                    self._comb.setdefault(type(c), []).append(c)

    def set_step(self, done: int) -> None:
        """``ctx.step`` = ``done`` optimizer steps completed (what SingLoRA's ramp and schedules read)."""
        for h in self.holders:
            if h.state.step != done:
                h.update(step=done)

    def begin_step(self, step: int) -> None:
        self.set_step(step - 1)

    def regularization(self) -> torch.Tensor | None:
        terms = [t for t in (c.group_regularization(ads) for c, ads in self._reg.items()) if t is not None]
        terms += [t for t in (c.group_regularization(cs) for c, cs in self._comb.items()) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None  # type promotion, no cast (fp64 stays fp64)

    def after_step(self, step: int) -> None:
        self.set_step(step)
        with torch.no_grad():
            for c, ads in self._post.items():
                c.group_after_step(ads, step)


def variant_optimizer(models: Sequence[nn.Module], groups: list[dict[str, Any]], *, lr: float,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                      weight_decay: float = 0.0) -> torch.optim.Optimizer | None:
    """The optimizer a variant asks for (``Adapter.make_optimizer``) over ``groups``, or None (use the
    trainer's own). Several adapters asking for different optimizers in one model are refused."""
    hooks = TrainingHooks(*models)
    by_cls: dict[type[Adapter], list[Adapter]] = {}
    for a in hooks.adapters:
        if any(p.requires_grad for p in a.parameters()):
            by_cls.setdefault(type(a), []).append(a)
    made = [(cls, opt) for cls, ads in by_cls.items()
            if (opt := cls.make_optimizer(ads, groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))]
    if len(made) > 1 or (made and len(by_cls) > 1):
        from ..core.errors import AdapterError

        raise AdapterError(f"variants {sorted(c.variant for c in by_cls)} are trained together but "
                           f"'{made[0][0].variant}' needs its own optimizer; train one of them at a time")
    return made[0][1] if made else None
