"""A lever against the recipe: two ``benchmarks/personalization.py`` output folders of the same variants on the same
(concept, seed) runs, compared checkpoint by checkpoint, paired by (variant, regime, concept, seed, step).

    python benchmarks/personalization_paired.py /tmp/lever-s0 /tmp/lever-s1 --recipe /tmp/recipe   # lever - recipe

Prints, for each (regime, variant, step) both folders hold, each arm's mean and the paired difference (lever minus
recipe) with its 95% Student-t interval, in percentage points (``benchmarks/stats.py``). The benchmark's runs are
deterministic on a given machine (same seed, same code: the same images), so a recipe folder from an earlier
command pairs with a new lever's as long as the code in between left the recipe's training alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stats import fmt_ci  # noqa: E402

METRICS = ("fidelity", "alignment", "both", "color")
Key = tuple[str, str, str, int, int]  # (variant, regime, concept, seed, step)


def load_runs(folder: Path) -> dict[Key, dict[str, Any]]:
    """The per-checkpoint records of a benchmark folder (``results.json``, else a stopped command's
    ``partial.json``), keyed by (variant, regime, concept, seed, step); the base model's records left out."""
    for name in ("results.json", "partial.json"):
        if (folder / name).is_file():
            runs = json.loads((folder / name).read_text())["runs"]
            return {(r["variant"], r["regime"], r["concept"], r["seed"], r["step"]): r
                    for r in runs if r["variant"] != "base"}
    raise SystemExit(f"{folder}: no results.json or partial.json (a benchmarks/personalization.py --out folder)")


def paired_rows(lever: dict[Key, dict[str, Any]], recipe: dict[Key, dict[str, Any]],
                concepts: set[str] | None = None) -> list[dict[str, Any]]:
    """One row per (variant, regime, step) both hold: the pairs, each arm's values and the differences per metric."""
    groups: dict[tuple[str, str, int], list[Key]] = {}
    for k in sorted(set(lever) & set(recipe)):
        if concepts is None or k[2] in concepts:
            groups.setdefault((k[0], k[1], k[4]), []).append(k)
    rows = []
    for (variant, regime, step), keys in groups.items():
        row: dict[str, Any] = {"variant": variant, "regime": regime, "step": step, "pairs": len(keys)}
        for m in METRICS:
            a = [100 * lever[k].get(m, float("nan")) for k in keys]
            b = [100 * recipe[k].get(m, float("nan")) for k in keys]
            row[m] = (a, b, [x - y for x, y in zip(a, b)])
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a table: lever / recipe means and the paired difference ± 95% CI, per metric."""
    head = "| regime | variant | step | pairs | " + " | ".join(f"{m}: lever / recipe, diff" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (4 + len(METRICS))]
    for r in rows:
        cells = [f"{fmt_ci(r[m][0], '.1f').split(' ±')[0]} / {fmt_ci(r[m][1], '.1f').split(' ±')[0]}, "
                 f"{fmt_ci(r[m][2], '+.1f')}" for m in METRICS]
        lines.append(f"| {r['regime']} | {r['variant']} | {r['step']} | {r['pairs']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def merged(folders: list[Path]) -> dict[Key, dict[str, Any]]:
    """The records of several folders; where two hold the same checkpoint, the first listed wins."""
    out: dict[Key, dict[str, Any]] = {}
    for folder in reversed(folders):
        out.update(load_runs(folder))
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lever", type=Path, nargs="+", help="the lever's --out folder(s) (merged; the first wins)")
    p.add_argument("--recipe", type=Path, nargs="+", required=True, help="the recipe's --out folder(s) (merged)")
    p.add_argument("--concepts", default=None, help="comma-separated concepts to keep (default: all both hold)")
    a = p.parse_args(argv)
    lever, recipe = merged(a.lever), merged(a.recipe)
    rows = paired_rows(lever, recipe, set(a.concepts.split(",")) if a.concepts else None)
    if not rows:
        raise SystemExit(f"{a.lever} and {a.recipe}: no (variant, regime, concept, seed, step) in common")
    table = markdown(rows)
    sys.stdout.write(table)
    return table


if __name__ == "__main__":
    main()
