"""The fusion interface: how several adapters' outputs are combined at every adapted layer.

A *fusion method* (one file each: ``static``, ``gated``, ``klora``, ``scheduled``) turns the per-layer outputs
``y0 = base(x)`` and ``y_i`` (adapter i alone, at its scale) into the layer's output. It does so by installing a
:class:`Combiner` on every adapted layer (``AdaptedLayer.set_combiner``), or, for the static sum, by the
layer's own fast path (no combiner at all). Combiners read the timestep from the model's per-call context,
so a sampler needs no changes (``generate.install_timestep_hook`` sets it before every call of the denoiser,
UNet or Flux/SD3 transformer, on the 0..1000 scale).

Every combiner can record, per call, how strongly each adapter was used (its mean effective weight) together
with the timestep; :meth:`Fusion.stats` turns the trace into a layer x timestep x adapter table with one
host transfer at the end (none during sampling).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.layer import AdaptedLayer

log = logging.getLogger(__name__)
ROLES = ("subject", "style", "other")


def progress(ctx: CallContext) -> torch.Tensor | None:
    """Sampling progress p = 1 - t/T in [0, 1] (0 at pure noise), () or (B,), or None without a timestep."""
    if "fusion_progress" not in ctx.cache:  # once per context, not per layer
        t = ctx.timestep
        ctx.cache["fusion_progress"] = None if t is None else 1.0 - t.float() / float(ctx.num_train_timesteps)
    return ctx.cache["fusion_progress"]


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A () or (B,) tensor shaped to broadcast over ``like`` (B, ...) on its device and dtype."""
    v = v.to(like.device, like.dtype)
    return v.view(-1, *([1] * (like.dim() - 1))) if v.dim() else v


class Combiner(nn.Module):
    """Per adapted layer: ``forward(layer, x, y0, ctx)`` -> the layer's output from y0 and each adapter's y_i."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.record = False
        self.trace: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (timestep, strength per name)
        self._split: tuple[list[str], list[str], list[str]] | None = None

    def split(self, layer: AdaptedLayer) -> tuple[list[str], list[str]]:
        """(this fusion's adapters running on the layer, the layer's other running adapters): set lookups, cached
        until the layer's running list changes (a library of 1000 adapters: no O(n²) list scans per call)."""
        if self._split is None or self._split[0] is not layer._run:
            run, mine = set(layer._run), set(self.names)
            self._split = (layer._run, [n for n in self.names if n in run], [n for n in layer._run if n not in mine])
        return self._split[1], self._split[2]

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, y0: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        present, others = self.split(layer)
        ys = {n: layer.adapter_output(n, x, y0, ctx) for n in present}
        out, strengths = self.combine(layer, y0, ys, ctx)
        for n in others:  # adapters active on the layer but not part of this fusion: plain sum
            out = out + layer.adapter_output(n, x, y0, ctx)
        if self.record and not torch.is_grad_enabled():
            zero = y0.new_zeros((), dtype=torch.float32)
            vec = torch.stack([strengths[n].detach().float().mean() if n in strengths else zero for n in self.names])
            self.trace.append((None if ctx.timestep is None else ctx.timestep.detach().float().mean(), vec))
        return out

    def combine(self, layer: AdaptedLayer, y0: torch.Tensor, ys: dict[str, torch.Tensor],
                ctx: CallContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(output, {name: effective weight, any shape broadcastable to y_i}) — the weights are only recorded."""
        raise NotImplementedError


@dataclass
class GateStats:
    """Mean effective weight of each adapter per adapted layer and timestep (what the gate plot shows)."""

    names: list[str]
    layers: list[str]
    timesteps: list[float]  # descending (sampling order)
    strength: np.ndarray  # (layers, timesteps, names); NaN where a layer has no record at that timestep

    def per_timestep(self) -> dict[str, list[float]]:
        """Mean over layers, per adapter, in sampling order."""
        m = np.nanmean(self.strength, axis=0)
        return {n: [round(float(v), 4) for v in m[:, i]] for i, n in enumerate(self.names)}

    def per_layer(self) -> dict[str, dict[str, float]]:
        m = np.nanmean(self.strength, axis=1)
        return {n: {layer: round(float(m[j, i]), 4) for j, layer in enumerate(self.layers)} for i, n in enumerate(self.names)}

    def summary(self) -> dict[str, Any]:
        return {"names": self.names, "timesteps": self.timesteps, "per_timestep": self.per_timestep(),
                "mean": {n: round(float(np.nanmean(self.strength[..., i])), 4) for i, n in enumerate(self.names)}}


@dataclass
class Fusion:
    """Handle of one fusion installed on a model or pipeline: its method, adapters, roles and combiners."""

    method: FusionMethod
    names: list[str]
    roles: dict[str, str]
    combiners: dict[str, Combiner] = field(default_factory=dict)  # "<component>/<layer path>" -> combiner
    layers: dict[str, AdaptedLayer] = field(default_factory=dict)
    merged: bool = False  # static fusion folded into the base weights
    # model-level modules of the method (X-LoRA's classifier), trained and saved with the combiners
    modules: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    handles: list[Any] = field(default_factory=list)  # hooks the method registered (removed by ``remove``)

    def record(self, on: bool = True) -> None:
        """Start (clearing earlier records) or stop recording gate strengths."""
        for c in self.combiners.values():
            c.record, c.trace = on, []

    def stats(self) -> GateStats | None:
        """The recorded strengths (one host transfer); None when nothing was recorded."""
        rows = {k: c.trace for k, c in self.combiners.items() if c.trace}
        if not rows:
            return None
        flat = [(k, t, v) for k, tr in rows.items() for t, v in tr]
        ts = torch.stack([t if t is not None else torch.tensor(-1.0, device=v.device) for _, t, v in flat]).cpu().numpy()
        vs = torch.stack([v for _, _, v in flat]).cpu().numpy()
        steps = sorted({round(float(t), 3) for t in ts}, reverse=True)
        layers = list(rows)
        out = np.full((len(layers), len(steps), len(self.names)), np.nan)
        count = np.zeros(out.shape[:2])
        for (k, _, _), t, v in zip(flat, ts, vs):
            i, j = layers.index(k), steps.index(round(float(t), 3))
            out[i, j] = v if count[i, j] == 0 else (out[i, j] * count[i, j] + v) / (count[i, j] + 1)
            count[i, j] += 1
        return GateStats(list(self.names), layers, steps, out)

    def parameters(self) -> list[nn.Parameter]:
        return [p for c in self.combiners.values() for p in c.parameters()] + list(self.modules.parameters())

    def remove(self) -> None:
        """Uninstall every combiner (the layers sum their adapters again); unfuse fused weights exactly."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for layer in self.layers.values():
            layer.set_combiner(None)
            if self.merged:
                layer.unmerge(self.names)
        self.merged = False
        self.combiners.clear()


class FusionMethod:
    """One way to combine adapters. Subclasses set ``name``, ``formula`` and ``Options``, and build combiners."""

    name: ClassVar[str]
    formula: ClassVar[str]
    paper: ClassVar[str] = ""
    trainable: ClassVar[bool] = False  # has parameters to train (gates)
    needs_roles: ClassVar[bool] = False  # uses subject/style roles
    # reads the denoising timestep: text encoders (which never see one) keep the plain sum
    needs_timestep: ClassVar[bool] = False
    models: ClassVar[tuple[str, ...]] = ("diffusion", "llm")  # what it applies to (X-LoRA: LLMs only)

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any) -> None:
        valid = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise AdapterError(f"fusion '{self.name}': unknown option(s) {unknown}; valid: {sorted(valid)}")
        self.options = self.Options(**options)

    def check(self, layers: dict[str, AdaptedLayer], names: list[str]) -> None:
        """Raise a clear error if this method cannot combine ``names`` on these layers; called by ``fuse`` before
        anything changes (nothing half-applied). Default: nothing to check."""

    def prepare(self, layers: dict[str, AdaptedLayer], names: list[str], roles: dict[str, str]) -> None:
        """Model-level precomputation before the combiners are built (K-LoRA's normalisation)."""

    def make_combiner(self, key: str, layer: AdaptedLayer, names: list[str], roles: dict[str, str]) -> Combiner | None:
        raise NotImplementedError

    def attach(self, fusion: Fusion, models: dict[str, nn.Module]) -> None:
        """After the combiners are in place: model-level hooks ({component: model}; X-LoRA's scaling pass,
        MoLE's per-forward block state); register their handles in ``fusion.handles``."""

    def install(self, layers: dict[str, AdaptedLayer], names: list[str], roles: dict[str, str]) -> Fusion:
        fusion = Fusion(self, names, roles)
        self.prepare(layers, names, roles)
        for key, layer in layers.items():
            if self.needs_timestep and key.startswith("text_encoder"):
                continue
            comb = self.make_combiner(key, layer, names, roles)
            if comb is not None:
                ref = next((p for p in layer.base_layer.parameters()), None)
                if ref is not None:
                    comb.to(ref.device)
                layer.set_combiner(comb)
                fusion.combiners[key] = comb
            fusion.layers[key] = layer
        return fusion


def ramp(p: torch.Tensor, center: float, width: float) -> torch.Tensor:
    """0 before ``center - width/2``, 1 after ``center + width/2``, linear between (width 0: a step)."""
    if width <= 0:
        return (p >= center).to(p.dtype)
    return ((p - center) / width + 0.5).clamp(0.0, 1.0)


def fourier(p: torch.Tensor, n: int) -> torch.Tensor:
    """(..., 2n) features sin(pi k p), cos(pi k p), k = 1..n."""
    k = torch.arange(1, n + 1, device=p.device, dtype=torch.float32) * math.pi
    a = p.float()[..., None] * k
    return torch.cat([a.sin(), a.cos()], -1)
