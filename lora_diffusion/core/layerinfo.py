"""Describe a base layer once, so variants never branch on the layer type.

A variant sees a :class:`LayerInfo`: the weight shape in the canonical (out, in, *kernel)
layout and ``op(x, w)``, the layer's own operation with a different weight (LyCORIS' idea).
GPT-2's ``Conv1D`` stores its weight transposed, (in, out); ``base_weight`` hides that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TargetError


@dataclass(frozen=True)
class LayerInfo:
    kind: str  # "linear" | "conv2d"
    out_features: int
    in_features: int  # conv: in_channels (groups must be 1)
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    transposed: bool = False  # GPT-2 Conv1D: weight stored as (in, out)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def fan_in(self) -> int:
        return self.in_features * math.prod(self.kernel_size)

    @property
    def ndim_kernel(self) -> int:
        return len(self.kernel_size)

    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with ``weight`` (out, in, *k) and no bias."""
        if self.kind == "conv2d":
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)
        return F.linear(x, weight)

    def channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """Reshape a per-output vector (out,) so it broadcasts over this layer's output."""
        return v.view(-1, *([1] * self.ndim_kernel)) if self.kind == "conv2d" else v


def is_gpt2_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def layer_info(module: nn.Module, name: str = "") -> LayerInfo:
    """Describe ``module`` or raise a TargetError that names it and lists what is supported."""
    if isinstance(module, nn.Linear):
        return LayerInfo("linear", module.out_features, module.in_features)
    if is_gpt2_conv1d(module):
        n_in, n_out = module.weight.shape
        return LayerInfo("linear", n_out, n_in, transposed=True)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise TargetError(f"module '{name}': grouped Conv2d (groups={module.groups}) is not supported; expected groups=1")
        if module.padding_mode != "zeros":
            raise TargetError(f"module '{name}': Conv2d padding_mode='{module.padding_mode}' is not supported; expected 'zeros'")
        return LayerInfo(
            "conv2d", module.out_channels, module.in_channels, tuple(module.kernel_size),
            tuple(module.stride), module.padding if isinstance(module.padding, str) else tuple(module.padding),
            tuple(module.dilation),
        )
    raise TargetError(
        f"module '{name}' is a {type(module).__name__}; adapters wrap nn.Linear, nn.Conv2d and GPT-2 Conv1D"
    )


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit (Params4bit) or 8-bit (Int8Params) weight: frozen, dequantized on demand."""
    return type(getattr(module, "weight", None)).__name__ in ("Params4bit", "Int8Params")


def get_base_weight(module: nn.Module, info: LayerInfo) -> torch.Tensor:
    """The base weight in (out, in, *k) layout (a view; transposed for Conv1D; dequantized for 4-bit)."""
    w = module.weight
    if is_quantized(module):
        return dequantize(w)
    return w.T if info.transposed else w


def dequantize(w: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit weight as a float tensor (out, in)."""
    if type(w).__name__ != "Params4bit":
        raise TargetError(f"{type(w).__name__} weights are not supported yet; expected a bitsandbytes 4-bit (Params4bit) weight")
    import bitsandbytes.functional as bnbf

    data, state = w.data, w.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # bnb repacked it for CPU inference: undo (to ~3e-4)
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    return bnbf.dequantize_4bit(data, state)
