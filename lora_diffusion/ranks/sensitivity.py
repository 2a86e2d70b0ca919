"""Sensitivity-LoRA (Zhang et al. 2025, arXiv 2509.09119): per-module ranks fixed before training from the loss's
sensitivity to each target module's weight W_k.

Second-order Taylor: ΔL ≈ gᵀδw + ½ δwᵀHδw, so a module matters in proportion to its Hessian block. A calibration
pass over a few batches estimates the diagonal D_k ≈ diag(H_k) (shape of W_k, (out, in·kh·kw)):

    empirical Fisher   D = mean_b g_b ⊙ g_b                          g_b = ∂L_b/∂W (one calibration batch b)
    Hutchinson         D = mean_{b, v} v ⊙ (H_b v),  v ∈ {±1}^n      (Rademacher probes; E[v vᵀ] = I, so unbiased)

Two metrics per module, combined (variants.md §17's recipe; the paper's exact formulas are unverified [U]):

    global_k = Σ_ij max(D_k,ij, 0)                                   (trace of the diagonal: overall curvature)
    local_k  = exp(−Σ_i p_i log p_i),  p_i = row_i / Σ rows          (effective rank of the per-output-row
               row_i = Σ_j max(D_k,ij, 0)                            sensitivity: how spread, 1..out)
    score_k  = (1 − γ)·global_k/Σ global + γ·local_k/Σ local         (γ = ``local_weight``, default 0.5)

and ``lora_diffusion.ranks.allocate_ranks`` turns a total budget R into ranks r_k ∝ score_k with Σ r_k = R exactly.
The result is a plain LoRA with ``rank_pattern`` (and ``alpha_pattern`` keeping α/r constant), written as a JSON
rank-spec file that the trainers read (``--rank_spec``). Hutchinson diagonals can be negative where the Hessian
is not positive semi-definite; the metrics use the positive part (curvature that raises the loss).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import AdapterError
from ..core.layerinfo import layer_info
from .allocate import allocate_ranks

LossFn = Callable[[Any], torch.Tensor]
FORMAT = "lora-diffusion-rank-spec"
METHODS = ("fisher", "hutchinson")


@dataclass
class SensitivityConfig:
    method: str = "fisher"  # "fisher" (squared gradients) | "hutchinson" (Rademacher probes, Hessian-vector products)
    probes: int = 4  # Hutchinson probes per calibration batch
    local_weight: float = 0.5  # γ: weight of the local (effective-rank) metric against the global (trace) one
    min_rank: int = 1
    max_rank: int | None = None  # None: min(out, in) of each module
    seed: int = 0  # the Rademacher probes

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AdapterError(f"method: expected one of {list(METHODS)}, found {self.method!r}")
        if self.probes < 1 or not 0.0 <= self.local_weight <= 1.0:
            raise AdapterError(f"probes >= 1 and 0 <= local_weight <= 1 expected; found {self.probes}, "
                               f"{self.local_weight}")


# --- diagonal estimators ---
def _grad_params(params: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    ps = list(params.values())
    if not all(p.requires_grad for p in ps):
        raise AdapterError("calibration weights must require gradients (use target_weights(...))")
    return ps


def empirical_fisher(params: Mapping[str, torch.Tensor], batches: Iterable[Any], loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """mean over batches of (∂L_b/∂W)² per weight entry (fp32 accumulators)."""
    ps, acc, n = _grad_params(params), {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}, 0
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(batch), ps, allow_unused=True)
        for (k, _), g in zip(params.items(), grads):
            if g is not None:
                acc[k] += g.float() ** 2
        n += 1
    return {k: v / max(n, 1) for k, v in acc.items()}


def rademacher_like(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    v = torch.randint(0, 2, p.shape, generator=gen, device="cpu").to(p.device, p.dtype)
    return v.mul_(2).sub_(1)


def hvp_diagonal(loss: torch.Tensor, ps: list[torch.Tensor], vectors: Iterable[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Σ over probe vectors v of v ⊙ (H v), H the Hessian of ``loss`` w.r.t. ``ps`` (double backward)."""
    grads = torch.autograd.grad(loss, ps, create_graph=True)
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
    for v in vectors:
        dot = sum((g * vi).sum() for g, vi in zip(grads, v))
        hv = torch.autograd.grad(dot, ps, retain_graph=True, allow_unused=True)
        for a, vi, h in zip(acc, v, hv):
            if h is not None:
                a += (vi * h).float()
    return acc


def hutchinson_diagonal(params: Mapping[str, torch.Tensor], batches: Iterable[Any], loss_fn: LossFn, probes: int = 4,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """mean over batches and ``probes`` Rademacher vectors of v ⊙ (H_b v): an unbiased estimate of diag(H)."""
    ps, gen = _grad_params(params), torch.Generator().manual_seed(seed)
    acc, n = [torch.zeros_like(p, dtype=torch.float32) for p in ps], 0
    for batch in batches:
        vectors = ([rademacher_like(p, gen) for p in ps] for _ in range(probes))
        with _math_attention():  # fused attention kernels have no double backward
            for a, d in zip(acc, hvp_diagonal(loss_fn(batch), ps, vectors)):
                a += d
        n += probes
    return {k: a / max(n, 1) for k, a in zip(params, acc)}


def _math_attention() -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# --- metrics and scores ---
def effective_rank(row_sensitivity: torch.Tensor) -> float:
    """exp(entropy) of the normalised non-negative row sensitivities: 1 (one row) .. number of rows (flat)."""
    s = row_sensitivity.double().clamp_min(0)
    total = float(s.sum())
    if total <= 0:
        return 1.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def module_metrics(diagonals: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{module: {"global": Σ D⁺, "local": effective rank of the row sums of D⁺}}; D is (out, in, *k)."""
    out = {}
    for k, d in diagonals.items():
        pos = d.double().clamp_min(0).flatten(1)  # (out, in·k)
        out[k] = {"global": float(pos.sum()), "local": effective_rank(pos.sum(dim=1))}
    return out


def combine_scores(metrics: Mapping[str, Mapping[str, float]], local_weight: float = 0.5) -> dict[str, float]:
    """score_k = (1 − γ)·global_k/Σ global + γ·local_k/Σ local (each share sums to 1 over the modules)."""
    g_sum = sum(m["global"] for m in metrics.values())
    l_sum = sum(m["local"] for m in metrics.values())
    return {k: (1 - local_weight) * (m["global"] / g_sum if g_sum > 0 else 1 / len(metrics))
            + local_weight * (m["local"] / l_sum if l_sum > 0 else 1 / len(metrics)) for k, m in metrics.items()}


# --- the calibration pass on a model ---
class target_weights:  # noqa: N801 (a context manager used like a function)
    """``with target_weights(model, names) as params:`` the (out, in, *k)-oriented base weights of ``names``
    with gradients enabled (and nothing else), restored afterwards."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise AdapterError(f"modules {missing[:5]} not found in {type(model).__name__}")
        self.mods = {n: getattr(mods[n], "base_layer", mods[n]) for n in names}
        self.infos = {n: layer_info(m, n) for n, m in self.mods.items()}

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.saved = {n: m.weight.requires_grad for n, m in self.mods.items()}
        for m in self.mods.values():
            m.weight.requires_grad_(True)
        return {n: m.weight for n, m in self.mods.items()}

    def __exit__(self, *exc: Any) -> None:
        for n, m in self.mods.items():
            m.weight.requires_grad_(self.saved[n])
            m.weight.grad = None

    def oriented(self, diag: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GPT-2 Conv1D stores (in, out): give every diagonal the (out, in, *k) layout."""
        return {n: d.T if self.infos[n].transposed else d for n, d in diag.items()}

    def max_ranks(self) -> dict[str, int]:
        return {n: min(i.out_features, i.fan_in) for n, i in self.infos.items()}


def sensitivity_ranks(model: nn.Module, names: list[str], batches: list[Any], loss_fn: LossFn, budget: int,
                      cfg: SensitivityConfig | None = None,
                      budget_name: str = "rank budget") -> tuple[dict[str, int], dict[str, float], dict[str, dict]]:
    """(ranks, scores, metrics) for modules ``names`` from ``batches`` (``loss_fn(batch)`` -> scalar loss)."""
    cfg = cfg or SensitivityConfig()
    tw = target_weights(model, names)
    caps = tw.max_ranks() if cfg.max_rank is None else {n: min(cfg.max_rank, r) for n, r in tw.max_ranks().items()}
    if not len(names) * cfg.min_rank <= budget <= sum(caps.values()):  # before any work
        allocate_ranks(dict.fromkeys(names, 1.0), budget, cfg.min_rank, caps, budget_name)
    with tw as params:
        if cfg.method == "fisher":
            diag = empirical_fisher(params, batches, loss_fn)
        else:
            diag = hutchinson_diagonal(params, batches, loss_fn, cfg.probes, cfg.seed)
    metrics = module_metrics(tw.oriented(diag))
    scores = combine_scores(metrics, cfg.local_weight)
    return allocate_ranks(scores, budget, cfg.min_rank, caps, budget_name), scores, metrics


# --- the rank-spec file ---
@dataclass
class RankSpecFile:
    """What the trainers read with ``--rank_spec``: PEFT-style ``rank_pattern``/``alpha_pattern`` keyed by full
    module names (a full name is also a valid PEFT pattern), the targets, and how they were chosen."""

    targets: list[str]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rank_budget: int = 0
    method: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    model: str = ""
    created: str = ""
    format: str = FORMAT
    version: int = 1

    def check(self, source: str) -> None:
        missing = [t for t in self.targets if t not in self.rank_pattern]
        if missing:
            raise AdapterError(f"{source}: rank_pattern has no rank for target(s) {missing[:5]}")
        for k, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise AdapterError(f"{source}: rank_pattern['{k}']: expected an integer >= 1, found {r!r}")
        for k, a in self.alpha_pattern.items():
            if not isinstance(a, (int, float)) or not math.isfinite(a):
                raise AdapterError(f"{source}: alpha_pattern['{k}']: expected a finite number, found {a!r}")


def rank_spec(ranks: Mapping[str, int], alpha_over_rank: float | None = None, **info: Any) -> RankSpecFile:
    """A rank-spec from per-module ranks; ``alpha_over_rank`` = α/r kept for every module (None: α = r, scale 1)."""
    alphas = {} if alpha_over_rank is None else {k: float(r * alpha_over_rank) for k, r in ranks.items()}
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return RankSpecFile(targets=list(ranks), rank_pattern=dict(ranks), alpha_pattern=alphas,
                        rank_budget=int(sum(ranks.values())), created=created, **info)


def save_rank_spec(spec: RankSpecFile, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(spec), f, indent=1)
    os.replace(tmp, path)
    return path


def load_rank_spec(path: str | os.PathLike) -> RankSpecFile:
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"rank spec {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"rank spec {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AdapterError(f"rank spec {path}: expected a JSON object with \"format\": \"{FORMAT}\" (written by "
                           "python -m training.rank_sensitivity)")
    known = {f.name for f in fields(RankSpecFile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AdapterError(f"rank spec {path}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    for key in ("targets", "rank_pattern"):
        if key not in data:
            raise AdapterError(f"rank spec {path}: missing key '{key}'")
    spec = RankSpecFile(**data)
    spec.check(f"rank spec {path}")
    return spec


def apply_rank_spec(spec: Any, rs: RankSpecFile) -> Any:
    """``spec`` (an AdapterSpec) with the file's targets, ranks and alphas; its nominal rank becomes the largest
    allocated rank (what a variant's rank-dependent options are checked against)."""
    import dataclasses

    return dataclasses.replace(spec, targets=list(rs.targets), rank=max(rs.rank_pattern.values()),
                               rank_pattern=dict(rs.rank_pattern), alpha_pattern=dict(rs.alpha_pattern))
