"""The procedural world: reproducible, validated, every shape distinguishable."""

from __future__ import annotations

import numpy as np
import pytest

from lora_diffusion.demo import world as w


def test_same_seed_same_images_and_captions():
    a_img, a_cap, a_sc = w.make_dataset(12, seed=3, split="all", caption_variety=0.5)
    b_img, b_cap, b_sc = w.make_dataset(12, seed=3, split="all", caption_variety=0.5)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_sc == b_sc
    c_img, _, _ = w.make_dataset(12, seed=4, split="all")
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (12, 32, 32, 3) and a_img.dtype == np.uint8


def test_caption_matches_scene():
    assert w.Scene("star", "red", "blue").caption() == "a red star on a blue background"
    assert w.Scene("ring", "orange", "black", "dotted").caption() == "an orange dotted ring on a black background"
    vocab = set(w.vocabulary())
    for t in range(len(w.CAPTION_TEMPLATES)):
        for s in w.sample_scenes(20, seed=t, split="all"):
            assert set(s.caption(t).split()) <= vocab
    assert {"sks", "<v1>", "<v4>"} <= vocab


@pytest.mark.parametrize("kwargs, match", [
    (dict(shape="hexagon"), "unknown shape 'hexagon'; valid shapes: circle"),
    (dict(color="teal"), "unknown color 'teal'"),
    (dict(background="mauve"), "unknown background"),
    (dict(texture="plaid"), "unknown texture 'plaid'"),
    (dict(size=1.5), "outside the canvas"),
    (dict(size=0.05), "outside the canvas"),
    (dict(size=0.6, x=0.1), "leaves the canvas"),
    (dict(color="blue", background="blue"), "invisible"),
    (dict(x=float("nan")), "finite"),
])
def test_rejects_impossible_requests(kwargs, match):
    args = dict(shape="star", color="red", background="white") | kwargs
    with pytest.raises(w.WorldError, match=match):
        w.Scene(**args)


def test_rejects_bad_sampling_arguments():
    with pytest.raises(w.WorldError, match="unknown split"):
        w.sample_scenes(1, 0, split="test")
    with pytest.raises(w.WorldError, match="size_range"):
        w.sample_scenes(1, 0, size_range=(0.5, 1.4))
    with pytest.raises(w.WorldError, match="resolution"):
        w.render(w.Scene("star", "red", "white"), resolution=4)


def test_splits_hold_concepts_out():
    pre = w.sample_scenes(300, 0, "pretrain", textured=0.5)
    assert {s.shape for s in pre} == set(w.PRETRAIN_SHAPES)
    assert {s.texture for s in pre} == set(w.PRETRAIN_TEXTURES)
    assert not any(w.is_heldout_combination(s.shape, s.color, s.background) for s in pre)
    combos = w.sample_scenes(50, 0, "pretrain-heldout-combos")
    assert all(w.is_heldout_combination(s.shape, s.color, s.background) for s in combos)
    assert {s.shape for s in w.sample_scenes(100, 0, "heldout-shapes")} == set(w.HELDOUT_SHAPES)
    assert {s.texture for s in w.sample_scenes(100, 0, "heldout-textures")} == set(w.HELDOUT_TEXTURES)
    for s in w.sample_scenes(200, 1, "all"):  # every sampled scene stays on the canvas (validated on creation)
        assert s.size / 2 <= s.x <= 1 - s.size / 2


def test_every_shape_and_texture_renders_distinguishably():
    imgs = {s: np.asarray(w.render(w.Scene(s, "red", "white", size=0.8), 32), dtype=np.float32) for s in w.SHAPES}
    for a in w.SHAPES:
        assert (imgs[a][..., 1] < 128).mean() > 0.15, f"{a} covers too little of the canvas"
        for b in w.SHAPES:
            if a < b:
                diff = np.abs(imgs[a] - imgs[b]).mean(-1)
                assert (diff > 60).mean() > 0.04, f"{a} and {b} look alike"
    tex = {t: np.asarray(w.render(w.Scene("square", "blue", "white", t, size=0.9), 32), np.float32) for t in w.TEXTURES}
    for a in w.TEXTURES:
        for b in w.TEXTURES:
            if a < b:
                assert np.abs(tex[a] - tex[b]).mean() > 5, f"{a} and {b} look alike"
    img = np.asarray(w.render(w.Scene("circle", "green", "black", size=0.5, x=0.25, y=0.75), 32))
    assert tuple(img[24, 8]) == w.COLORS["green"] and tuple(img[4, 28]) == w.COLORS["black"]
