"""The demo LoRA library builder: trained files carry descriptive metadata, their renders keep captions, and the
other-family file is an SDXL LoRA that blend never applies."""

from __future__ import annotations

import json

import pytest

from lora_diffusion.demo import world
from lora_diffusion.io.files import read_header, read_safetensors
from lora_diffusion.io.library import describe
from training.build_demo_library import main, n_renders, palettes, recipes, write_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_library_recipes_cover_the_issue():
    kinds = [r.kind for r in recipes()]
    assert len(kinds) >= 12 and kinds.count("concept") == 3 and kinds.count("style") >= 3
    names = {r.name for r in recipes()}
    assert {"ring", "heart", "moon", "dotted", "checkered"} <= names


def test_one_lora_builds_with_metadata_and_captioned_data(tmp_path):
    main(["--out", str(tmp_path), "--only", "ring", "--steps", "2", "--images", "2", "--batch_size", "1", "--device", "cpu"])
    _, meta = read_header(tmp_path / "ring.safetensors")
    assert meta["lora_kind"] == "concept" and meta["trigger_word"] == "ring" and "ring" in meta["modelspec.description"]
    assert json.loads(meta["ss_tag_frequency"])["ring"]["ring"] == 2
    assert sorted(p.name for p in (tmp_path / "data" / "ring").iterdir()) == ["000.png", "000.txt", "001.png", "001.txt"]
    assert (tmp_path / "data" / "ring" / "000.txt").read_text().strip().endswith("background")
    assert describe(tmp_path / "ring.safetensors")["base_family"] is None  # the demo model's, not SD1
    tensors, _ = read_safetensors(tmp_path / "ring.safetensors")  # pivotal tuning: the word's row travels along
    assert meta["pivotal_tuning"] == "true" and any(k.startswith("bundle_emb.ring.") for k in tensors)
    pairs = tmp_path / "data" / "pairs"  # composition data for train_gates --objective composition
    assert len(list(pairs.iterdir())) == 18
    assert " dotted ring on a " in (pairs / "ring+dotted" / "001.txt").read_text()
    assert describe(tmp_path / "other_family" / "sdxl-watercolor.safetensors")["base_family"] == "sdxl"
    assert meta["training_coverage"] == "balanced"
    main(["--out", str(tmp_path), "--only", "ring", "--steps", "2", "--images", "2", "--device", "cpu"])  # kept, not retrained


@pytest.mark.parametrize("n", [6, 12, 24, 28])
def test_balanced_palettes_show_every_color_equally_often_on_its_backgrounds_in_turn(n):
    import numpy as np

    pal = palettes(n, np.random.default_rng(0))
    colors = [c for c, _ in pal]
    assert all(b != c for c, b in pal)
    assert max(map(colors.count, world.SHAPE_COLORS)) - min(map(colors.count, world.SHAPE_COLORS)) <= 1
    for c in world.SHAPE_COLORS:  # a color's backgrounds repeat only once it has been on all of them
        bgs = [b for cc, b in pal if cc == c]
        assert len(set(bgs)) == min(len(bgs), len(world.BACKGROUNDS) - (c in world.BACKGROUNDS))
    if n == 28:
        assert len(set(pal)) == 28  # every allowed (color, background) pair


def test_style_renders_cover_every_color_and_captions_name_it(tmp_path):
    dotted = next(r for r in recipes() if r.name == "dotted")
    caps = write_data(dotted, tmp_path / "b", 12, 0)
    assert all(sum(f" {c} dotted " in f" {x} " for x in caps) == 2 for c in world.SHAPE_COLORS), caps
    old = write_data(dotted, tmp_path / "r", 12, 0, coverage="random")  # the recipe before: colors at random
    assert old != caps and all(" dotted " in x for x in old)
    night = write_data(next(r for r in recipes() if r.name == "night"), tmp_path / "n", 6, 0)
    assert all(x.endswith("on a black background") for x in night)  # a recipe that fixes the background keeps it
    with pytest.raises(ValueError, match="coverage 'even'"):
        write_data(dotted, tmp_path / "x", 2, 0, coverage="even")


def test_style_loras_train_on_more_renders_by_default():
    by = {r.name: r for r in recipes()}
    assert n_renders(by["dotted"], 12, 48) == 48 and n_renders(by["ring"], 12, 48) == 12
    assert n_renders(by["dotted"], 12, 0) == 12  # 0: every LoRA on --images
