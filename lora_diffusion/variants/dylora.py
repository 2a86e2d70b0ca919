"""DyLoRA (Valipour et al., EACL 2023, arXiv 2210.07558): nested ranks trained at random truncations.

    y = W x + (α/b) · B[:, :b] · A[:b] · x,   A: (r_max, in[, kh, kw]),  B: (out, r_max[, 1, 1])

Each optimizer step draws b uniformly from {block, 2·block, ..., r_max} (one b for the whole model, from
(seed, ctx.step): every data-parallel rank and a resumed run draw the same b, no RNG state to save).
Mode "frozen" (the paper's): only the last block (rows b-block..b of A, columns of B) gets gradients, the
earlier ones are used detached; mode "all": every row <= b trains (nested-dropout style). Outside training
(eval mode, no step in the context, or under ``no_grad``: validation samples) the adapter runs at
``inference_rank`` (None: r_max), any b <= r_max.
Init as LoRA (A Kaiming-uniform, B = 0). Conv2d: the LoCon form with truncated channels.

LyCORIS' ``DyLoraModule`` (``algo=dylora``): same tensors (its ``lora_down``/``lora_up`` are A and B, in blocks of
``block_size``), but its scale is alpha / (number of blocks used), and ``get_weight(rank)`` uses ceil(rank/block)+1
blocks; so LyCORIS with alpha a at k blocks equals ours with α = a·block_size at b = k·block_size (tests check it).
A file exported here (``inference_rank`` b) is a plain LoRA of rank b, what every LoRA/LyCORIS loader reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.functional import lowrank_forward, lowrank_weight
from ..core.layerinfo import LayerInfo
from ..core.registry import register_variant
from ..core.spec import ModuleConfig
from .lora import LoRA


def sampled_rank(seed: int, step: int, r_max: int, block: int) -> int:
    """b for optimizer step ``step``: uniform over the multiples of ``block`` up to ``r_max``."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return block * int(torch.randint(1, r_max // block + 1, (), generator=gen))


@register_variant
class DyLoRA(LoRA):
    variant = "dylora"
    paper = "https://arxiv.org/abs/2210.07558"
    uses_step = True
    export_as_lora = True  # at inference_rank

    @dataclass
    class Options(LoRA.Options):
        block_size: int = 1  # ranks added per truncation step (the paper: 1; LyCORIS' default: 4)
        mode: str = "frozen"  # "frozen": only the newest block trains | "all": every row <= b trains
        inference_rank: int | None = None  # b outside training (None: r_max)

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.mode not in ("frozen", "all"):
                raise AdapterError(f"option mode: expected 'frozen' or 'all', found {self.mode!r}")
            if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
                raise AdapterError(f"option block_size: expected an integer >= 1, found {self.block_size!r}")

    def __init__(self, info: LayerInfo, cfg: ModuleConfig, **kw: Any) -> None:
        super().__init__(info, cfg, **kw)
        self.inference_rank = cfg.options.inference_rank or cfg.rank

    @classmethod
    def check(cls, info: LayerInfo, cfg: ModuleConfig, loading: bool = False) -> None:
        super().check(info, cfg, loading)
        o = cfg.options
        if cfg.rank % o.block_size:
            raise AdapterError(f"module '{cfg.module_name}': DyLoRA rank (r_max) {cfg.rank} must be a multiple of "
                               f"option block_size={o.block_size}")
        if o.inference_rank is not None and not 1 <= o.inference_rank <= cfg.rank:
            raise AdapterError(f"module '{cfg.module_name}': DyLoRA option inference_rank={o.inference_rank} must be "
                               f"in [1, rank={cfg.rank}]")

    def rank_for(self, ctx: CallContext | None) -> int:
        """The truncation b of this call: sampled per optimizer step in training, ``inference_rank`` otherwise."""
        if not self._sampling(ctx):
            return self.inference_rank
        key = ("dylora_b", self.cfg.seed, ctx.step, self.cfg.rank, self.cfg.options.block_size)
        if key not in ctx.cache:
            ctx.cache[key] = sampled_rank(self.cfg.seed, ctx.step, self.cfg.rank, self.cfg.options.block_size)
        return ctx.cache[key]

    def _sampling(self, ctx: CallContext | None) -> bool:
        """Training forward: train mode, a step in the context and autograd on (sampling images or evaluating under
        ``no_grad`` in the middle of a run uses ``inference_rank``)."""
        return self.training and ctx is not None and ctx.step is not None and torch.is_grad_enabled()

    def set_inference_rank(self, b: int) -> None:
        if not 1 <= b <= self.cfg.rank:
            raise AdapterError(f"module '{self.cfg.module_name}': DyLoRA rank {b} must be in [1, {self.cfg.rank}]")
        self.inference_rank = b

    def _factors(self, ctx: CallContext | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A[:b] (b, in, *k), B[:, :b] (out, b, *1), α/b); frozen mode detaches all but the newest block."""
        b = self.rank_for(ctx)
        a, up = self.lora_A[:b], self.lora_B[:, :b]
        lo = b - self.cfg.options.block_size
        if self.cfg.options.mode == "frozen" and lo > 0 and self._sampling(ctx):
            a = torch.cat([a[:lo].detach(), a[lo:]])
            up = torch.cat([up[:, :lo].detach(), up[:, lo:]], dim=1)
        return a, up, self.cfg.alpha / b

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        b = self.inference_rank
        return self.lora_A[:b], self.lora_B[:, :b], self.cfg.alpha / b

    def delta_weight(self, ctx: CallContext | None = None) -> torch.Tensor:
        a, up, s = self._factors(ctx)
        return lowrank_weight(a, up, self.info.weight_shape) * s

    def delta_forward(self, x: torch.Tensor, ctx: CallContext | None = None) -> torch.Tensor:
        a, up, s = self._factors(ctx)
        return lowrank_forward(x, self.info, a, up) * s

    def adapted_output(self, x, base_out, layer, ctx, scale):  # no LoRA addmm fast path: the rank varies
        return super(LoRA, self).adapted_output(x, base_out, layer, ctx, scale)

    def extra_repr(self) -> str:
        o = self.cfg.options
        return super().extra_repr() + f", block_size={o.block_size}, mode={o.mode}, inference_rank={self.inference_rank}"
