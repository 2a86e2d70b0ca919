"""benchmarks/t2l.py's report arithmetic on synthetic results: parts merged per seed, CIs, share of the oracle's gain."""

from __future__ import annotations

from benchmarks.t2l import ci95, report


def part(seed, split_conds, time=None):
    res = {"seed": seed, "time": time or {}, "heldout": {}, "seen": {}, "losses": {}}
    for split, conds in split_conds.items():
        for c, (acc, ce) in conds.items():
            res[split][c] = {"t": {"acc": [acc] * 4, "ce": [ce] * 4}}
    return res


def test_ci95_constant_and_spread():
    assert ci95([[1.0, 1.0], [1.0, 1.0]]) == (1.0, 1.0, 1.0)
    m, lo, hi = ci95([[0.0, 1.0] * 10, [0.0, 1.0] * 10])
    assert m == 0.5 and lo < 0.5 < hi


def test_report_merges_parts_and_reads_the_oracle_share():
    results = []
    for s in (0, 1):
        results.append(part(s, {"heldout": {"base": (0, 4.0), "T2L (generated)": (1, 3.0)},
                                "seen": {"base": (0, 4.0), "T2L (generated)": (1, 2.0)}}, {"generate_s": [0.01]}))
        results.append(part(s, {"heldout": {"task LoRA (oracle)": (1, 2.0)}}, {"task_lora_train_s": [10.0],
                                                                               "generate_same_process_s": [0.02]}))
    text = report(results)
    assert "| heldout (1 tasks, 2 seeds)" in text and "| T2L (generated) | 100.0 [100.0, 100.0] | 3.00" in text
    assert "T2L (generated): share of the oracle's gain over base (per seed): CE 50%, 50%; exact 100%, 100%" in text
    assert "ratio 500x (same process)" in text
