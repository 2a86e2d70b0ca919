"""benchmarks/personalization.py: its prompts, its scoring, and one tiny end-to-end run on the demo model."""

from __future__ import annotations

import json

import pytest

from benchmarks import personalization as pb
from lora_diffusion import world


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


def test_score() -> None:
    train = world.Scene("ring", "red", "white")
    asked = [{"shape": "ring", "color": "blue", "background": "black"}] * 4
    preds = [{"shape": "ring", "color": "blue", "background": "black"},  # both right
             {"shape": "ring", "color": "red", "background": "black"},  # concept, but the training color
             {"shape": "circle", "color": "blue", "background": "black"},  # prompt only
             {"shape": "heart", "color": "green", "background": "white"}]  # neither; training background
    s = pb.score(preds, asked, train)
    assert s == {"fidelity": 0.5, "alignment": 0.5, "color": 0.5, "background": 0.75, "both": 0.25, "copied": 0.5}


def test_bad_flags_are_named() -> None:
    with pytest.raises(SystemExit, match="--variants: unknown"):
        pb.main(["--variants", "lora,nope"])
    with pytest.raises(SystemExit, match="--concepts: unknown shapes"):
        pb.main(["--concepts", "hexagon"])


@pytest.mark.slow
def test_one_tiny_run_end_to_end(tmp_path) -> None:
    """One concept, one seed, LoRA for 2 steps: the command writes a table, per-run JSON and sample grids."""
    out = tmp_path / "bench"
    pb.main(["--variants", "lora", "--concepts", "ring", "--seeds", "0", "--steps", "2", "--prompts", "2",
             "--images", "2", "--sample-steps", "2", "--device", "cpu", "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in data["runs"]] == ["base", "lora"]
    lora = data["runs"][1]
    assert lora["steps"] == 2 and lora["targets"] == "unet-full" and lora["lr"] > 0
    for r in data["runs"]:
        assert all(0.0 <= r[k] <= 1.0 for k in ("fidelity", "alignment", "both", "copied"))
    table = (out / "table.md").read_text()
    assert "| base |" in table and "| lora |" in table
    assert (out / "samples-lora.png").is_file() and (out / "samples-base.png").is_file()
