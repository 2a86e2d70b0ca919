"""The demo LoRA library builder: trained files carry descriptive metadata, their renders keep captions, and the
other-family file is an SDXL LoRA that blend never applies."""

from __future__ import annotations

import json

import pytest

from lora_diffusion.io.files import read_header, read_safetensors
from lora_diffusion.io.library import describe
from training.build_demo_library import main, recipes

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
    main(["--out", str(tmp_path), "--only", "ring", "--steps", "2", "--images", "2", "--device", "cpu"])  # kept, not retrained
