"""Differential privacy for adapter training: the Gaussian mechanism, clipping, Poisson sampling, accounting.

Two granularities share these pieces (DP-DyLoRA, Xu et al. 2024, arXiv 2405.06368):

- record level (DP-SGD, ``train_llm --dp_noise_multiplier``): per-example gradients g_i of the adapter parameters
  (``torch.func.vmap`` over ``grad``), clipped g_i · min(1, C/‖g_i‖), summed, plus N(0, σ²C²·I), divided by the
  expected batch size q·N; batches are Poisson samples (each record independently with probability q);
- user level (DP-FedAvg, ``training.federated_dylora``): each sampled client's update Δ_k clipped to C, summed,
  plus N(0, σ²C²·I), divided by the expected cohort q·N.

Either way one step/round is the sampled Gaussian mechanism with noise multiplier σ and sampling rate q; the
privacy loss over T of them is accounted by Opacus' RDP accountant (``opacus.accountants.RDPAccountant``), and
converted to (ε, δ). ``noise_for_target`` asks Opacus for the σ reaching a target ε.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError, opt

log = logging.getLogger(__name__)


@dataclass
class DPArgs:
    dp_noise_multiplier: float | None = opt(None, "σ of the Gaussian mechanism (noise std σ·C on the clipped sum); "
                                                  "None with --target_epsilon: computed; None without: no DP")
    dp_max_grad_norm: float = opt(1.0, "clipping bound C: per-example gradient norm (DP-SGD) or per-client "
                                       "update norm (federated); 'inf' for no clipping (only with σ = 0)",
                                  "--dp_clip_norm")
    dp_delta: float = opt(1e-5, "δ at which ε is reported")
    target_epsilon: float | None = opt(None, "compute σ so that ε(δ) after the whole run is this value")


def dp_enabled(dp: DPArgs) -> bool:
    return dp.dp_noise_multiplier is not None or dp.target_epsilon is not None


def check_dp(dp: DPArgs, sample_rate: float | None = None) -> None:
    """One clear error per bad value, naming the option and the valid range."""
    c, s = dp.dp_max_grad_norm, dp.dp_noise_multiplier
    if c is None or math.isnan(c) or not c > 0:
        raise ConfigError(f"--dp_max_grad_norm: expected a clipping bound C > 0 (or inf), found {c!r}")
    if s is not None and (math.isnan(s) or not 0 <= s < math.inf):
        raise ConfigError(f"--dp_noise_multiplier: expected a finite σ >= 0, found {s!r}")
    if s and math.isinf(c):
        raise ConfigError("--dp_max_grad_norm inf with --dp_noise_multiplier > 0: the noise std σ·C would be infinite; "
                          "give a finite clipping bound C > 0")
    if not 0 < dp.dp_delta < 1:
        raise ConfigError(f"--dp_delta: expected 0 < δ < 1, found {dp.dp_delta!r}")
    if dp.target_epsilon is not None:
        if not 0 < dp.target_epsilon < math.inf:
            raise ConfigError(f"--target_epsilon: expected a finite ε > 0, found {dp.target_epsilon!r}")
        if s is not None:
            raise ConfigError("--target_epsilon and --dp_noise_multiplier: give one of them (σ is computed from the "
                              "target)")
        if math.isinf(c):
            raise ConfigError("--target_epsilon needs a finite --dp_max_grad_norm (C > 0)")
    if sample_rate is not None:
        check_sample_rate(sample_rate)


def check_sample_rate(q: float, option: str = "--client_rate") -> None:
    if q is None or math.isnan(q) or not 0 < q <= 1:
        raise ConfigError(f"{option}: expected a sampling rate q in (0, 1], found {q!r}")


# --- accounting (Opacus' RDP accountant) ---
def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` after ``steps`` sampled Gaussian mechanisms (σ, q); inf for σ = 0 and steps > 0.

    What ``RDPAccountant`` with history [(σ, q, steps)] answers, with the one-step RDP curve cached: the RDP of T
    identical steps is T times that of one, so per-round reports cost one conversion each."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, _ = get_privacy_spent(orders=_ORDERS(), rdp=_one_step_rdp(float(noise_multiplier), float(sample_rate)) * steps,
                               delta=delta)
    return float(eps)


def _ORDERS() -> list[float]:  # noqa: N802 (a constant, read lazily)
    from opacus.accountants import RDPAccountant

    return RDPAccountant.DEFAULT_ALPHAS


@functools.lru_cache(maxsize=64)
def _one_step_rdp(sigma: float, q: float) -> Any:
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_ORDERS())


def smallest_epsilon(sample_rate: float, steps: int, delta: float) -> float:
    """The smallest ε the accountant certifies here, at the largest σ Opacus searches (its MAX_SIGMA)."""
    from opacus.accountants.utils import MAX_SIGMA

    with warnings.catch_warnings():  # at MAX_SIGMA the best RDP order is the largest one: that is the point
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return epsilon(MAX_SIGMA, sample_rate, steps, delta)


def noise_for_target(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                     what: str = "steps") -> float:
    """σ such that ε(δ) after ``steps`` is at most ``target_epsilon`` (Opacus' search); a clear ConfigError when
    no σ reaches it."""
    from opacus.accountants.utils import get_noise_multiplier

    floor = smallest_epsilon(sample_rate, steps, delta)
    if target_epsilon <= floor:  # checked first: Opacus would search up to its MAX_SIGMA before giving up
        raise ConfigError(f"--target_epsilon {target_epsilon:g}: unreachable in {steps} {what} at sampling rate "
                          f"q={sample_rate:g} and δ={delta:g}; expected --target_epsilon > {floor:.3g} (the smallest "
                          f"ε the RDP accountant certifies there)")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp", epsilon_tolerance=0.005 * target_epsilon))


def resolve_noise(dp: DPArgs, sample_rate: float, steps: int, what: str = "steps") -> float:
    """σ: the given one, or the one reaching --target_epsilon (logged)."""
    if dp.target_epsilon is None:
        return float(dp.dp_noise_multiplier or 0.0)
    sigma = noise_for_target(dp.target_epsilon, sample_rate, steps, dp.dp_delta, what)
    log.info("--target_epsilon %g at δ=%g over %d %s (q=%g): noise multiplier σ=%.4f", dp.target_epsilon, dp.dp_delta,
             steps, what, sample_rate, sigma)
    return sigma


# --- the Gaussian mechanism ---
def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors))


def clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, C/‖x‖) (1 for C = inf; a zero norm stays 0)."""
    if math.isinf(max_norm):
        return torch.ones_like(norm)
    return torch.clamp(max_norm / (norm + 1e-12), max=1.0)


def clip_update(update: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """Δ · min(1, C/‖Δ‖₂), the norm over all tensors together."""
    f = clip_factor(global_norm(update.values()), max_norm)
    return {k: v * f.to(v.dtype) for k, v in update.items()}


def gaussian_noise(like: dict[str, torch.Tensor], std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """N(0, std²·I) shaped like ``like`` (drawn on the CPU from ``gen``, in float64, so runs are reproducible)."""
    return {k: (torch.randn(v.shape, generator=gen, dtype=torch.float64) * std).to(v.device, v.dtype)
            for k, v in like.items()}


def seeded(seed: int, *keys: int) -> torch.Generator:
    """A generator determined by (seed, keys): a resumed run draws exactly what the original would have."""
    h = seed
    for k in keys:
        h = (h * 1_000_003 + k) % (2**63)
    return torch.Generator().manual_seed(h)


def poisson_sample(n: int, rate: float, gen: torch.Generator) -> list[int]:
    """Indices of 0..n-1, each kept independently with probability ``rate`` (the sampling the accountant assumes)."""
    return torch.nonzero(torch.rand(n, generator=gen) < rate).flatten().tolist()


# --- per-example gradients (DP-SGD) ---
def example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one sequence over its own targets: logits (L, V), labels (L,)."""
    lab = labels[1:]
    w = (lab != -100).to(logits.dtype)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), lab.clamp(min=0), reduction="none")
    return (nll * w).sum() / w.sum().clamp(min=1)


def per_example_grads(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: (B, *shape)} gradients of each example's own mean loss, (B,) losses), one vmap over the batch.

    Sequences are right-padded, so a causal model reads the same tokens without the attention mask; the mask is
    left out because the models' mask construction branches on data (which vmap cannot trace)."""
    from torch.func import functional_call

    def one(p: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (), {"input_ids": ids[None]}).logits[0]  # (L, V)
        return example_loss(logits, labels)

    detached = {k: v.detach() for k, v in params.items()}
    with warnings.catch_warnings():  # SDPA has no batching rule: vmap loops over it (slower, same numbers)
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return _vmapped(model, detached, batch, one)


def _vmapped(model: torch.nn.Module, detached: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
             one: Callable[..., torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from torch.func import functional_call, grad_and_value, vmap

    with torch.enable_grad():  # fills per-step context caches (DyLoRA's b) outside vmap, which cannot trace their draws
        functional_call(model, detached, (), {"input_ids": batch["input_ids"][:1, :1]})
    grads, losses = vmap(grad_and_value(one), in_dims=(None, 0, 0), randomness="different")(
        detached, batch["input_ids"], batch["labels"])
    return grads, losses


def privatize(grads: dict[str, torch.Tensor], max_norm: float, sigma: float, denominator: float,
              gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(Σ_i clip(g_i) + N(0, σ²C²·I)) / denominator from per-example grads {name: (B, *shape)}; also the (B,) norms."""
    b = next(iter(grads.values())).shape[0]
    norms = torch.sqrt(sum((g.detach().double().reshape(b, -1) ** 2).sum(1) for g in grads.values()))  # (B,)
    f = clip_factor(norms, max_norm)
    summed = {k: torch.einsum("b,b...->...", f.to(g.dtype), g) for k, g in grads.items()}
    noise = gaussian_noise(summed, sigma * max_norm, gen) if sigma > 0 else None
    out = {k: (v + noise[k] if noise is not None else v) / denominator for k, v in summed.items()}
    return out, norms


@dataclass
class DPSGD:
    """The record-level mechanism of one trainer: per-example gradients of the trainable parameters of ``model``,
    clipping to C, noise σ·C, division by the expected batch size q·N (the batches are Poisson samples of rate q)."""

    model: torch.nn.Module
    sigma: float
    max_norm: float
    sample_rate: float
    n_examples: int
    seed: int

    def loss(self, draw: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A scalar whose value is the batch's mean loss and whose gradient is the privatized gradient: backward
        writes the DP gradient into ``.grad`` with no second pass through the model. ``draw`` keys the noise."""
        params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        gen = seeded(self.seed, 7, draw)
        denom = self.sample_rate * self.n_examples
        if batch["input_ids"].shape[0] == 0:  # an empty Poisson sample: the update is the noise alone
            zero = {k: p.detach().unsqueeze(0) * 0 for k, p in params.items()}
            noisy, _ = privatize(zero, self.max_norm, self.sigma, denom, gen)
            value = torch.zeros((), device=next(iter(params.values())).device)
        else:
            grads, losses = per_example_grads(self.model, params, batch)
            noisy, _ = privatize(grads, self.max_norm, self.sigma, denom, gen)
            value = losses.mean().detach()
        surrogate = sum(((p - p.detach()) * noisy[k].to(p.dtype)).sum() for k, p in params.items())
        return value + surrogate


class PoissonBatches:
    """Batches of a DP-SGD run: at draw k each record is in independently with probability q (from (seed, k)), so
    the state is the draw count and a resumed run draws the same batches."""

    def __init__(self, examples: list[Any], sample_rate: float, pad_id: int, seed: int,
                 collate: Callable[[list[Any], int], dict[str, torch.Tensor]]) -> None:
        self.examples, self.rate, self.pad_id, self.seed, self._collate = examples, sample_rate, pad_id, seed, collate
        self.draws = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = poisson_sample(len(self.examples), self.rate, seeded(self.seed, 11, self.draws))
        self.draws += 1
        if not idx:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty, "labels": empty}
        return self._collate([self.examples[i] for i in idx], self.pad_id)

    def __len__(self) -> int:
        return max(1, round(1 / self.rate))

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
