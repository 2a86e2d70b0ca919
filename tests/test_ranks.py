"""Sensitivity-LoRA: rank allocation invariants and the diagonal estimators (variants.md §17 "Tests")."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.ranks import (
    SensitivityConfig,
    allocate_ranks,
    apply_rank_spec,
    combine_scores,
    effective_rank,
    empirical_fisher,
    hutchinson_diagonal,
    load_rank_spec,
    module_metrics,
    rank_spec,
    save_rank_spec,
    sensitivity_ranks,
)
from lora_diffusion.ranks.sensitivity import hvp_diagonal


# --- allocation ---
@pytest.mark.parametrize("seed", range(25))
def test_budget_sums_exactly_and_is_monotone(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    raw = torch.rand(n, generator=g, dtype=torch.float64) ** 3  # skewed, with near-ties
    scores = {f"m{i}": float(s) for i, s in enumerate(raw)}
    lo = int(torch.randint(0, 3, (1,), generator=g))
    budget = int(torch.randint(n * lo, n * 20 + 1, (1,), generator=g))
    ranks = allocate_ranks(scores, budget, min_rank=lo, max_rank=64)
    assert sum(ranks.values()) == budget
    assert all(lo <= r <= 64 for r in ranks.values())
    for a, b in itertools.combinations(scores, 2):
        if scores[a] > scores[b]:
            assert ranks[a] >= ranks[b], (a, b)


def test_proportional_without_clipping_is_hamilton_rounding():
    # quotas 10·(0.5, 0.3, 0.2) = 5, 3, 2; 7·(...) = 3.5, 2.1, 1.4 -> floors 3, 2, 1, the remainder goes to 0.5
    assert allocate_ranks({"a": 5, "b": 3, "c": 2}, 10, min_rank=0) == {"a": 5, "b": 3, "c": 2}
    assert allocate_ranks({"a": 5, "b": 3, "c": 2}, 7, min_rank=0) == {"a": 4, "b": 2, "c": 1}


@pytest.mark.parametrize("n,budget", [(4, 8), (4, 10), (7, 7), (5, 23)])
def test_uniform_scores_give_uniform_ranks(n, budget):
    ranks = allocate_ranks({f"m{i}": 0.3 for i in range(n)}, budget)
    assert sum(ranks.values()) == budget and max(ranks.values()) - min(ranks.values()) <= 1
    if budget % n == 0:
        assert set(ranks.values()) == {budget // n}


def test_min_and_max_rank_are_honoured_and_the_rest_is_redistributed():
    ranks = allocate_ranks({"big": 100.0, "mid": 1.0, "zero": 0.0}, 20, min_rank=2, max_rank={"big": 8, "mid": 64,
                                                                                             "zero": 64})
    assert ranks == {"big": 8, "mid": 10, "zero": 2}


def test_budget_smaller_than_modules_names_option_and_range():
    with pytest.raises(ld.AdapterError, match=r"--rank_budget 3: expected an integer in \[4, 256\] for 4 modules"):
        allocate_ranks({f"m{i}": 1.0 for i in range(4)}, 3, max_rank=64, budget_name="--rank_budget")
    with pytest.raises(ld.AdapterError, match=r"--rank_budget 300: expected an integer in \[4, 256\]"):
        allocate_ranks({f"m{i}": 1.0 for i in range(4)}, 300, max_rank=64, budget_name="--rank_budget")
    with pytest.raises(ld.AdapterError, match="finite and >= 0"):
        allocate_ranks({"a": -1.0}, 3)


# --- estimators ---
def _quadratic(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = m @ m.T + torch.diag(torch.rand(n, generator=g, dtype=torch.float64))  # symmetric, non-diagonal
    w = nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
    return h, w, lambda _batch: 0.5 * w @ h @ w


def test_hutchinson_is_exactly_unbiased_over_all_sign_vectors():
    """E[v ⊙ Hv] over the uniform Rademacher distribution: the mean over all 2^n sign vectors is diag(H) exactly."""
    h, w, loss = _quadratic(5)
    signs = [[torch.tensor(s, dtype=torch.float64)] for s in itertools.product([-1.0, 1.0], repeat=5)]
    est = hvp_diagonal(loss(None), [w], signs)[0] / len(signs)
    assert torch.allclose(est.double(), torch.diagonal(h), atol=1e-6)


def test_hutchinson_random_probes_converge_to_diagonal():
    h, w, loss = _quadratic(6, seed=1)
    est = hutchinson_diagonal({"w": w}, [None] * 4, loss, probes=1000, seed=3)["w"].double()
    var = (h**2).sum(1) - torch.diagonal(h) ** 2  # per-entry variance of one probe: Σ_{j≠i} H_ij²
    assert torch.all((est - torch.diagonal(h)).abs() <= 5 * (var / 4000).sqrt() + 1e-6)
    one = hutchinson_diagonal({"w": w}, [None], loss, probes=1, seed=3)["w"].double()
    assert not torch.allclose(one, torch.diagonal(h), atol=1e-3)  # a single probe is noisy: the test can fail


def test_fisher_is_mean_of_squared_per_example_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    xs = [torch.randn(1, 4, dtype=torch.float64) for _ in range(5)]
    ys = [torch.randn(1, 3, dtype=torch.float64) for _ in range(5)]

    def loss(i):
        return ((lin(xs[i]) - ys[i]) ** 2).sum()

    lin.weight.requires_grad_(True)
    fisher = empirical_fisher({"w": lin.weight}, range(5), loss)["w"]
    manual = torch.stack([torch.autograd.grad(loss(i), lin.weight)[0] ** 2 for i in range(5)]).mean(0)
    assert torch.allclose(fisher.double(), manual, atol=1e-6)


def test_effective_rank_and_scores():
    assert effective_rank(torch.ones(8)) == pytest.approx(8.0)
    assert effective_rank(torch.tensor([1.0, 0, 0, 0])) == pytest.approx(1.0)
    m = module_metrics({"a": torch.ones(4, 3), "b": torch.tensor([[3.0, 0], [0, 0]])})
    assert m["a"] == {"global": 12.0, "local": pytest.approx(4.0)} and m["b"] == {"global": 3.0, "local": 1.0}
    s = combine_scores(m, local_weight=0.5)
    assert s["a"] == pytest.approx(0.5 * 12 / 15 + 0.5 * 4 / 5) and sum(s.values()) == pytest.approx(1.0)


# --- on a model, and the spec file ---
class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(self.conv(x).mean((2, 3)))))


@pytest.mark.parametrize("method", ["fisher", "hutchinson"])
def test_sensitivity_ranks_on_a_model_restore_grad_flags(method):
    torch.manual_seed(0)
    net = _Two().double().requires_grad_(False)
    batches = [(torch.randn(2, 2, 5, 5, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)) for _ in range(3)]

    def loss(b):
        return ((net(b[0]) - b[1]) ** 2).mean()

    ranks, scores, metrics = sensitivity_ranks(net, ["lin", "conv", "out"], batches, loss, 9,
                                               SensitivityConfig(method=method))
    assert sum(ranks.values()) == 9 and min(ranks.values()) >= 1 and ranks["out"] <= 2  # min(out, in) = 2
    assert set(metrics) == {"lin", "conv", "out"} and all(s > 0 for s in scores.values())
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ld.AdapterError, match="rank budget 2: expected an integer in \\[3, 18\\]"):
        sensitivity_ranks(net, ["lin", "conv", "out"], batches, loss, 2)


def test_rank_spec_file_roundtrip_and_applies_to_an_adapter(tmp_path):
    rs = rank_spec({"lin": 3, "conv": 1}, alpha_over_rank=2.0, method={"name": "fisher"}, model="tiny")
    path = save_rank_spec(rs, tmp_path / "ranks.json")
    back = load_rank_spec(path)
    assert back == rs and back.alpha_pattern == {"lin": 6.0, "conv": 2.0} and back.rank_budget == 4
    from .conftest import TinyNet

    net = TinyNet()
    spec = apply_rank_spec(ld.AdapterSpec(rank=8, alpha=16), back)
    ld.add_adapter(net, spec)
    assert net.lin.adapters["default"].lora_A.shape[0] == 3 and net.conv.adapters["default"].lora_A.shape[0] == 1
    assert net.lin.adapters["default"].scaling == net.conv.adapters["default"].scaling == 2.0
    out = ld.save_adapter(net, tmp_path / "a.safetensors")
    fresh = TinyNet()
    ld.load_adapter(fresh, out)
    assert ld.get_spec(fresh, "a").rank_pattern == {"lin": 3, "conv": 1}


@pytest.mark.parametrize("content,match", [("{}", "format"), ("[1]", "format"), ("nope", "not valid JSON"),
                                           ('{"format": "lora-diffusion-rank-spec", "targets": ["a"], '
                                            '"rank_pattern": {"a": 0}}', r"rank_pattern\['a'\]: expected an integer"),
                                           ('{"format": "lora-diffusion-rank-spec", "targets": ["a", "b"], '
                                            '"rank_pattern": {"a": 2}}', r"no rank for target\(s\) \['b'\]"),
                                           ('{"format": "lora-diffusion-rank-spec", "targets": [], "rank_pattern": {},'
                                            ' "ranks": 1}', r"unknown key\(s\) \['ranks'\]")])
def test_bad_rank_spec_files(tmp_path, content, match):
    p = tmp_path / "r.json"
    p.write_text(content)
    with pytest.raises(ld.AdapterError, match=match):
        load_rank_spec(p)
    with pytest.raises(ld.AdapterError, match="no such file"):
        load_rank_spec(tmp_path / "missing.json")


@pytest.mark.parametrize("seed", range(4))
def test_allocate_params_is_the_closest_parameter_count_over_all_budgets(seed):
    from lora_diffusion.ranks import allocate_params, allocate_ranks

    g = torch.Generator().manual_seed(seed)
    names = [f"m{i}" for i in range(7)]
    scores = {n: float(s) for n, s in zip(names, torch.rand(7, generator=g))}
    sizes = {n: int(s) for n, s in zip(names, torch.randint(10, 200, (7,), generator=g))}
    caps = {n: int(c) for n, c in zip(names, torch.randint(4, 32, (7,), generator=g))}
    target = 6 * sum(sizes.values())  # a uniform rank-6 LoRA on these modules
    ranks = allocate_params(scores, sizes, target, 1, caps)
    got = sum(r * sizes[n] for n, r in ranks.items())
    every = [sum(r * sizes[n] for n, r in allocate_ranks(scores, b, 1, caps).items())
             for b in range(7, sum(caps.values()) + 1)]
    assert abs(got - target) == min(abs(c - target) for c in every)
    assert ranks == allocate_ranks(scores, sum(ranks.values()), 1, caps)  # an allocation of its own budget


def test_allocate_params_on_one_shape_is_the_equal_rank_budget():
    from lora_diffusion.ranks import allocate_params, allocate_ranks

    scores = {f"m{i}": float(i + 1) for i in range(10)}
    ranks = allocate_params(scores, dict.fromkeys(scores, 96), 8 * 10 * 96, 1, 48)
    assert sum(ranks.values()) == 80 and ranks == allocate_ranks(scores, 80, 1, 48)
