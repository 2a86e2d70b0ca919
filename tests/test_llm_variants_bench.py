"""benchmarks/llm_variants.py without training: the flags it passes to train_llm, the over-seeds table (95% t-interval,
paired difference to LoRA), merging per-seed JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import llm_variants as lv
from benchmarks.stats import fmt_ci


def row(variant: str, seed: int, loss: float, params: int = 1000, **extra) -> dict:
    return {"variant": variant, "seed": seed, "loss_after": loss, "loss_before": 3.0, "trainable_params": params,
            "lr": 2e-4, "step_s": 1.0, "export_rank": 8, "export_params": params, **extra}


ROWS = [row("lora", 0, 1.0), row("lora", 1, 1.2), row("lora", 2, 1.1),
        row("sensitivity", 0, 0.8), row("sensitivity", 1, 1.1), row("sensitivity", 2, 0.9),
        *[row("loradrop", s, 1.0 + s / 10, lora_drop={"kept": 5, "layers": 60, "rank": 80, "matched": True,
                                                      "threshold": 0.95}) for s in range(3)]]


def test_seed_table_has_the_t_interval_and_the_paired_difference():
    text = lv.seed_table(ROWS)
    sens = next(line for line in text.splitlines() if line.startswith("| sensitivity "))
    assert fmt_ci([0.8, 1.1, 0.9]) in sens
    assert fmt_ci([0.8 - 1.0, 1.1 - 1.2, 0.9 - 1.1], "+.4f") in sens  # paired by seed, not the difference of means
    drop = next(line for line in text.splitlines() if line.startswith("| loradrop "))
    assert "5/60 (r 80)" in drop and "| 1,000 | 1.00x |" in drop
    unmatched = lv.seed_table([*ROWS[:3], row("loradrop", 0, 2.0, lora_drop={"kept": 2, "layers": 60, "rank": 8,
                                                                             "matched": False, "threshold": 0.9})])
    assert "| loradrop T=0.9 | 0 |" in unmatched


def test_merge_prints_the_tables_of_per_seed_files(tmp_path, capsys):
    for s in range(3):
        (tmp_path / f"s{s}.json").write_text(json.dumps({"meta": {}, "rows": [r for r in ROWS if r["seed"] == s]}))
    (tmp_path / "again.json").write_text(json.dumps({"meta": {}, "rows": [row("lora", 0, 1.0001)]}))
    lv.main(["--merge", *(str(tmp_path / f"s{s}.json") for s in range(3)), str(tmp_path / "again.json")])
    out = capsys.readouterr().out
    assert "over seeds" in out and out.count("\nseed ") == 3 and fmt_ci([1.0, 1.2, 1.1]) in out  # the rerun: once
    assert "| lora | 0,1,2 |" in out


@pytest.mark.parametrize("match", [True, False])
def test_loradrop_match_reaches_train_llm(match, tmp_path):
    args = lv.parse_args(["--lora-drop-threshold", "0.95"] + (["--lora-drop-match"] if match else []))
    argv = lv.train_argv(args, "loradrop", Path(tmp_path))
    assert ("--lora_drop_match_params" in argv) is match and argv[argv.index("--lora_drop_threshold") + 1] == "0.95"
    assert "--lora_drop_match_params" not in lv.train_argv(args, "lora", Path(tmp_path))
    from training import train_llm
    from training.config import parse_args

    cfg, _, _ = parse_args(train_llm.LLMConfig, argv, "")
    assert cfg.lora_drop.lora_drop_match_params is match
