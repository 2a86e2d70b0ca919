"""Route first, then compute: combiners that pick adapters per token BEFORE computing any adapter output.

The plain :class:`~lora_diffusion.fusion.base.Combiner` computes every adapter's output y_i and then mixes them;
with a library of 1000 LoRAs that is 1000 low-rank products per token for one or a few used. A
:class:`RoutedCombiner` instead sees the layer input x and the adapters' factors stacked per layer,

    A: (n, R, in)   B: (n, out, R)   s: (n,)          ΔW_i = s_i · B_i A_i   (ranks < R zero-padded: exact)

asks ``route(x2d, ctx)`` for a :class:`Route` (per token: k adapter indices, k weights, optionally the k
projections A_i x already computed by the router) and applies only those:

    y = y0 + Σ_{j<k} w_j · s_{i_j} · B_{i_j} (A_{i_j} x)          (gathered per token, batched)

LAG (``lag.py``: Arrow filter + SpectR rerank, k = 1 applied), PEFT-style Arrow (softmax over the top k) and any
top-k mixture (X-LoRA with ``top_k``, MoLE with masking) are a ``route`` each. Only low-rank additive adapters can
be stacked (LoRA, rsLoRA, LoRA-FA, SingLoRA); others get one error naming the adapter and module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.layer import AdaptedLayer
from .base import Combiner

PLAIN_LOWRANK = frozenset({"lora", "rslora", "lorafa"})  # ΔW = scaling · lora_B @ lora_A, nothing else
CHUNK_TOKENS = 1024  # tokens per gather (bounds the (T, k, R, in) gathered copy)


def lowrank_factors(layer: AdaptedLayer, name: str, method: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (r, in), B (out, r), s) with ΔW = s·B A for adapter ``name`` on ``layer``; a clear error otherwise."""
    ad = layer.adapters[name]
    where = f"adapter '{name}' on module '{ad.cfg.module_name}'"
    if layer.info.kind != "linear":
        raise AdapterError(f"fusion '{method}' routes tokens of linear layers; {where} is a {layer.info.kind} layer")
    if hasattr(ad, "lowrank_factors"):
        down, up, s = ad.lowrank_factors()
        return down, up, float(s)
    if ad.variant not in PLAIN_LOWRANK or not ad.additive:
        kind = "DoRA: its output is not additive (magnitude-normalised)" if not ad.additive else f"'{ad.variant}'"
        raise AdapterError(f"fusion '{method}' needs low-rank additive adapters (ΔW = s·B A: "
                           f"{', '.join(sorted(PLAIN_LOWRANK))} or SingLoRA); {where} is {kind}")
    return ad.lora_A, ad.lora_B, float(ad.scaling)


@dataclass
class LowRankStack:
    """The factors of ``names`` on one layer, stacked: A (n, R, in), B (n, out, R), s (n,)."""

    names: list[str]
    A: torch.Tensor
    B: torch.Tensor
    s: torch.Tensor
    ranks: list[int]


def stack_factors(layer: AdaptedLayer, names: Sequence[str], method: str,
                  dtype: torch.dtype | None = None) -> LowRankStack:
    """Stack the factors of the adapters ``names`` present on ``layer`` (zero-padding smaller ranks)."""
    present = [n for n in names if n in layer.adapters]
    facs = [lowrank_factors(layer, n, method) for n in present]
    if not facs:
        raise AdapterError(f"fusion '{method}': none of {list(names)[:4]} is on this layer")
    rmax = max(a.shape[0] for a, _, _ in facs)
    dt = dtype or facs[0][0].dtype
    dev = facs[0][0].device
    A = torch.zeros(len(facs), rmax, facs[0][0].shape[1], dtype=dt, device=dev)
    B = torch.zeros(len(facs), facs[0][1].shape[0], rmax, dtype=dt, device=dev)
    with torch.no_grad():
        for i, (a, b, _) in enumerate(facs):
            A[i, : a.shape[0]] = a
            B[i, :, : a.shape[0]] = b
    s = torch.tensor([f[2] for f in facs], dtype=dt, device=dev)
    return LowRankStack(present, A, B, s, [a.shape[0] for a, _, _ in facs])


@dataclass
class Route:
    """Per token (T rows): ``index`` (T, k) into the stack, ``weight`` (T, k) or None (= 1), and optionally
    ``z`` (T, k, R), the projections A_i x the router already computed (reused, not recomputed)."""

    index: torch.Tensor
    weight: torch.Tensor | None = None
    z: torch.Tensor | None = None


def gather_project(A: torch.Tensor, x2: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """z[t, j] = A[index[t, j]] x[t]: (T, k, R), in chunks of tokens (memory T·k·R·in at most per chunk)."""
    out = []
    for lo in range(0, x2.shape[0], CHUNK_TOKENS):
        idx, xc = index[lo:lo + CHUNK_TOKENS], x2[lo:lo + CHUNK_TOKENS]
        out.append(torch.einsum("tkri,ti->tkr", A[idx], xc))  # A[idx]: (t, k, R, in)
    return torch.cat(out) if len(out) > 1 else out[0]


def apply_route(stack_B: torch.Tensor, scale: torch.Tensor, route: Route, T: int) -> torch.Tensor:
    """Σ_j w_j s_{i_j} B_{i_j} z_j: (T, out), one gathered B per routed slot."""
    index, z = route.index, route.z
    w = scale[index] if route.weight is None else route.weight * scale[index]  # (T, k)
    out = None
    for j in range(index.shape[1]):
        parts = []
        for lo in range(0, T, CHUNK_TOKENS):
            sl = slice(lo, lo + CHUNK_TOKENS)
            zj = z[sl, j] * w[sl, j, None]  # (t, R)
            parts.append(torch.bmm(stack_B[index[sl, j]], zj.unsqueeze(-1)).squeeze(-1))  # (t, out)
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        out = y if out is None else out + y
    return out


class RoutedCombiner(Combiner):
    """A combiner that routes first: ``route(x2d, ctx)`` -> :class:`Route`; only routed adapters are computed.

    Holds the layer's stacked factors as non-persistent buffers (``A``, ``B``, ``s``). The user's per-adapter weights
    (``fuse(..., weights=)``) are read once at the first call: to change them, fuse again. Adapters active on the layer
    but outside the routed set are added as a plain sum. With ``record`` on, the strength of adapter i is the
    fraction of tokens routed to it times its weight, and ``last_index`` keeps the last call's routes.
    """

    def __init__(self, stack: LowRankStack) -> None:
        super().__init__(stack.names)
        self.register_buffer("A", stack.A, persistent=False)
        self.register_buffer("B", stack.B, persistent=False)
        self.register_buffer("s", stack.s, persistent=False)
        self.ranks = stack.ranks
        self.scale: torch.Tensor | None = None  # (n,) s_i x the weight given to ``fuse`` (read at the first call)
        self.last_index: torch.Tensor | None = None

    def route(self, x2: torch.Tensor, ctx: CallContext) -> Route:
        raise NotImplementedError

    def forward(self, layer: AdaptedLayer, x: torch.Tensor, y0: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(self.A.dtype)  # (T, in)
        route = self.route(x2, ctx)
        if route.z is None:
            route.z = gather_project(self.A, x2, route.index)
        if self.scale is None:  # the adapters' own scalings times the user's weights, once (fuse sets the weights)
            user = torch.tensor([layer.scales[n] for n in self.names], dtype=self.s.dtype, device=self.s.device)
            self.scale = self.s * user
        delta = apply_route(self.B, self.scale, route, x2.shape[0])  # (T, out)
        out = y0 + delta.view(*y0.shape[:-1], -1).to(y0.dtype)
        for n in self.split(layer)[1]:  # adapters active on the layer but not routed here: plain sum
            out = out + layer.adapter_output(n, x, y0, ctx)
        if self.record and not torch.is_grad_enabled():
            self._record(route, ctx)
        return out

    def _record(self, route: Route, ctx: CallContext) -> None:
        self.last_index = route.index.detach()
        w = torch.ones_like(route.index, dtype=torch.float32) if route.weight is None else route.weight.float()
        vec = torch.zeros(len(self.names), device=w.device).index_add_(0, route.index.flatten(), w.flatten())
        vec = vec / max(route.index.shape[0], 1)
        self.trace.append((None if ctx.timestep is None else ctx.timestep.detach().float().mean(), vec))

