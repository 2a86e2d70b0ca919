"""A total rank budget turned into per-module ranks, proportional to scores, summing exactly to the budget.

    q_k = clip(c · s_k, r_min, r_max,k),   c chosen so that Σ_k q_k = R        (water filling; bisection on c)
    r_k = ⌊q_k⌋ + 1 for the R − Σ⌊q⌋ largest remainders q_k − ⌊q_k⌋ (ties: higher score, then module order)

Without clipping this is r_k = R·s_k/Σs rounded by the largest-remainder (Hamilton) method, the rule
variants.md §17 asks for. Properties (tests/test_ranks.py): Σ r_k = R exactly; monotone (s_a > s_b never gives
r_a < r_b, when both have the same r_max); equal scores give ranks that differ by at most 1 (equal when R is a
multiple of the number of modules); r_min <= r_k <= r_max,k.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..core.errors import AdapterError


def _check(scores: Mapping[str, float], budget: int, lo: int, hi: dict[str, int], name: str) -> None:
    if not scores:
        raise AdapterError(f"{name}: no modules to allocate ranks to")
    bad = {k: v for k, v in scores.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise AdapterError(f"sensitivity scores must be finite and >= 0; found {dict(list(bad.items())[:3])}")
    if isinstance(lo, bool) or not isinstance(lo, int) or lo < 0:
        raise AdapterError(f"min_rank: expected an integer >= 0, found {lo!r}")
    small = {k: v for k, v in hi.items() if v < lo}
    if small:
        raise AdapterError(f"max_rank below min_rank ({lo}) for {dict(list(small.items())[:3])}")
    n, top = len(scores), sum(hi.values())
    if isinstance(budget, bool) or not isinstance(budget, int) or not n * lo <= budget <= top:
        raise AdapterError(
            f"{name} {budget!r}: expected an integer in [{n * lo}, {top}] for {n} modules (at least min_rank={lo} "
            f"each, at most each module's max rank, min(out, in) unless set)")


def _fill(scores: Mapping[str, float], budget: int, lo: int, hi: dict[str, int]) -> dict[str, float]:
    """Continuous q_k = clip(c·s_k, lo, hi_k) with Σ q_k = budget (bisection on c; zero scores sit at lo)."""
    def total(c: float) -> float:
        return sum(min(max(c * s, lo), hi[k]) for k, s in scores.items())

    if all(s == 0 for s in scores.values()):  # no information: equal shares
        scores = dict.fromkeys(scores, 1.0)
    a, b = 0.0, 1.0
    while total(b) < budget and b < 1e300:
        b *= 2.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if total(mid) < budget else (a, mid)
    return {k: min(max(b * s, lo), hi[k]) for k, s in scores.items()}


def allocate_ranks(scores: Mapping[str, float], budget: int, min_rank: int = 1,
                   max_rank: int | Mapping[str, int] | None = None, budget_name: str = "rank budget") -> dict[str, int]:
    """Per-module ranks summing exactly to ``budget``, proportional to ``scores`` (see the module docstring).

    ``max_rank``: one cap for all, a cap per module (e.g. min(out, in)), or None (no cap but the budget).
    ``budget_name`` is how errors name the budget (the CLI passes ``--rank_budget``).
    """
    hi = {k: (budget if max_rank is None else max_rank if isinstance(max_rank, int) else int(max_rank[k]))
          for k in scores}
    _check(scores, budget, min_rank, hi, budget_name)
    q = _fill(scores, budget, min_rank, hi)
    ranks = {k: min(int(math.floor(v + 1e-9)), hi[k]) for k, v in q.items()}
    left = budget - sum(ranks.values())
    order = sorted((k for k in scores if ranks[k] < hi[k]), key=lambda k: (-(q[k] - ranks[k]), -scores[k]))
    for k in order[:left]:
        ranks[k] += 1
    assert sum(ranks.values()) == budget, "largest remainder must fill the budget exactly"
    return ranks


def allocate_params(scores: Mapping[str, float], sizes: Mapping[str, int], target: int, min_rank: int = 1,
                    max_rank: int | Mapping[str, int] | None = None) -> dict[str, int]:
    """``allocate_ranks`` at the rank budget whose parameter count Σ_k r_k·sizes_k (sizes: fan_in + out, a LoRA's
    parameters per unit rank) is closest to ``target`` (ties: the smaller budget). For comparisons at equal size
    when the modules differ in shape, where an equal Σ rank is not an equal parameter count; on modules of one
    shape it is the budget target / size.

    The count grows with the budget (almost always by one module's size per step), so the budget is bisected to the
    first whose count reaches ``target`` and that budget's neighbours (±2) are compared."""
    caps = {k: (10**9 if max_rank is None else max_rank if isinstance(max_rank, int) else int(max_rank[k]))
            for k in scores}
    lo, hi = len(scores) * min_rank, sum(min(c, 10**6) for c in caps.values())

    def count(budget: int) -> tuple[int, dict[str, int]]:
        ranks = allocate_ranks(scores, budget, min_rank, caps)
        return sum(r * sizes[k] for k, r in ranks.items()), ranks

    a, b = lo, hi
    while a < b:  # first budget with count >= target
        mid = (a + b) // 2
        a, b = (mid + 1, b) if count(mid)[0] < target else (a, mid)
    near = [count(x) for x in range(max(lo, a - 2), min(hi, a + 2) + 1)]
    return min(near, key=lambda c: abs(c[0] - target))[1]
