"""The module walker skips the adapters' own submodules, so adding (or loading) an adapter visits as many modules
with 40 adapters already on the model as with 2 (a library of 1000 LoRAs loads in linear time)."""

from __future__ import annotations

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core import walk
from lora_diffusion.core.adapter import Adapter
from lora_diffusion.core.layer import AdaptedLayer
from lora_diffusion.core.walk import walk_modules
from lora_diffusion.fusion import fuse


def _spec(i: int) -> ld.AdapterSpec:
    return ld.AdapterSpec(rank=4, targets=["q_proj", "v_proj"], seed=i)


def _reference(model: torch.nn.Module, into_base: bool) -> list[str]:
    """named_modules() without the subtrees walk_modules leaves out."""
    out, skip = [], []
    for name, m in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        out.append(name)
        if isinstance(m, AdaptedLayer):
            pre = f"{name}." if name else ""
            skip.extend(f"{pre}{c}" for c in m._modules if c != "base_layer" or not into_base)
    return out


@pytest.mark.parametrize("into_base", [True, False])
def test_walk_is_named_modules_without_adapters(tiny_llama, into_base):
    for i in range(3):
        ld.add_adapter(tiny_llama, _spec(i), f"a{i}", trainable=False)
    fuse(tiny_llama, ["a0", "a1", "a2"], method="lag", top_k=2)  # a combiner on each layer: not walked either
    names = [n for n, _ in walk_modules(tiny_llama, into_base)]
    assert names == _reference(tiny_llama, into_base)
    assert not any(".adapters" in n or ".combiner" in n for n in names)
    assert any(n.endswith("q_proj.base_layer") for n in names) == into_base


class _Visits:
    """Modules visited: those whose children the walker lists, plus every named_modules() entry into an adapter."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        children, named = walk.child_modules, Adapter.named_modules

        def counted_children(module, into_base=True):
            self.n += 1
            return children(module, into_base)

        def counted_named(module, *a, **k):
            self.n += 1
            return named(module, *a, **k)

        monkeypatch.setattr(walk, "child_modules", counted_children)
        monkeypatch.setattr(Adapter, "named_modules", counted_named)

    def during(self, fn) -> int:
        start = self.n
        fn()
        return self.n - start


@pytest.mark.parametrize("how", ["add", "load"])
def test_add_visits_do_not_grow_with_the_library(tiny_llama, tmp_path, monkeypatch, how):
    ld.add_adapter(tiny_llama, _spec(0), "src", trainable=False)
    src = ld.save_adapter(tiny_llama, tmp_path / "src.safetensors", "src")
    ld.remove_adapters(tiny_llama)
    visits = _Visits(monkeypatch)

    def add(i: int) -> int:
        if how == "add":
            return visits.during(lambda: ld.add_adapter(tiny_llama, _spec(i), f"a{i}", trainable=False))
        return visits.during(lambda: ld.load_adapter(tiny_llama, src, name=f"a{i}"))

    counts = [add(i) for i in range(40)]
    assert counts[39] == counts[2] > 0, counts  # the 40th adapter costs what the 3rd did
    assert len(ld.list_adapters(tiny_llama)) == 40


def test_mark_trainable_unchanged(tiny_llama):
    """The trainable set is exactly the named adapters' parameters, base and other adapters frozen."""
    for i in range(3):
        ld.add_adapter(tiny_llama, _spec(i), f"a{i}")
    fuse(tiny_llama, ["a0", "a1", "a2"], method="mole")  # combiner parameters (the gates) get frozen too
    for p in tiny_llama.parameters():
        p.requires_grad_(True)
    ld.mark_trainable(tiny_llama, ["a1"])
    trainable = {id(p) for p in tiny_llama.parameters() if p.requires_grad}
    assert trainable == {id(p) for _, p in ld.adapter_parameters(tiny_llama, "a1")} != set()
