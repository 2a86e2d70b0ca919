"""Gated fusion (AutoLoRA), learned per layer, token, channel and denoising step, and per LoRA role.

Li et al., "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image Generation",
arXiv 2508.02107 (gate as in DiffSynth-Studio's ``LoraMerger``), extended with per-role terms (r_i = the role of
LoRA i: subject, style or other, from ``fuse(..., roles=...)``; ``blend`` takes them from the files' ``lora_kind``):

    g_i = σ( w_base ⊙ LN(y0) + w_lora ⊙ LN(y_i) + w_cross ⊙ LN(y0) ⊙ LN(y_i) + b + β_{r_i} + (u + υ_{r_i}) · φ(t) )
    y   = y0 + Σ_i (w_out + ω_{r_i}) ⊙ g_i ⊙ y_i

LN normalises over the output channels (per token / pixel, no affine); w_base, w_lora, w_cross, b, w_out are
per-channel vectors of each adapted layer, shared by all LoRAs, so one gate serves any number of LoRAs and
LoRAs it never saw. The paper's gate sees the timestep only through y0 and y_i; here it also reaches the gate
through the per-call context: φ(t) = [sin πkp, cos πkp]_{k=1..K}, p = 1 - t/T, with a learned u per layer.

Why roles: with every parameter shared, two LoRAs differ to the gate only through the per-channel statistics
of LN(y_i); on the demo world the trained gates gave a concept and a style LoRA the same strength within 0.005
at every layer and step, so they could not do what tuned static weights do (weigh the concept down and the
style up). The role offsets β_r (per channel), υ_r (time weights) and ω_r (per channel) give each role its own
strength per layer, channel and step; they are still shared by every LoRA of a role, so gates keep working for
any number of LoRAs and for unseen ones. ``per_role=False`` is the paper's gate (no role terms).
Init: w_* = 0, b = 0, u = 0, role offsets 0 and w_out = 2, so an untrained gate gives exactly the static sum at
weight 1. Gates files written before the role terms load with zero offsets (exactly the gate they were).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.context import CallContext
from ..core.errors import AdapterError, AdapterFileError
from ..core.layer import AdaptedLayer
from ..io.files import read_header, read_safetensors, write_safetensors
from ..io.library import GATES_FORMAT
from .base import ROLES, Combiner, Fusion, FusionMethod, fourier, progress

log = logging.getLogger(__name__)


ROLE_PARAMS = ("b_role", "u_role", "w_out_role")  # the per-role offsets β_r, υ_r, ω_r (absent with per_role=False)


class GateCombiner(Combiner):
    """One layer's gate. With autograd or recording all LoRAs go through it together: their outputs are stacked
    (k, B, ...) so one LayerNorm, one sigmoid and one weighted sum serve any k; while sampling (no autograd, no
    recording) it runs one LoRA at a time in place, without the stack copy (``_combine_inplace``, faster); the
    timestep term u·φ(t) is computed once per call and folded into the bias (no host synchronisation anywhere).
    ``roles`` ({name: role}) with ``per_role``: each LoRA also gets its role's offsets (β_r, υ_r, ω_r)."""

    def __init__(self, names: list[str], channels: int, channel_dim: int, time_features: int, init_out: float,
                 roles: dict[str, str] | None = None, per_role: bool = False) -> None:
        super().__init__(names)
        self.channel_dim, self.time_features = channel_dim, time_features
        self.w_base = nn.Parameter(torch.zeros(channels))
        self.w_lora = nn.Parameter(torch.zeros(channels))
        self.w_cross = nn.Parameter(torch.zeros(channels))
        self.b = nn.Parameter(torch.zeros(channels))
        self.w_out = nn.Parameter(torch.full((channels,), float(init_out)))
        self.u = nn.Parameter(torch.zeros(2 * time_features))
        self.per_role = per_role
        self.compiled = False  # combine through fused_gate (GatedFusion's compile option)
        self.role_of = {n: ROLES.index((roles or {}).get(n, "other")) for n in names}
        self._index: dict[tuple[str, ...], torch.Tensor] = {}  # role indices per set of present LoRAs
        self._folded_cache: dict[tuple, tuple] = {}  # inference: the folded per-LoRA terms (see _folded)
        if per_role:
            self.b_role = nn.Parameter(torch.zeros(len(ROLES), channels))  # β_r
            self.u_role = nn.Parameter(torch.zeros(len(ROLES), 2 * time_features))  # υ_r
            self.w_out_role = nn.Parameter(torch.zeros(len(ROLES), channels))  # ω_r

    def _cast(self, p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return p if p.dtype == like.dtype else p.to(like.dtype)

    def _bias(self, ctx: CallContext, y0l: torch.Tensor) -> torch.Tensor:
        """b + u·φ(t) over channels-last y0: (C,) for one timestep, (B, 1.., C) for one per sample."""
        b = self._cast(self.b, y0l)
        phi = time_features(ctx, self.time_features)
        if phi is None:
            return b
        s = (phi if phi.device == self.u.device else phi.to(self.u.device)) @ self.u  # () or (B,)
        return b + self._cast(s.view(-1, *([1] * (y0l.dim() - 1))) if s.dim() else s, y0l)

    def _roles(self, names: tuple[str, ...]) -> torch.Tensor:
        """(k,) role index of each present LoRA, on the gate's device (built once per set of names)."""
        idx = self._index.get(names)
        if idx is None or idx.device != self.b.device:
            idx = self._index[names] = torch.tensor([self.role_of[n] for n in names], device=self.b.device)
        return idx

    def _folded(self, names: tuple[str, ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per present LoRA: b + β_{r_i} (k, C), u + υ_{r_i} (k, 2K), w_out + ω_{r_i} (k, C). Without autograd they
        are kept until a parameter changes (its version or storage), so sampling folds them once, not per call."""
        params = (self.b, self.u, self.w_out, self.b_role, self.u_role, self.w_out_role)
        version = tuple((q._version, q.data_ptr()) for q in params)
        key = (names, like.dtype)
        hit = self._folded_cache.get(key)
        if hit is not None and hit[0] == version and not torch.is_grad_enabled():
            return hit[1]
        idx = self._roles(names)
        out = (self._cast(self.b + self.b_role[idx], like), self.u + self.u_role[idx],
               self._cast(self.w_out + self.w_out_role[idx], like))
        if not torch.is_grad_enabled():
            self._folded_cache[key] = (version, out)
        return out

    def _role_bias(self, bk: torch.Tensor, uk: torch.Tensor, ctx: CallContext, y0l: torch.Tensor) -> torch.Tensor:
        """b + β_{r_i} + (u + υ_{r_i})·φ(t) per present LoRA: (k, 1.., C), or (k, B, 1.., C) with per-sample t."""
        k, ones = len(bk), [1] * (y0l.dim() - 1)
        bias = bk.view(k, *ones, -1)
        phi = time_features(ctx, self.time_features)
        if phi is None:
            return bias
        s = (phi if phi.device == uk.device else phi.to(uk.device)) @ uk.T  # (k,) or (B, k)
        s = s.view(k, *([1] * y0l.dim())) if s.dim() == 1 else s.T.reshape(k, -1, *ones)
        return bias + self._cast(s, y0l)

    def _gates(self, n0: torch.Tensor, ny: torch.Tensor, y0l: torch.Tensor, ctx: CallContext, inplace: bool,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """g (k, B, ..., C) from LN(y0) (B, ..., C) and LN(y_i) stacked channels-last (k, B, ..., C); ``bias``: the
        per-LoRA bias of the role path (else the shared b + u·φ(t))."""
        bias = self._bias(ctx, y0l) if bias is None else bias
        a = torch.addcmul(bias, self._cast(self.w_base, y0l), n0)  # w_base LN(y0) + bias: (k or 1, B, .., C)
        c = torch.addcmul(self._cast(self.w_lora, y0l), self._cast(self.w_cross, y0l), n0)  # w_lora + w_cross LN(y0)
        pre = a.addcmul_(ny, c) if inplace and a.shape == ny.shape else torch.addcmul(a, ny, c)  # A + LN(y_i) * C
        return pre.sigmoid_() if inplace else pre.sigmoid()

    def _last(self, y: torch.Tensor) -> torch.Tensor:
        """Channels-last view (convolution outputs (B, C, H, W) -> (B, H, W, C); no copy)."""
        return y if self.channel_dim == -1 else y.movedim(1, -1)

    def _stack(self, y0: torch.Tensor, ys: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(channels-last view of y0, its LayerNorm over the channels, y_1..y_k stacked channels-last (k, B, ..., C)
        — one copy, which also does the transpose of convolution outputs —, and their LayerNorm)."""
        y0l, stacked = self._last(y0), torch.stack([self._last(y) for y in ys])
        return y0l, F.layer_norm(y0l, y0l.shape[-1:]), stacked, F.layer_norm(stacked, stacked.shape[-1:])

    def _terms(self, ys: dict[str, torch.Tensor], ctx: CallContext, y0l: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """(the per-LoRA bias or None, the output weight: w_out (C,), or w_out + ω_{r_i} (k, C) with roles)."""
        if not self.per_role:
            return None, self._cast(self.w_out, y0l)
        bk, uk, wk = self._folded(tuple(ys), y0l)
        return self._role_bias(bk, uk, ctx, y0l), wk

    def gates(self, y0: torch.Tensor, ys: dict[str, torch.Tensor], ctx: CallContext) -> dict[str, torch.Tensor]:
        """{name: g_i} (the shape of y_i)."""
        y0l, n0, _, ny = self._stack(y0, list(ys.values()))
        g = self._gates(n0, ny, y0l, ctx, inplace=False, bias=self._terms(ys, ctx, y0l)[0])
        return {n: gi if self.channel_dim == -1 else gi.movedim(-1, 1) for n, gi in zip(ys, g.unbind(0))}

    def combine(self, layer: AdaptedLayer, y0: torch.Tensor, ys: dict[str, torch.Tensor],
                ctx: CallContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.compiled:
            return self._combine_fused(y0, ys, ctx)
        inplace = not torch.is_grad_enabled()
        if inplace and not self.record:  # sampling: one LoRA at a time, no stack copy
            return self._combine_inplace(y0, ys, ctx), {}
        y0l, n0, stacked, ny = self._stack(y0, list(ys.values()))
        bias, w_out = self._terms(ys, ctx, y0l)
        g = self._gates(n0, ny, y0l, ctx, inplace, bias)  # (k, B, ..., C)
        per_lora = w_out.dim() == 2  # (k, C): w_out + ω_{r_i}
        weights = ({n: (w_out[i] if per_lora else w_out) * g[i] for i, n in enumerate(ys)} if self.record else {})
        gy = g.mul_(stacked) if inplace and not self.record else g * stacked
        if per_lora:  # y0 + Σ_i (w_out + ω_{r_i}) g_i y_i: k fused multiply-adds
            out = torch.addcmul(y0l, gy[0], w_out[0])
            for i in range(1, len(ys)):
                out = out.addcmul_(gy[i], w_out[i]) if inplace else torch.addcmul(out, gy[i], w_out[i])
        else:
            out = torch.addcmul(y0l, gy[0] if len(ys) == 1 else gy.sum(0), w_out)  # y0 + Σ w_out g_i y_i
        return (out if self.channel_dim == -1 else out.movedim(-1, 1)), weights

    def _combine_inplace(self, y0: torch.Tensor, ys: dict[str, torch.Tensor], ctx: CallContext) -> torch.Tensor:
        """Without autograd or recording: the formula one LoRA at a time on channels-last contiguous tensors, each
        LoRA's temporary reused in place (LN(y_i) -> pre-activation -> g_i -> g_i y_i), added into the output;
        no stacked copy of the y_i and no (k, B, ..., C) broadcast temporaries, 6 passes per LoRA over a
        y-sized tensor. One CPU thread, k = 1-3, vs the stacked form: 2.3-4x faster on (2, 1024, 320|2560) linear
        outputs, 1.05-1.25x on (2, 256, 640), about equal on conv outputs (the stacked form's copy transposes)."""
        y0l = self._last(y0)  # a view: the output keeps y0's memory layout (what the next layer's kernel expects)
        bias, w_out = self._terms(ys, ctx, y0l)  # per-LoRA bias (k, [B,] 1.., C) or None; w_out (k, C) or (C,)
        n0 = F.layer_norm(y0l, y0l.shape[-1:])
        c = torch.addcmul(self._cast(self.w_lora, y0l), self._cast(self.w_cross, y0l), n0)  # w_lora + w_cross LN(y0)
        w_base = self._cast(self.w_base, y0l)
        a = n0.mul_(w_base) if bias is not None else torch.addcmul(self._bias(ctx, y0l), w_base, n0)
        out = None
        for i, y in enumerate(ys.values()):
            yl = self._last(y)
            yl = yl if yl.is_contiguous() else yl.contiguous()  # conv outputs: one transposing copy
            t = F.layer_norm(yl, yl.shape[-1:])
            t = torch.addcmul(a, t, c, out=t)  # w_base LN(y0) [+ b] + LN(y_i) (w_lora + w_cross LN(y0))
            if bias is not None:
                t.add_(bias[i])  # + b + β_{r_i} + (u + υ_{r_i}) φ(t)
            t.sigmoid_().mul_(yl)  # g_i y_i
            w = w_out[i] if w_out.dim() == 2 else w_out
            out = torch.addcmul(y0l, t, w) if out is None else out.addcmul_(t, w)
        return out if self.channel_dim == -1 else out.movedim(-1, 1)

    def _combine_fused(self, y0: torch.Tensor, ys: dict[str, torch.Tensor],
                       ctx: CallContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same formula through ``fused_gate`` (torch.compile: one fused kernel instead of ~8 full-size passes;
        no stack copy); recording gets each LoRA's mean weight from the same kernel."""
        y0l = self._last(y0)
        bias, w_out = self._terms(ys, ctx, y0l)
        if bias is None:  # shared: (C,) or (B, 1.., C) -> (1, 1.., C) or (1, B, 1.., C)
            b = self._bias(ctx, y0l)
            bias = b.view(*([1] * (y0l.dim() + 1 - b.dim())), *b.shape)
        w = w_out if w_out.dim() == 2 else w_out[None]  # (k or 1, C)
        # the w_* go in as Parameters, whose shapes torch.compile keeps static: a graph per channel count (a few
        # per model), with kernels ~2x faster than with a symbolic C (measured: (2, 1024, 640), k = 3, CPU)
        out, strength = fused_gate(y0l, tuple(self._last(y) for y in ys.values()), self._cast(self.w_base, y0l),
                                   self._cast(self.w_lora, y0l), self._cast(self.w_cross, y0l), bias, w, self.record)
        return (out if self.channel_dim == -1 else out.movedim(-1, 1)), dict(zip(ys, strength))


def gate_sum(y0: torch.Tensor, ys: tuple[torch.Tensor, ...], w_base: torch.Tensor, w_lora: torch.Tensor,
             w_cross: torch.Tensor, bias: torch.Tensor, w_out: torch.Tensor,
             record: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y0 + Σ_i w_out_i ⊙ σ(bias_i + w_base ⊙ LN(y0) + LN(y_i) ⊙ (w_lora + w_cross ⊙ LN(y0))) ⊙ y_i, channels last:
    y0, y_i (B, ..., C); w_* (C,); bias (k or 1, [B,] 1.., C); w_out (k or 1, C) (one row: shared by all LoRAs).
    Written one LoRA at a time without in-place ops, for torch.compile to fuse; with ``record`` also each LoRA's
    mean effective weight w_out_i ⊙ g_i (0-d)."""
    n0 = F.layer_norm(y0, y0.shape[-1:])
    a = torch.addcmul(bias, w_base, n0)  # (k or 1, B, ..., C)
    c = torch.addcmul(w_lora, w_cross, n0)
    out, strength = y0, []
    for i, y in enumerate(ys):
        wg = w_out[min(i, len(w_out) - 1)] * torch.sigmoid(a[min(i, len(a) - 1)] + F.layer_norm(y, y.shape[-1:]) * c)
        out = out + wg * y
        if record:
            strength.append(wg.float().mean())
    return out, strength


_COMPILED: dict[str, Any] = {}


def fused_gate(*args: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``gate_sum`` compiled once per process (dynamic token counts; a graph per number of LoRAs, channel count
    and layout). If torch.compile cannot run here (e.g. no C++ compiler on CPU), says so once and runs
    ``gate_sum`` eagerly."""
    fn = _COMPILED.get("gate_sum")
    if fn is None:
        import torch._dynamo

        # a graph per number of LoRAs x channel count x layout x grad mode x recording (the SD1.5 UNet: 9 per k
        # while sampling): far more than the default limit of 8, past which dynamo would run it uncompiled
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 256)
        fn = _COMPILED["gate_sum"] = torch.compile(gate_sum, dynamic=True)
    if fn is gate_sum:
        return gate_sum(*args)
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (any backend failure: the eager function is the same formula)
        log.warning("gated fusion: torch.compile failed (%s: %s); the gate runs uncompiled", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        _COMPILED["gate_sum"] = gate_sum
        return gate_sum(*args)


def time_features(ctx: CallContext, n: int) -> torch.Tensor | None:
    """phi(t) of the context, computed once per context (memoised in ``ctx.cache``), () -> (2n,), (B,) -> (B, 2n)."""
    key = ("fusion_phi", n)
    if key not in ctx.cache:
        p = progress(ctx)
        ctx.cache[key] = None if p is None else fourier(p, n)
    return ctx.cache[key]


class GatedFusion(FusionMethod):
    name = "gated"
    formula = ("g_i = sigmoid(w_base*LN(y0) + w_lora*LN(y_i) + w_cross*LN(y0)*LN(y_i) + b + beta_r(i) "
               "+ (u + upsilon_r(i)).phi(t)); y = y0 + sum_i (w_out + omega_r(i))*g_i*y_i")
    paper = "https://arxiv.org/abs/2508.02107"
    trainable = True

    @dataclass
    class Options:
        time_features: int = 3  # K in phi(t)
        init_out: float = 2.0  # w_out at init: 2 * sigmoid(0) = 1, the static sum
        per_role: bool = True  # role offsets β_r, υ_r, ω_r (False: the paper's gate, every parameter shared)
        # torch.compile the gate: LN, gate and weighted sum in one fused kernel per layer instead of ~8 full-size
        # passes (docs/autolora.md "Speed"); the first call per number of LoRAs compiles (seconds)
        compile: bool = False

    def make_combiner(self, key: str, layer: AdaptedLayer, names: list[str], roles: dict[str, str]) -> Combiner | None:
        if not any(n in layer.adapters for n in names):
            return None
        dim = 1 if layer.info.kind.startswith("conv") else -1
        o = self.options
        comb = GateCombiner(names, layer.info.out_features, dim, o.time_features, o.init_out, roles, o.per_role)
        comb.compiled = o.compile
        return comb


# --- gate files ---
def gate_state_dict(fusion: Fusion) -> dict[str, torch.Tensor]:
    return {f"{k}.{p}": v.detach() for k, c in fusion.combiners.items() for p, v in c.state_dict().items()}


def save_gates(fusion: Fusion, path: str | os.PathLike, lora_hashes: dict[str, str],
               metadata: dict[str, str] | None = None) -> Path:
    """Write the gates (a small safetensors file) with the sha256 of every LoRA they were trained with."""
    if not isinstance(fusion.method, GatedFusion):
        raise AdapterError(f"only gated fusion has gates to save, not '{fusion.method.name}'")
    meta = {"format": GATES_FORMAT, "loras": json.dumps(lora_hashes, sort_keys=True),
            "options": json.dumps(vars(fusion.method.options)),
            "roles": json.dumps({n: fusion.roles[n] for n in lora_hashes if n in fusion.roles}, sort_keys=True),
            **(metadata or {})}
    write_safetensors(Path(path), gate_state_dict(fusion), meta)
    return Path(path)


def check_gate_hashes(path: str | os.PathLike, meta: dict[str, str], lora_hashes: dict[str, str],
                      allow_unseen: bool = False) -> None:
    """Refuse gates trained for other LoRAs: a name whose file differs, or (unless ``allow_unseen``) a LoRA the
    gates never saw. The message names each one."""
    trained = json.loads(meta.get("loras", "{}"))
    by_hash = {h: n for n, h in trained.items()}
    changed = [n for n, h in lora_hashes.items() if n in trained and trained[n] != h and h not in by_hash]
    unseen = [n for n, h in lora_hashes.items() if h not in by_hash and n not in changed]
    problems = [f"'{n}' differs from the file the gates were trained with (sha256 {lora_hashes[n][:12]} vs "
                f"{trained[n][:12]})" for n in changed]
    if unseen and not allow_unseen:
        problems.append(f"not trained with {[f'{n} (sha256 {lora_hashes[n][:12]})' for n in unseen]}")
    if problems:
        raise AdapterFileError(f"{path}: gates trained for LoRAs {sorted(trained)}; refused: " + "; ".join(problems)
                               + " (retrain with python -m training.train_gates, or allow unseen LoRAs explicitly)")
    if unseen:
        log.warning("%s: gates applied to LoRAs they were not trained with: %s", path, unseen)


def find_gates(folder: str | os.PathLike, lora_hashes: dict[str, str]) -> tuple[Path | None, list[str]]:
    """A gates file under ``folder`` (any depth, hidden folders too; headers only) trained with every one of these
    LoRAs (by sha256): the one trained with the fewest other LoRAs, then the newest. Returns (file or None, notes):
    the notes name the gates files left out because they were trained with a different file under a chosen name."""
    want = set(lora_hashes.values())
    found, notes = [], []
    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            _, meta = read_header(f)
        except (AdapterFileError, OSError, ValueError):
            continue
        if meta.get("format") != GATES_FORMAT:
            continue
        trained = json.loads(meta.get("loras", "{}"))
        if want <= set(trained.values()):
            found.append((len(trained), -f.stat().st_mtime_ns, f))
            continue
        changed = sorted(n for n, h in lora_hashes.items() if n in trained and trained[n] != h)
        if changed:
            notes.append(f"gates {f} not used: trained with a different file for {changed} (retrain with "
                         f"python -m training.train_gates)")
    return (min(found)[2] if found else None), notes


def _note_role_changes(path: Any, meta: dict[str, str], fusion: Fusion, lora_hashes: dict[str, str]) -> None:
    """Warn when a LoRA the gates were trained with now has another role (allowed: the role terms are shared by
    every LoRA of a role, but the gates learned this file under the other one)."""
    trained, roles = json.loads(meta.get("loras", "{}")), json.loads(meta.get("roles", "{}"))
    by_hash = {h: n for n, h in trained.items()}
    moved = {n: (roles[by_hash[h]], fusion.roles.get(n)) for n, h in lora_hashes.items()
             if h in by_hash and by_hash[h] in roles and roles[by_hash[h]] != fusion.roles.get(n)}
    if moved:
        log.warning("%s: LoRAs with another role than in gate training (trained, now): %s", path, moved)


def untrained_roles(meta: dict[str, str], fusion: Fusion, names: Iterable[str]) -> dict[str, str]:
    """{LoRA: role} for the LoRAs whose role no LoRA had in gate training: that role's offsets are still at their
    initial zero, so those LoRAs get only the gate's shared terms (empty for gates without role terms)."""
    if not json.loads(meta.get("options", "{}")).get("per_role"):
        return {}
    had = set(json.loads(meta.get("roles", "{}")).values())
    return {n: fusion.roles.get(n, "other") for n in names if fusion.roles.get(n, "other") not in had}


def gate_notes(meta: dict[str, str], fusion: Fusion, lora_hashes: dict[str, str]) -> list[str]:
    """What a user should know about gates applied with ``allow_unseen``: the LoRAs they never saw, and the roles
    no trained LoRA had. Measured on the demo world (docs/autolora.md, gates that never saw the test compositions):
    gates applied to unseen concept LoRAs kept shape and texture less often than the static sum."""
    seen = set(json.loads(meta.get("loras", "{}")).values())
    notes = []
    if unseen := sorted(n for n, h in lora_hashes.items() if h not in seen):
        notes.append(f"gates applied to LoRAs they were not trained with: {unseen} (on the demo world, gates applied "
                     "to unseen concept LoRAs did worse than the static sum: docs/autolora.md)")
    if untrained := untrained_roles(meta, fusion, lora_hashes):
        notes.append(f"the gates never trained the role of {untrained} (trained roles: "
                     f"{sorted(set(json.loads(meta.get('roles', '{}')).values()))}): those LoRAs get only the "
                     "gate's shared terms")
    return notes


def _with_zero_role_offsets(path: Any, meta: dict[str, str], tensors: dict[str, torch.Tensor],
                            expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A gates file without role terms (written before them, or with ``per_role=False``) into a per-role fusion:
    the missing offsets are zero, which is exactly the gate it was trained as."""
    if json.loads(meta.get("options", "{}")).get("per_role"):
        return tensors
    role_keys = [k for k in expected if k.rsplit(".", 1)[-1] in ROLE_PARAMS and k not in tensors]
    if role_keys:
        log.info("%s: gates without per-role terms (written before them); their role offsets are zero", path)
    return {**tensors, **{k: torch.zeros_like(expected[k]) for k in role_keys}}


def load_gates(fusion: Fusion, path: str | os.PathLike, lora_hashes: dict[str, str] | None = None,
               allow_unseen: bool = False) -> dict[str, str]:
    """Load gates into a gated fusion; refuses other LoRAs' gates (see ``check_gate_hashes``) and other models'
    layers (naming the missing and unexpected keys). Returns the file's metadata."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != GATES_FORMAT:
        raise AdapterFileError(f"{path}: not a gates file (metadata format={meta.get('format')!r}, expected {GATES_FORMAT!r})")
    if lora_hashes is not None:
        check_gate_hashes(path, meta, lora_hashes, allow_unseen)
        _note_role_changes(path, meta, fusion, lora_hashes)
        if untrained := untrained_roles(meta, fusion, lora_hashes):
            log.warning("%s: gates never trained the role of %s: those LoRAs get only the shared terms", path, untrained)
    expected = gate_state_dict(fusion)
    tensors = _with_zero_role_offsets(path, meta, tensors, expected)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if any(k.rsplit(".", 1)[-1] in ROLE_PARAMS for k in unexpected) and not missing:
        raise AdapterFileError(f"{path}: gates with per-role terms ({', '.join(ROLE_PARAMS)}); this fusion was "
                               f"built without them: fuse(..., method='gated', per_role=True)")
    if missing or unexpected:
        raise AdapterFileError(f"{path}: gates for other layers; missing {missing[:4]}, unexpected {unexpected[:4]}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise AdapterFileError(f"{path}: '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    with torch.no_grad():
        for k, c in fusion.combiners.items():
            for p, t in c.state_dict(keep_vars=True).items():
                t.copy_(tensors[f"{k}.{p}"])
    return meta
