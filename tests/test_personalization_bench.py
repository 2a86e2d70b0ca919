"""benchmarks/personalization.py: its prompts, its scoring, and one tiny end-to-end run on the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import personalization as pb
from lora_diffusion.demo import world


@pytest.mark.parametrize("concept", world.HELDOUT_SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recontext_prompts_change_color_and_background(concept: str, seed: int) -> None:
    train = pb.training_scene(concept, seed)
    assert train == pb.training_scene(concept, seed) and train.shape == concept  # seeded, valid
    pairs = pb.recontext_prompts(train, 8, seed)
    assert len(set(pairs)) == 8
    for color, background in pairs:
        assert color != train.color and background != train.background and color != background


def test_training_images_differ_across_seeds() -> None:
    scenes = {(s.color, s.background) for s in (pb.training_scene("ring", seed) for seed in range(6))}
    assert len(scenes) > 1


@pytest.mark.parametrize("texture", world.HELDOUT_TEXTURES)
def test_texture_concepts_are_drawn_on_a_pretraining_shape(texture: str) -> None:
    scene = pb.training_scene(texture, 0)
    assert scene.texture == texture and scene.shape in world.PRETRAIN_SHAPES


def test_score() -> None:
    train = world.Scene("ring", "red", "white")
    asked = [{"shape": "ring", "color": "blue", "background": "black"}] * 4
    preds = [{"shape": "ring", "color": "blue", "background": "black"},  # both right
             {"shape": "ring", "color": "red", "background": "black"},  # concept, but the training color
             {"shape": "circle", "color": "blue", "background": "black"},  # prompt only
             {"shape": "heart", "color": "green", "background": "white"}]  # neither; training background
    s = pb.score(preds, asked, train)
    assert s == {"fidelity": 0.5, "alignment": 0.5, "color": 0.5, "background": 0.75, "both": 0.25, "copied": 0.5}


def test_score_of_a_texture_reads_the_texture() -> None:
    train = world.Scene("circle", "red", "white", texture="dotted")
    asked = [{"texture": "dotted", "color": "blue", "background": "black"}] * 2
    preds = [{"shape": "square", "texture": "dotted", "color": "blue", "background": "black"},
             {"shape": "circle", "texture": "plain", "color": "blue", "background": "black"}]
    assert pb.score(preds, asked, train)["fidelity"] == 0.5


def test_a_texture_word_is_asked_on_other_shapes_and_scored_on_them() -> None:
    train = pb.training_scene("dotted", 0)
    shapes = pb.recontext_shapes(train, 8)
    assert set(shapes) == set(world.PRETRAIN_SHAPES) and shapes[0] != train.shape  # every shape, another first
    asked = [{"texture": "dotted", "color": "blue", "background": "black", "shape": "star"}] * 2
    preds = [{"shape": "star", "texture": "dotted", "color": "blue", "background": "black"},
             {"shape": train.shape, "texture": "dotted", "color": "blue", "background": "black"}]  # not the star
    s = pb.score(preds, asked, train)
    assert s["fidelity"] == 1.0 and s["alignment"] == 0.5 and s["both"] == 0.5


@pytest.mark.parametrize("texture_as", ["word", "object"])
def test_texture_caption_modes(tmp_path, texture_as: str) -> None:
    """word: `a <color> sks circle ...`, vectors from `striped`; object: `a <color> sks ...` as a shape concept."""
    cfg = pb.BenchConfig(texture_as=texture_as, sweep=(2,))
    run = pb.Run("tlora:4", "dotted", 0, "described")
    tc = pb.train_config(run, cfg, tmp_path)
    scene = pb.training_scene("dotted", 0)
    word = texture_as == "word"
    assert tc.data.class_name == (scene.shape if word else "")
    assert tc.embedding.initializer_token == ("striped" if word else None)
    assert pb.as_word(run, cfg) == word and not pb.as_word(pb.Run("tlora:4", "ring", 0), cfg)


def test_mean_ci() -> None:
    assert pb.mean_ci([0.5]) == (0.5, 0.0)
    m, ci = pb.mean_ci([0.0, 1.0])
    assert m == 0.5 and ci == pytest.approx(12.706 * (2 ** -0.5) / 2 ** 0.5)  # t(1) * sd / sqrt(n)


def test_paired_comparison_at_matched_fidelity() -> None:
    """b's curve: alignment falls 1:1 as fidelity rises; a sits 0.1 above it at the fidelities b spans."""
    def rec(v, c, f, a):
        return {"variant": v, "regime": "bare", "concept": c, "seed": 0, "fidelity": f, "alignment": a}
    results = [rec("b", c, f, 1 - f) for c in ("ring", "moon") for f in (0.2, 0.6, 1.0)]
    results += [rec("a", c, f, 1.1 - f) for c in ("ring", "moon") for f in (0.4, 0.8)]
    results += [rec("a", "ring", 0.1, 0.95)]  # outside b's range: not matched
    out = pb.paired(results, "a", "b", "bare")
    assert out["pairs"] == 2 and out["points"] == 4
    assert out["diff"] == pytest.approx(0.1) and out["ci"] == pytest.approx(0.0, abs=1e-9)


def test_bad_flags_are_named() -> None:
    with pytest.raises(SystemExit, match="--variants: unknown"):
        pb.main(["--variants", "lora,nope"])
    with pytest.raises(SystemExit, match="--concepts: unknown shapes"):
        pb.main(["--concepts", "hexagon"])
    with pytest.raises(SystemExit, match="--regimes"):
        pb.main(["--regimes", "terse"])


@pytest.mark.slow
def test_one_tiny_run_end_to_end(tmp_path) -> None:
    """T-LoRA and LoRA, one texture, both regimes, 2 checkpoints of one run each: the command writes
    the table (with the paired comparison), per-checkpoint JSON, the curves and a sample grid per variant/regime."""
    out = tmp_path / "bench"
    pb.main(["--variants", "tlora:4,lora:4", "--concepts", "dotted", "--seeds", "0", "--sweep", "1,2",
             "--prompts", "2", "--images", "2", "--sample-steps", "2", "--device", "cpu", "--out", str(out),
             "--set", "train_embedding=true"])
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    assert {(r["variant"], r["regime"]) for r in runs} == {("base", "any"), *[(v, g) for v in ("tlora:4", "lora:4")
                                                                             for g in ("described", "bare")]}
    lora = [r for r in runs if r["variant"] == "lora:4" and r["regime"] == "bare" and r["concept"] == "dotted"]
    assert sorted(r["step"] for r in lora) == [1, 2] and lora[0]["rank"] == 4 and lora[0]["caption"] == "a photo of {0}"
    assert lora[0]["embedding"] and lora[0]["token"] == "sks" and len(lora[0]["per_image"]) == 4
    for r in runs:
        assert all(0.0 <= r[k] <= 1.0 for k in ("fidelity", "alignment", "both", "copied"))
    table = (out / "table.md").read_text()
    assert "| bare | tlora:4 | 2 |" in table and "| any | base | 0 |" in table and "at matched fidelity" in table
    assert (out / "curves.png").stat().st_size > 10_000
    for name in ("base", "tlora-r4-bare", "lora-r4-described"):
        assert (out / f"samples-{name}.png").is_file()
    merged = tmp_path / "merged"  # --merge: the report again from saved runs, no training
    pb.main(["--variants", "tlora:4,lora:4", "--concepts", "dotted", "--seeds", "0", "--sweep", "1,2",
             "--prompts", "2", "--images", "2", "--out", str(merged), "--merge", str(out)])
    assert (merged / "table.md").read_text().split("\n\n1 concepts")[0] == table.split("\n\n1 concepts")[0]


def test_variant_set_reaches_only_its_variant_and_sensitivity_trains_a_lora(tmp_path) -> None:
    """--variant-set VARIANT=key=value: a trainer option for one --variants entry (issue 15's equal-size rows)."""
    cfg = pb.BenchConfig(sweep=(4,), variant_overrides=("loradrop:16=lora_drop_match_params=true",
                                                        'adalora:24=adapter_options={"target_rank": 16}'))
    drop = pb.train_config(pb.Run("loradrop:16", "ring", 0, "bare"), cfg, tmp_path)
    ada = pb.train_config(pb.Run("adalora:24", "ring", 0, "bare"), cfg, tmp_path)
    lora = pb.train_config(pb.Run("lora:16", "ring", 0, "bare"), cfg, tmp_path)
    assert drop.lora_drop.lora_drop_match_params and not lora.lora_drop.lora_drop_match_params
    assert ada.adapter.adapter_options["target_rank"] == 16 and "target_rank" not in lora.adapter.adapter_options
    sens = pb.train_config(pb.Run("sensitivity:16", "ring", 0, "bare"), cfg, tmp_path)
    assert sens.adapter.variant == "lora" and sens.adapter.lora_rank == 16


def test_bad_variant_sets_are_named() -> None:
    with pytest.raises(SystemExit, match=r"--variant-set: \['dora:4=x=1'\] name no entry of --variants"):
        pb.main(["--variants", "lora:4", "--variant-set", "dora:4=x=1"])
    with pytest.raises(SystemExit, match="--variant-set 'lora:4=oops': expected VARIANT=key=value"):
        pb.main(["--variants", "lora:4", "--variant-set", "lora:4=oops"])
    with pytest.raises(SystemExit, match="--set 'nope=1': expected key=value with a trainer option"):
        pb.train_config(pb.Run("lora:4", "ring", 0), pb.BenchConfig(variant_overrides=("lora:4=nope=1",)), Path("/tmp"))


def test_paired_table_is_the_per_run_difference() -> None:
    def rec(v, c, s, f):
        return {"variant": v, "regime": "bare", "concept": c, "seed": s, "step": 4, "fidelity": f, "alignment": 1.0,
                "both": f}
    results = [rec("a", "ring", 0, 0.5), rec("a", "ring", 1, 0.7), rec("b", "ring", 0, 0.6), rec("b", "ring", 1, 0.6),
               rec("b", "moon", 0, 0.9)]  # moon has no pair
    assert pb.paired_diffs(results, "b", "a", "bare", 4, "fidelity") == pytest.approx([0.1, -0.1])
    cfg = pb.BenchConfig(variants=("a", "b"), regimes=("bare",), sweep=(4,), paired_to="a")
    m, ci = pb.mean_ci([0.1, -0.1])
    assert f"| bare | b | 4 | {100 * m:+.1f} ± {100 * ci:.1f} | +0.0 ± 0.0 |" in pb.paired_table(results, cfg)
    with pytest.raises(SystemExit, match="--paired-to 'c': expected one of --variants"):
        pb.main(["--variants", "lora:4", "--paired-to", "c"])


def test_lever_against_recipe_folders_pairs_by_run(tmp_path) -> None:
    """benchmarks/personalization_paired.py: two --out folders, paired by (variant, regime, concept, seed, step);
    a run only one folder holds is left out; a folder without results is named."""
    from benchmarks import personalization_paired as pp

    def folder(name: str, runs: list[tuple[str, int, int, float]], done: bool = True) -> Path:
        out = tmp_path / name
        out.mkdir()
        recs = [{"variant": "base", "regime": "any", "concept": "ring", "seed": 0, "step": 0, "fidelity": 0.0}]
        recs += [{"variant": "tlora:64", "regime": "described", "concept": c, "seed": s, "step": step,
                  "fidelity": f, "alignment": 1 - f, "both": f / 2, "color": 1.0} for c, s, step, f in runs]
        (out / ("results.json" if done else "partial.json")).write_text(json.dumps({"runs": recs}))
        return out

    lever = folder("lever", [("ring", 0, 400, 1.0), ("heart", 0, 400, 0.75), ("moon", 1, 400, 0.5)])
    recipe = folder("recipe", [("ring", 0, 400, 0.5), ("heart", 0, 400, 0.5)], done=False)
    rows = pp.paired_rows(pp.load_runs(lever), pp.load_runs(recipe))
    assert [(r["step"], r["pairs"]) for r in rows] == [(400, 2)]  # moon/1 has no recipe run
    assert sorted(rows[0]["fidelity"][2]) == [25.0, 50.0] and sorted(rows[0]["alignment"][2]) == [-50.0, -25.0]
    assert "+37.5 ±" in pp.main([str(lever), "--recipe", str(recipe)])
    assert pp.paired_rows(pp.load_runs(lever), pp.load_runs(recipe), {"moon"}) == []
    with pytest.raises(SystemExit, match="no results.json"):
        pp.load_runs(tmp_path)


def test_recolor_holdout_excludes_the_evaluation_pairs(tmp_path) -> None:
    """--recolor-holdout: a described run's trainer never paints the (color, background) pairs its prompts ask for."""
    from training.data import parse_color_pairs

    cfg = pb.BenchConfig(concepts=("ring",), seeds=(0,), sweep=(4,), recolor_holdout=True, out=tmp_path)
    for regime in ("described", "bare"):
        tc = pb.train_config(pb.Run("tlora:64", "ring", 0, regime), cfg, tmp_path)
        pairs = set(pb.recontext_prompts(pb.training_scene("ring", 0), cfg.prompts, 0))
        assert parse_color_pairs(tc.data.recolor_exclude) == (pairs if regime == "described" else set())
