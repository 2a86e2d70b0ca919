"""benchmarks/bench_dit_trainer.py runs both sides on the same transformer (narrowed here so it takes seconds): the same
trainable parameter count (our dit-attn preset = PEFT's target_modules), finite step times."""

from __future__ import annotations

import argparse

import pytest

import benchmarks.bench_dit_trainer as bench

from .tiny_sd import _one_thread  # noqa: F401

NARROW = dict(num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32, pooled_projection_dim=32)


@pytest.mark.parametrize("model", sorted(bench.FIXTURES))
def test_both_sides_train_the_same_modules(model, monkeypatch):
    real = bench.transformer_config

    def narrow(name: str, layers: int) -> dict:
        cfg = real(name, layers) | NARROW
        cfg |= {"axes_dims_rope": (4, 4, 8)} if name == "flux-dev" else {"caption_projection_dim": 32}
        return cfg

    monkeypatch.setattr(bench, "transformer_config", narrow)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test's bf16 Accelerator in this process
    GradientState._reset_state()
    out = {}
    for side in ("ours", "diffusers"):
        a = argparse.Namespace(device="cpu", model=model, layers=1, resolution=64, rank=4, variant="lora",
                               mixed_precision="no", gradient_checkpointing=False, warmup=1, steps=1, threads=1, side=side)
        out[side] = bench.worker(a)
    assert out["ours"]["trainable"] == out["diffusers"]["trainable"] > 0
    assert out["ours"]["params"] == out["diffusers"]["params"]
    assert all(r["s_per_step"] > 0 for r in out.values())


def test_reduced_depth_keeps_the_real_width():
    cfg = bench.transformer_config("flux-dev", 1)
    assert (cfg["num_layers"], cfg["num_single_layers"]) == (1, 2)
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 3072 and cfg["joint_attention_dim"] == 4096
    sd35 = bench.transformer_config("sd35-medium", 2)
    assert sd35["num_layers"] == 2 and all(i < 2 for i in sd35.get("dual_attention_layers", []))


def test_interleaved_timing_pairs_both_sides(monkeypatch):
    """--interleave: both sides in one process, steps alternating; per-pair ratios and medians are finite."""
    real = bench.transformer_config
    monkeypatch.setattr(bench, "transformer_config",
                        lambda name, layers: real(name, layers) | NARROW | {"axes_dims_rope": (4, 4, 8)})
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    a = argparse.Namespace(device="cpu", model="flux-dev", layers=1, resolution=64, rank=4, variant="lora",
                           mixed_precision="no", gradient_checkpointing=False, warmup=1, steps=3, threads=1, profile=5)
    r = bench.interleaved(a)
    assert r["pairs"] == 3 and r["ours_s"] > 0 and r["diffusers_s"] > 0
    assert 0 < r["ratio_q1"] <= r["ratio_median"] <= r["ratio_q3"]
