"""benchmarks/composition.py's statistics and its --pool across library builds, on hand-written results.json files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import composition as comp


def _row(method: str, both: list[int], all_: list[int] | None = None, per_image_all: bool = True) -> dict:
    all_ = both if all_ is None else all_
    r = {"method": method, "both": float(np.mean(both)), "both_n": len(both), "all": float(np.mean(all_)),
         "all_n": len(all_), "per_image_both": both}
    if per_image_all:  # runs before per-image 'all' was stored have only the rate and n
        r["per_image_all"] = all_
    return r


def _run(folder, rows: list[dict]):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"rows": rows, "tuned": {}, "config": {}}))
    return folder


@pytest.mark.parametrize("k,n", [(0, 96), (96, 96), (85, 96), (1, 3)])
def test_wilson_interval_by_its_closed_form(k, n):
    z = 1.96
    lo, hi = comp.wilson(k, n)
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (lo, hi) == pytest.approx((max(0.0, c - h), min(1.0, c + h)))
    if k == 0:
        assert lo == 0 and hi == pytest.approx(z * z / (n + z * z))  # the rule of three's cousin
    assert lo <= p <= hi


def test_mcnemar_is_the_exact_binomial_test():
    a = np.array([1] * 20 + [0] * 5 + [1] * 60 + [0] * 11, bool)
    b = np.array([0] * 20 + [1] * 5 + [1] * 60 + [0] * 11, bool)
    n10, n01, p = comp.mcnemar(a, b)
    assert (n10, n01) == (20, 5)
    assert p == pytest.approx(2 * sum(math.comb(25, i) for i in range(6)) / 2 ** 25)
    binomtest = pytest.importorskip("scipy.stats").binomtest
    assert p == pytest.approx(binomtest(5, 25, 0.5).pvalue)
    assert comp.mcnemar(a, a) == (0, 0, 1.0)


def test_pool_counts_each_build_and_pools_the_chosen_ones(tmp_path):
    b1 = _run(tmp_path / "b1", [_row("static", [1, 0, 0, 0]), _row("gated", [1, 1, 1, 0], [1, 1, 0, 0])])
    b1k = _run(tmp_path / "b1k", [_row("klora", [0, 0, 0, 0])])  # a later run on the same build, joined with '+'
    b2 = _run(tmp_path / "b2", [_row("static", [1, 1, 0, 0], per_image_all=False), _row("gated", [1, 1, 1, 1])])
    old = _run(tmp_path / "old", [_row("static", [0, 0, 0, 0]), _row("gated", [0, 0, 0, 0])])
    text = comp.pool([f"old={old}", f"b1={b1}+{b1k}", f"b2={b2}"], "b1,b2", tmp_path / "out",
                     "gated:static,gated:klora")
    assert "| both | old | b1 | b2 | pooled over b1, b2 |" in text
    assert "| static | 0.0% | 25.0% | 50.0% | 37.5% [" in text and "(3/8) |" in text
    lo, hi = comp.wilson(7, 8)
    assert f"| gated | 0.0% | 75.0% | 100.0% | 87.5% [{100 * lo:.0f}, {100 * hi:.0f}] (7/8) |" in text
    assert "| klora | - | 0.0% | - | 0.0% [0, 49] (0/4), without b2 |" in text
    assert "| gated | 0.0% | 50.0% | 100.0% | 75.0% [" in text  # 'all': b1 per image, b2 per image
    # pairs stay within a build; the pooled test concatenates the pooled builds' pairs (the old build is not pooled)
    assert "- gated vs static: old 0 vs 0 (p = 1); b1 2 vs 0 (p = 0.5); b2 2 vs 0 (p = 0.5); " \
           "**pooled over b1, b2: 4 vs 0 (p = 0.12)**" in text
    assert "- gated vs klora: b1 3 vs 0 (p = 0.25); **pooled over b1: 3 vs 0 (p = 0.25)**" in text
    saved = json.loads((tmp_path / "out" / "pooled.json").read_text())
    assert saved["pooled_over"] == ["b1", "b2"] and saved["counts"]["b2"]["static"]["all"] == [2, 4]
    assert (tmp_path / "out" / "pooled.md").read_text() == text + "\n"


def test_pool_without_pool_over_pools_every_build(tmp_path):
    a = _run(tmp_path / "a", [_row("gated", [1, 0])])
    b = _run(tmp_path / "b", [_row("gated", [1, 1])])
    assert "| gated | 50.0% | 100.0% | 75.0% [" in comp.pool([f"a={a}", f"b={b}"], None, tmp_path / "out")


def test_pool_bad_input_is_named_on_the_command_line(tmp_path, capsys):
    a = _run(tmp_path / "a", [_row("gated", [1, 0])])
    for argv, msg in ((["--pool", str(a)], "expected LABEL=DIR"),
                      (["--pool", f"a={tmp_path / 'nope'}"], "nope/results.json not found"),
                      (["--pool", f"a={a}", "--pool_over", "a,zz"], "--pool_over zz: not among the --pool labels a")):
        with pytest.raises(SystemExit):
            comp.main([*argv, "--out", str(tmp_path / "out")])
        assert msg in capsys.readouterr().err


def test_pool_from_the_command_line_prints_and_writes(tmp_path, capsys):
    a = _run(tmp_path / "a", [_row("gated", [1, 0]), _row("static", [0, 0])])
    comp.main(["--pool", f"a={a}", "--paired", "gated:static", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "| gated | 50.0% | 50.0% [" in out and "- gated vs static: a 1 vs 0 (p = 1); **pooled over a: 1 vs 0" in out
    assert (tmp_path / "out" / "pooled.md").is_file()


def test_tuning_ties_go_to_the_untuned_setting_and_a_unique_best_still_wins():
    tie = {(0.5, 0.5): (1.0, 1.0), (0.5, 1.0): (1.0, 1.0), (1.0, 1.25): (1.0, 1.0), (1.0, 1.0): (1.0, 1.0),
           (1.25, 1.25): (0.75, 1.0)}
    assert comp.closest_best(tie, (1.0, 1.0)) == (1.0, 1.0)  # grid order would have taken (0.5, 0.5)
    tie[(1.0, 1.0)] = (0.75, 0.75)  # the sum itself lost: the nearest of the tied ones
    assert comp.closest_best(tie, (1.0, 1.0)) == (1.0, 1.25)
    tie[(0.5, 0.5)] = (1.0, 1.0 + 1e-9)  # strictly best on 'all' (the second key): far from (1, 1) but it wins
    assert comp.closest_best(tie, (1.0, 1.0)) == (0.5, 0.5)
    assert comp.closest_best({0.5: (0.5, 0.5), 0.65: (1.0, 0.5), 0.9: (1.0, 0.5)}, 0.5) == 0.65  # the switch too


def _fake_run_set(truth):
    """run_set stand-in: 'both'/'all' per image from ``truth[setting]``; records the prompts and seeds it was given."""
    calls = []

    def run_set(pipe, ev, method, pairs, n_prompts, seeds, args, tuned, prompt_seed, skip=0):
        (c, s), = pairs
        v = next(iter(tuned.values()))
        calls.append((n_prompts, tuple(seeds), prompt_seed, skip))
        both = np.array(truth(v)[: n_prompts * len(seeds)], bool)
        return {"per_pair": {f"{c}+{s}": {"both": both, "all": both}}, "images": {}}
    return run_set, calls


@pytest.mark.parametrize("method", ["static-tuned", "scheduled-tuned"])
def test_tune_with_a_fake_scorer(monkeypatch, method):
    from argparse import Namespace

    good = {(1.0, 1.25), (0.5, 0.75), (1.0, 1.0)} if method == "static-tuned" else {0.8, 0.9, 0.5}
    run_set, calls = _fake_run_set(lambda v: [1] * 6 if v in good else [1, 0] * 3)
    monkeypatch.setattr(comp, "run_set", run_set)
    args = Namespace(prompts=4)
    best = comp.tune(None, None, [("ring", "dotted")], args, method)
    assert list(best.values()) == [(1.0, 1.0) if method == "static-tuned" else 0.5]  # ties -> the untuned setting
    n_prompts, seeds, _, skip = calls[0]
    assert n_prompts * len(seeds) == 6 and skip == 4 and not set(seeds) & set(range(4))  # disjoint from the test
    only = (0.5, 0.75) if method == "static-tuned" else 0.9
    run_set, _ = _fake_run_set(lambda v: [1] * 6 if v == only else [1, 0] * 3)
    monkeypatch.setattr(comp, "run_set", run_set)
    assert list(comp.tune(None, None, [("ring", "dotted")], args, method).values()) == [only]  # a unique best wins


def test_tuning_prompts_follow_the_test_prompts_and_never_repeat_them():
    for c, s in [("ring", "dotted"), ("heart", "checkered"), ("moon", "striped")]:
        test = comp.prompts_for(c, s, 4, 0)
        tuning = comp.prompts_for(c, s, 3, 0, skip=4)
        assert comp.prompts_for(c, s, 7, 0) == test + tuning  # one seeded order, cut in two
        assert not {p for p, _, _ in test} & {p for p, _, _ in tuning}
    with pytest.raises(ValueError, match="only"):
        comp.prompts_for("ring", "dotted", 5, 0, skip=40)
