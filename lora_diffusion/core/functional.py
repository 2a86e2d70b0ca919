"""Pure tensor math shared by variants (no modules, no state)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layerinfo import LayerInfo


def _mid_view(mid: torch.Tensor, h: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """Broadcast a rank-space vector (r,) or per-sample (B, r) over the activation h."""
    if info.kind == "conv2d":  # h: (B, r, H, W)
        return mid.view(-1, mid.shape[-1], *([1] * (h.dim() - 2))) if mid.dim() == 2 else mid.view(-1, 1, 1)
    if mid.dim() == 2:  # h: (B, ..., r)
        return mid.view(mid.shape[0], *([1] * (h.dim() - 2)), mid.shape[1])
    return mid


def lowrank_forward(x: torch.Tensor, info: LayerInfo, down: torch.Tensor, up: torch.Tensor,
                    mid: torch.Tensor | None = None) -> torch.Tensor:
    """up(mid ⊙ down(x)): down is (r, in, *k) using the layer's op, up is (out, r, *1) pointwise."""
    h = info.op(x, down)  # (..., r) or (B, r, H, W)
    if mid is not None:
        h = h * _mid_view(mid, h, info)
    if info.kind == "conv2d":
        return F.conv2d(h, up)
    return F.linear(h, up.view(up.shape[0], -1))


def lowrank_weight(down: torch.Tensor, up: torch.Tensor, shape: tuple[int, ...],
                   mid: torch.Tensor | None = None) -> torch.Tensor:
    """(up · diag(mid) · down) reshaped to the base weight's (out, in, *k)."""
    u = up.reshape(up.shape[0], -1)  # (out, r)
    if mid is not None:
        u = u * mid
    return (u @ down.reshape(down.shape[0], -1)).view(shape)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` = m·n with m <= n, n as close to ``factor`` (or sqrt) as allowed.

    Same rule as LyCORIS/PEFT, so LoKr shapes of files from the wild match.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def rebuild_tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker core t (r, r, *k) with mode factors wa (r, out), wb (r, in) -> (out, in, *k)."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


def rank_mask(timestep: torch.Tensor, rank: int, min_rank: int, num_timesteps: int,
              exponent: float = 1.0) -> torch.Tensor:
    """T-LoRA: r(t) = floor(((T - t)/T)^γ (r - r_min)) + r_min; mask keeps the first r(t) of r.

    timestep () -> (r,); (B,) -> (B, r).
    """
    t = timestep.float().clamp(0, num_timesteps)
    frac = ((num_timesteps - t) / num_timesteps).pow(exponent)
    r_t = torch.floor(frac * (rank - min_rank)) + min_rank  # () or (B,)
    idx = torch.arange(rank, device=t.device, dtype=t.dtype)
    return (idx < r_t.unsqueeze(-1)).float()


def active_rank(timestep: float, rank: int, min_rank: int, num_timesteps: int, exponent: float = 1.0) -> int:
    """The number of rank components T-LoRA keeps at ``timestep``."""
    return int(rank_mask(torch.tensor(float(timestep)), rank, min_rank, num_timesteps, exponent).sum())
