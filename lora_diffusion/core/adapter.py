"""The Adapter contract: one adapter for one base layer.

A variant states its weight delta, ``delta_weight(ctx) -> (out, in, *k)``, and may give a faster
``delta_forward(x, ctx)`` (default: the layer's own op with ΔW). Merge, unmerge, export and
rank compression are then generic. A non-additive variant (DoRA) sets ``additive = False`` and
overrides ``adapted_output`` and ``merged_weight``.

The adapted layer calls ``adapted_output(x, base_out, layer, ctx, scale)`` for each active
adapter; ``scale`` is the user's per-adapter scale times any gate from the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .context import CallContext
from .errors import TargetError
from .layerinfo import LayerInfo
from .spec import AdapterSpec, ModuleConfig

if TYPE_CHECKING:
    from .shared import SharedStore


@dataclass
class NoOptions:
    """Variants without options."""


class Adapter(nn.Module):
    variant: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    additive: ClassVar[bool] = True  # output = base + scale * delta_forward(x)
    kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv2d"})
    identity_init: ClassVar[bool] = True  # output equals the base output at init
    uses_alpha: ClassVar[bool] = True
    uses_context: ClassVar[bool] = False  # reads the diffusion timestep from the context (not for text LLMs)
    uses_step: ClassVar[bool] = False  # reads the optimizer-step counter (ctx.step) from the context
    supports_dropout: ClassVar[bool] = True  # False: dropout > 0 is refused by ``check`` (Delta-LoRA)
    rank_limited: ClassVar[bool] = True  # rank <= min(out, in) of the layer
    # External formats (kohya, diffusers, PEFT) get this adapter as an exactly equal plain LoRA (io.formats.plain_lora:
    # ``lowrank_factors()`` if defined, else lora_A/lora_B/scaling); the canonical file keeps the variant.
    export_as_lora: ClassVar[bool] = False
    # Persistent buffers that training changes (Delta-LoRA's snapshot at step K): checkpoints carry them like parameters.
    state_buffers: ClassVar[tuple[str, ...]] = ()
    # Role of each trainable tensor, for optimizer parameter groups (LoRA+: "B" gets a higher lr).
    param_roles: ClassVar[dict[str, str]] = {}

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, *, base_weight: torch.Tensor | None = None,
                 shared: SharedStore | None = None) -> None:
        super().__init__()
        self.info = info
        self.cfg = cfg
        self.scaling = cfg.scaling if self.uses_alpha else 1.0
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    # --- checks and formulas (classmethods: run before anything is built) ---
    @classmethod
    def check(cls, info: LayerInfo, cfg: ModuleConfig, loading: bool = False) -> None:
        """Raise a clear error if this variant cannot adapt this layer with this config.

        ``loading``: the tensors come from a file (no init). A factorisation of rank above min(out, in) is still a
        valid ΔW, so the rank limit, which guards new adapters (parameters without capacity; T-LoRA's orthogonal
        init has only min(out, in) directions), is not applied to variants that load without an init.
        """
        if info.kind not in cls.kinds:
            raise TargetError(
                f"module '{cfg.module_name}': variant '{cls.variant}' does not support {info.kind} layers "
                f"(supported: {sorted(cls.kinds)})")
        if cfg.dropout > 0 and not cls.supports_dropout:
            raise TargetError(f"module '{cfg.module_name}': variant '{cls.variant}' needs dropout = 0; found "
                              f"dropout={cfg.dropout}")
        limit = min(info.out_features, info.fan_in)
        if cls.rank_limited and cfg.rank > limit and not loading:
            raise TargetError(
                f"module '{cfg.module_name}': rank {cfg.rank} is larger than the layer allows for a new adapter (ΔW of "
                "a layer has rank at most min(out, in): a larger rank adds parameters but no capacity); expected rank "
                f"<= min(out={info.out_features}, in={info.fan_in}) = {limit}")

    @classmethod
    def num_params(cls, info: LayerInfo, cfg: ModuleConfig) -> int:
        """Trainable parameters per the paper's formula (tests compare it with the module)."""
        raise NotImplementedError

    @classmethod
    def resolve_spec(cls, model: nn.Module, spec: AdapterSpec, targets: dict[str, nn.Module]) -> AdapterSpec:
        """The spec completed from the model before anything is built (ARD-LoRA: the head size of each attention
        projection into its options). The adapter keeps and files store the user's spec; loading a file resolves it
        again on the model it is loaded into. Default: ``spec`` unchanged."""
        return spec

    @classmethod
    def prepare_shared(cls, store: SharedStore, adapter_name: str, infos: dict[str, LayerInfo],
                       spec: AdapterSpec) -> None:
        """Create model-level frozen tensors (VeRA); default: none."""

    # --- the weight delta ---
    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        """ΔW in the base weight's (out, in, *k) layout, scaling included."""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        """ΔW applied to x; override when there is a cheaper way than building ΔW."""
        return self.info.op(x, self.delta_weight(ctx))

    def adapted_output(self, x: torch.Tensor, base_out: torch.Tensor, layer: nn.Module,
                       ctx: CallContext | None, scale: float | torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.dtype))
        delta = self.delta_forward(x, ctx)
        if not isinstance(scale, torch.Tensor) and scale == 1.0:  # skip an output-sized multiply
            return base_out + delta.to(base_out.dtype)
        return base_out + (delta * scale).to(base_out.dtype)

    def merged_weight(self, weight: torch.Tensor, ctx: CallContext | None, scale: float) -> torch.Tensor:
        """The base weight with this adapter folded in."""
        return weight + (self.delta_weight(ctx) * scale).to(weight.dtype)

    # --- training hooks: training loops call these through ``lora_diffusion.inject.steps.TrainingHooks``
    # (no user code); they also advance ``ctx.step``, the number of optimizer steps done ---
    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based) has been applied, on every process, before the next
        forward: Delta-LoRA's base-weight update, AdaLoRA's rank allocation, DyLoRA's next truncation."""

    def regularization(self) -> torch.Tensor | None:
        """A loss term the loop adds to the task loss (AdaLoRA's orthogonality penalty); None: nothing."""
        return None

    @classmethod
    def check_training(cls, adapters: list[Adapter]) -> None:
        """Raise a clear error if these adapters cannot be trained as configured (AdaLoRA without total_step);
        called when a training loop builds its ``TrainingHooks``, before the first step."""

    @classmethod
    def group_after_step(cls, adapters: list[Adapter], step: int) -> None:
        """The post-step hook over every adapter of this variant in the trained models (model-wide decisions:
        AdaLoRA's budget); default: each adapter's ``after_step``."""
        for a in adapters:
            a.after_step(step)

    @classmethod
    def group_regularization(cls, adapters: list[Adapter]) -> torch.Tensor | None:
        """The loss term of every adapter of this variant (a model-wide mean: AdaLoRA); default: the sum of each
        adapter's ``regularization``."""
        terms = [t for t in (a.regularization() for a in adapters) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None  # type promotion, no cast (fp64 stays fp64)

    @classmethod
    def make_optimizer(cls, adapters: list[Adapter], groups: list[dict[str, Any]], *, lr: float,
                       betas: tuple[float, float], eps: float, weight_decay: float) -> torch.optim.Optimizer | None:
        """An optimizer this variant needs instead of AdamW (LoRA-FA's projected gradient), over ``groups``
        (``lora_diffusion.param_groups``) of ``adapters`` (this variant's, model-wide); None: the trainer's own."""
        return None

    # --- helpers ---
    @property
    def dtype(self) -> torch.dtype:
        for p in self._parameters.values():  # own parameters come first in parameters(); no generator per call
            if p is not None:
                return p.dtype
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def extra_repr(self) -> str:
        s = f"rank={self.cfg.rank}"
        if self.uses_alpha:
            s += f", alpha={self.cfg.alpha:g}, scaling={self.scaling:.4g}"
        return s


def new_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


def kaiming_uniform_(t: torch.Tensor, gen: torch.Generator, a: float = math.sqrt(5)) -> torch.Tensor:
    """nn.Linear's default init (kaiming_uniform with a=sqrt(5)), drawn from ``gen``."""
    fan_in = t[0].numel() if t.dim() > 1 else t.numel()
    gain = math.sqrt(2.0 / (1 + a * a))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=gen)


def normal_(t: torch.Tensor, gen: torch.Generator, std: float) -> torch.Tensor:
    with torch.no_grad():
        return t.normal_(0.0, std, generator=gen)


def options_to_dict(options: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(options)
