"""benchmarks/retrieval.py: its fixed prompt set (>= 50 prompts naming a concept and a style on the default demo
library, issue 12) and the held-out copy, without training anything."""

from __future__ import annotations

import pytest
import torch

from benchmarks import retrieval as bench
from lora_diffusion.io.files import read_safetensors, write_safetensors
from training.build_demo_library import recipes


def test_default_library_gets_at_least_50_distinct_prompts_each_naming_its_concept_and_style():
    kinds = {r.name: r.kind for r in recipes()}  # the library training.build_demo_library writes
    items = bench.cases(kinds)
    assert len(items) >= 50 and len({p for p, _, _ in items}) == len(items)
    assert {c for _, c, _ in items} == {"ring", "heart", "moon"}
    assert {s for _, _, s in items} >= {"dotted", "checkered", "striped"}
    for prompt, c, s in items:
        assert any(w in prompt for w in bench.WORDS[c]) and any(w in prompt for w in bench.WORDS[s]), prompt


def test_heldout_copy_takes_only_the_named_loras_and_strips_their_metadata(tmp_path):
    lib, held = tmp_path / "lib", tmp_path / "held"
    lib.mkdir(), held.mkdir()
    for name, prefix in (("ring", ""), ("dotted", "unet."), ("star", "")):  # bare UNet keys, and pivotal files' keys
        write_safetensors(held / f"{name}.safetensors", {f"{prefix}down.attn.lora_A": torch.ones(2, 4),
                                                         f"{prefix}down.attn.lora_B": torch.zeros(4, 2),
                                                         f"bundle_emb.{name}.string_to_param.*": torch.ones(1, 4)},
                          {"name": name})
    names = bench.with_heldout(lib, held, tmp_path / "work", only=["ring", "dotted"])
    assert sorted(names.values()) == ["dotted", "ring"]
    for rel in names:
        tensors, meta = read_safetensors(tmp_path / "work" / rel)
        assert meta == {} and set(tensors) == {"unet.down.attn.lora_A.weight", "unet.down.attn.lora_B.weight"}
    assert len(bench.with_heldout(lib, held, tmp_path / "all")) == 3
    with pytest.raises(FileNotFoundError, match="no moon.safetensors"):
        bench.with_heldout(lib, held, tmp_path / "bad", only=["ring", "moon"])
