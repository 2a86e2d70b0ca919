"""MoLE: a learned gate per block weighs frozen LoRAs; a balancing loss keeps it from collapsing onto one.

Wu, Huang, Wei, "Mixture of LoRA Experts", ICLR 2024, arXiv 2404.13628 (https://arxiv.org/abs/2404.13628):

    E_Ω = [LN(y_1) ; ... ; LN(y_N)]  pooled over tokens / pixels -> (B, N·d)
    G   = softmax( E_Ω e / τ )      over the adapters present and not masked     (B, N), one weight per LoRA
    y   = y0 + Σ_i G_i · y_i         at every adapted layer of the block
    L   = L_task + α · L_balance,    L_balance = -Σ_i log q_i,  q_i = mean of G_i over gated blocks and samples

e (zero init: the uniform mixture) and τ (learned, > 0 as exp(log τ)) are the only trained parameters.
**Block** (default ``granularity="block"``): the deepest numbered submodule holding the layer (a decoder layer
``layers.3``, a transformer block, a UNet ResNet or attention block, see ``block_of``); the gate reads the expert outputs of
the block's first adapted layer (module order) and every adapted layer of the block uses its weights.
``granularity="layer"``: one gate per adapted layer (the paper's matrix-wise ablation).
Differences from the paper, which gates full block outputs E_i(x) (N+1 block forwards) flattened over a fixed
sequence length: here the gate sees the per-layer expert outputs the fusion layer already computes, mean-pooled
over tokens/pixels, so any length or resolution works at the cost of one pass.
**Masking** (inference): ``mask=["b"]`` or ``set_mask(fusion, ["b"])`` drops LoRAs and renormalises the others
without retraining; adapters switched off with ``set_adapters`` are dropped the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.layer import AdaptedLayer
from .base import Combiner, Fusion, FusionMethod
from .mixture import check_mixable

INTRA_LAYER_LISTS = ("to_out", "net")  # numbered parts inside one layer (attention output, feed-forward), not blocks


def block_of(key: str) -> str:
    """The block a layer belongs to: the prefix up to the deepest numbered path part that has a part after it
    (``layers.3``, ``transformer_blocks.0``, ``resnets.1``, ``attentions.0``), skipping ``to_out.N`` and ``net.N``;
    a layer with no such part is its own block."""
    parts = key.split(".")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i].isdigit() and parts[i - 1] not in INTRA_LAYER_LISTS:
            return ".".join(parts[: i + 1])
    return key


class MoleState:
    """Per fusion: the forward counter, each block's gate weights of the current forward, and the weights
    recorded for the balancing loss since it was last taken."""

    def __init__(self, names: list[str], alpha: float) -> None:
        self.names, self.alpha = names, alpha
        self.call = 0
        self.mask: set[str] = set()
        self.gates: dict[str, tuple[int, torch.Tensor]] = {}
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []  # (G (B, N), available (N,))

    def balance_loss(self) -> torch.Tensor | None:
        """-Σ_i log q_i over the adapters available in the recorded forwards; consumes the records."""
        if not self.records:
            return None
        g = torch.cat([w.sum(0, keepdim=True) for w, _ in self.records])  # (R, N)
        count = torch.stack([a * w.shape[0] for w, a in self.records]).sum(0)  # samples where i was available
        self.records = []
        keep = count > 0
        q = g.sum(0)[keep] / count[keep]
        return -torch.log(q).sum()


class MoleCombiner(Combiner):
    def __init__(self, names: list[str], block: str, state: MoleState, gate_dims: int | None, channel_dim: int,
                 temperature: float) -> None:
        super().__init__(names)
        self.block, self.state, self.channel_dim = block, state, channel_dim
        self.leader = gate_dims is not None
        if self.leader:
            self.e = nn.Parameter(torch.zeros(len(names) * gate_dims, len(names)))  # zero: uniform mixture
            self.log_tau = nn.Parameter(torch.tensor(math.log(temperature)))

    def _pooled(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """LN over channels per token/pixel, mean over tokens/pixels: (B, d)."""
        y = y.to(dtype).movedim(self.channel_dim, -1)
        y = F.layer_norm(y, y.shape[-1:], eps=1e-5)
        return y.reshape(y.shape[0], -1, y.shape[-1]).mean(1)

    def weights(self, y0: torch.Tensor, ys: dict[str, torch.Tensor]) -> torch.Tensor:
        """G (B, N) from this layer's expert outputs (absent and masked adapters get 0)."""
        n, b = len(self.names), y0.shape[0]
        d = self.e.shape[0] // n
        dt = torch.promote_types(torch.promote_types(y0.dtype, self.e.dtype), torch.float32)  # fp64 stays fp64
        feats = [self._pooled(ys[m], dt) if m in ys else y0.new_zeros((b, d), dtype=dt) for m in self.names]
        logits = torch.cat(feats, -1) @ self.e.to(dt) / self.log_tau.to(dt).exp()  # (B, N)
        avail = torch.tensor([m in ys and m not in self.state.mask for m in self.names], device=logits.device)
        if not bool(avail.any()):
            raise AdapterError(f"mole: every adapter of {self.names} is masked or inactive at '{self.block}'")
        w = torch.softmax(logits.masked_fill(~avail, float("-inf")), -1)
        if torch.is_grad_enabled() and self.training:
            self.state.records.append((w, avail.float()))
        return w

    def combine(self, layer: AdaptedLayer, y0: torch.Tensor, ys: dict[str, torch.Tensor],
                ctx: CallContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        st = self.state
        if self.leader:
            w = self.weights(y0, ys)
            st.gates[self.block] = (st.call, w)
        else:
            call, w = st.gates.get(self.block, (-1, None))
            if call != st.call:
                raise AdapterError(f"mole: a layer of block '{self.block}' ran before the block's first adapted layer; "
                                   "use granularity='layer' for this model")
        shape = (-1,) + (1,) * (y0.dim() - 1)
        out, weights = y0, {}
        for m, y in ys.items():
            g = w[:, self.names.index(m)].view(shape).to(y.dtype)
            out = out + g * y
            weights[m] = g
        return out, weights

    @classmethod
    def group_regularization(cls, combiners: list[MoleCombiner]) -> torch.Tensor | None:
        """α · L_balance of every MoLE fusion these combiners belong to (TrainingHooks adds it to the loss)."""
        states = {id(c.state): c.state for c in combiners}.values()
        terms = [(s.alpha, s.balance_loss()) for s in states]
        terms = [a * t for a, t in terms if t is not None and a]
        return sum(terms[1:], terms[0]) if terms else None


class MoleFusion(FusionMethod):
    name = "mole"
    formula = "G = softmax([LN(y_1);...;LN(y_N)] e / tau) per block; y = y0 + sum_i G_i * y_i; + alpha * balance loss"
    paper = "https://arxiv.org/abs/2404.13628"
    trainable = True

    @dataclass
    class Options:
        granularity: str = "block"  # block | layer
        temperature: float = 1.0  # initial tau (learned)
        balance_weight: float = 0.5  # alpha of L_balance (0: off)
        mask: list[str] = field(default_factory=list)  # adapters dropped at inference, the rest renormalised

    def check(self, layers: dict[str, AdaptedLayer], names: list[str]) -> None:
        o = self.options
        check_mixable(layers, names, "mole", min_adapters=2)
        if o.granularity not in ("block", "layer"):
            raise AdapterError(f"mole: granularity={o.granularity!r}; expected 'block' or 'layer'")
        if o.temperature <= 0:
            raise AdapterError(f"mole: temperature={o.temperature} must be positive")
        check_mask(names, o.mask)

    def prepare(self, layers: dict[str, AdaptedLayer], names: list[str], roles: dict[str, str]) -> None:
        self.state = MoleState(list(names), self.options.balance_weight)
        self.state.mask = set(self.options.mask)
        self.leaders: dict[str, str] = {}
        for k, layer in layers.items():
            if any(n in layer.adapters for n in names):
                self.leaders.setdefault(self._block(k), k)

    def _block(self, key: str) -> str:
        return block_of(key) if self.options.granularity == "block" else key

    def make_combiner(self, key: str, layer: AdaptedLayer, names: list[str], roles: dict[str, str]) -> Combiner | None:
        if not any(n in layer.adapters for n in names):
            return None
        block = self._block(key)
        dims = layer.info.out_features if self.leaders[block] == key else None
        channel_dim = 1 if layer.info.kind.startswith("conv") else -1
        return MoleCombiner(names, block, self.state, dims, channel_dim, self.options.temperature)

    def attach(self, fusion: Fusion, models: dict[str, nn.Module]) -> None:
        state = self.state

        def bump(module: nn.Module, args: tuple) -> None:
            state.call += 1

        for m in models.values():
            ids = {id(x) for x in m.modules()}
            if any(id(c) in ids for c in fusion.layers.values()):
                fusion.handles.append(m.register_forward_pre_hook(bump))


def check_mask(names: list[str], mask: list[str]) -> None:
    unknown = [m for m in mask if m not in names]
    if unknown:
        raise AdapterError(f"mole: mask names {unknown} are not in the mixture {names}")
    if set(names) <= set(mask):
        raise AdapterError(f"mole: masking every adapter of {names} leaves nothing to mix")


def set_mask(fusion: Fusion, mask: list[str]) -> None:
    """Drop ``mask`` from the mixture at inference (the others renormalised); ``[]`` restores all."""
    if not isinstance(fusion.method, MoleFusion):
        raise AdapterError(f"set_mask: a '{fusion.method.name}' fusion has no MoLE gates")
    check_mask(fusion.names, list(mask))
    fusion.method.state.mask = set(mask)
    fusion.method.options.mask = list(mask)


def gate_weights(fusion: Fusion) -> dict[str, torch.Tensor]:
    """The last forward's weights per block: {block: (B, N)} (for plots and tests)."""
    st = fusion.method.state
    return {b: w for b, (call, w) in st.gates.items() if call == st.call}
