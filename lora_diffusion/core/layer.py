"""AdaptedLayer: a base layer plus any number of named adapters.

    y = base(x) + Σ_{active, unmerged} scale_i · gate_i · Δ_i(x)      (additive adapters)
    y = combiner(layer, x, y0 = base(x), ctx)                         (with a combiner installed)

A combiner (``lora_diffusion.fusion``: gated AutoLoRA, K-LoRA, scheduled weights, ...) replaces the sum:
it asks the layer for each adapter's own output ``y_i = adapter_output(name, x, y0, ctx)`` and decides
how to combine them, per layer, token, channel and timestep.

It replaces the target module (so adapters show in ``print(model)``) and keeps the original
module object as ``base_layer``, which ``remove`` puts back. With nothing to add (adapters disabled, or all
merged: static fusion with ``fuse=True``) its forward is the base module's own call, so a fused model runs
exactly the base model's ops. Merging folds adapters into the base
weight; the first merge keeps a copy of the original weight (on the CPU), so unmerging restores
it bit for bit instead of subtracting (which would leave rounding error).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import Adapter
from .context import CallContext, ContextHolder
from .errors import AdapterError
from .layerinfo import LayerInfo, dequantize, is_quantized


class AdaptedLayer(nn.Module):
    def __init__(self, base_layer: nn.Module, info: LayerInfo, holder: ContextHolder) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.info = info
        self.adapters = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self._holder = holder
        self._original: torch.Tensor | None = None
        self._run: list[str] = []
        self.combiner: nn.Module | None = None
        if is_quantized(base_layer) and hasattr(base_layer, "support_avx512bf16_for_cpu"):
            # bnb's CPU inference path repacks 4-bit weights in place; keep the standard layout that
            # DoRA's norms read, so training and inference forwards stay the same function
            base_layer.support_avx512bf16_for_cpu = False

    def __getattr__(self, name: str):  # weight, bias, in_features, nf, ... of the base layer
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__["_modules"].get("base_layer")
            if base is None or name.startswith("_"):
                raise
            return getattr(base, name)

    # --- weights ---
    def base_weight(self) -> torch.Tensor:
        """The (possibly merged) base weight, (out, in, *k); a dequantized copy for a 4-bit base."""
        w = self.base_layer.weight
        if is_quantized(self.base_layer):
            return dequantize(w)
        return w.T if self.info.transposed else w

    @torch.no_grad()
    def _write_weight(self, w: torch.Tensor) -> None:
        target = self.base_layer.weight
        target.copy_(w.T if self.info.transposed else w)

    # --- adapters ---
    def add(self, name: str, adapter: Adapter, scale: float = 1.0, active: bool = True) -> None:
        if name in self.adapters:
            raise AdapterError(f"adapter '{name}' already exists on this layer")
        self.adapters[name] = adapter
        self.scales[name] = float(scale)
        if active:
            self.active.append(name)
        self._refresh()

    def delete(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.adapters[name]
        self.scales.pop(name, None)
        self.active = [n for n in self.active if n != name]
        self._refresh()

    def set_active(self, names: list[str], scales: dict[str, float] | None = None) -> None:
        scales = scales or {}
        remerge = [n for n in self.merged if n in scales and scales[n] != self.scales[n]]
        if remerge:  # a merged adapter's scale changed: fold it in again at the new scale
            self.unmerge(remerge)
        self.active = [n for n in names if n in self.adapters]
        for n, s in scales.items():
            if n in self.adapters:
                self.scales[n] = float(s)
        if remerge:
            self.merge(remerge)
        self._refresh()

    def _refresh(self) -> None:
        self._run = [n for n in self.active if n not in self.merged]
        # nothing to add (every active adapter merged, or none active): a call goes straight to the base module,
        # whose own hooks and instance-level forward (accelerate's offload) still run; per call the wrapper then
        # costs one attribute lookup, not a second forward (fused = the base model's ops, nothing else). A forward
        # that other code set on this layer itself (a hook library wrapping it) is left alone.
        fast = self.base_layer.__call__
        if self.__dict__.get("forward", fast) != fast:
            return
        if self._run:
            self.__dict__.pop("forward", None)
        else:
            self.__dict__["forward"] = fast

    def set_combiner(self, combiner: nn.Module | None) -> None:
        """Install (or, with None, remove) a module called as ``combiner(layer, x, y0, ctx)`` instead of the sum."""
        self.combiner = combiner

    # --- forward ---
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if not self._run:
            return result
        ctx = self._holder.current()
        if self.combiner is not None:  # .forward: a combiner runs per layer and call, without module-hook dispatch
            return self.combiner.forward(self, x, result, ctx)
        for name in self._run:
            scale = self._scale(name, ctx, result)
            result = self.adapters[name].adapted_output(x, result, self, ctx, scale)
        return result

    def adapter_output(self, name: str, x: torch.Tensor, y0: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        """Adapter ``name``'s own contribution y_i at its scale (and context gate): y0 + y_i is what it alone gives."""
        ad = self.adapters[name]
        scale = self._scale(name, ctx, y0)
        if not ad.additive:
            return ad.adapted_output(x, y0, self, ctx, scale) - y0
        x = x if x.dtype == ad.dtype else x.to(ad.dtype)
        delta = ad.delta_forward(x if isinstance(ad.dropout, nn.Identity) else ad.dropout(x), ctx)
        if isinstance(scale, torch.Tensor) or scale != 1.0:
            delta = delta * scale
        return delta if delta.dtype == y0.dtype else delta.to(y0.dtype)

    def _scale(self, name: str, ctx: CallContext, result: torch.Tensor) -> float | torch.Tensor:
        gate = ctx.gates.get(name) if ctx.gates else None
        if gate is None:
            return self.scales[name]
        if isinstance(gate, torch.Tensor) and gate.dim() > 0:
            if gate.shape[0] != result.shape[0]:
                raise AdapterError(f"gate for adapter '{name}' has {gate.shape[0]} entries; "
                                   f"expected one per batch row ({result.shape[0]})")
            if not self.adapters[name].additive:
                raise AdapterError(f"adapter '{name}' is not additive; per-sample gates are not supported")
            gate = gate.view(-1, *([1] * (result.dim() - 1))).to(result.device)
        return self.scales[name] * gate

    # --- merge ---
    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        names = [n for n in (self.active if names is None else names) if n not in self.merged]
        if not names:
            return
        if is_quantized(self.base_layer):
            raise AdapterError("merging into a quantized (4-bit) base weight would re-quantize it and lose precision; "
                               "keep the adapter unmerged, or load the base in 16/32-bit to merge")
        if self._original is None:
            self._original = self.base_weight().detach().to("cpu", copy=True)
        ctx = self._holder.current()
        w = self.base_weight().detach().clone()
        for n in names:
            w = self.adapters[n].merged_weight(w, ctx, self.scales[n])
        self._write_weight(w)
        self.merged.extend(names)
        self._refresh()

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        """Restore the original weight exactly, then re-merge whatever stays merged."""
        if not self.merged:
            return
        keep = [] if names is None else [n for n in self.merged if n not in names]
        w = self.base_weight()
        self._write_weight(self._original.to(w.device, w.dtype))
        self.merged = []
        self._original = None
        self.merge(keep)
        self._refresh()

    def extra_repr(self) -> str:
        parts = []
        for n, a in self.adapters.items():
            state = "merged" if n in self.merged else ("active" if n in self.active else "inactive")
            parts.append(f"{n}: {a.variant} scale={self.scales[n]:g} {state}")
        return "adapters={" + ", ".join(parts) + "}"
