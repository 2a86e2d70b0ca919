"""The adapter contract, parametrized over the registry: a new variant is covered with no edits here."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core.errors import TargetError
from lora_diffusion.core.layerinfo import layer_info

from .conftest import TOL, layer_and_input, perturb, run

KINDS = ["linear", "conv2d"]
CASES = [(v, k) for v in ld.variant_names() for k in KINDS]


def supported(variant: str, kind: str) -> bool:
    return kind in ld.get_variant(variant).kinds


def _cases_supported():
    return [c for c in CASES if supported(*c)]


def adapted(variant: str, kind: str, rank: int = 2, alpha: float = 3.0, seed: int = 0, name: str = "default"):
    net, target, x = layer_and_input(kind)
    base = copy.deepcopy(net)
    ld.add_adapter(net, ld.AdapterSpec(variant=variant, rank=rank, alpha=alpha, targets=[target], seed=seed), name=name)
    return net, base, target, x


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=TOL[a.dtype], rtol=TOL[a.dtype])


@pytest.mark.parametrize(
    "variant,kind",
    [c for c in CASES if not supported(*c)]
    or [pytest.param("-", "-", marks=pytest.mark.skip("every variant supports every kind"))],
)
def test_unsupported_kind_is_refused(variant, kind):
    net, target, _ = layer_and_input(kind)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(TargetError, match=f"'{target}'.*{kind}"):
        ld.add_adapter(net, ld.AdapterSpec(variant=variant, rank=2, targets=[target]))
    assert not isinstance(net.get_submodule(target), ld.AdaptedLayer)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("variant,kind", [c for c in _cases_supported() if ld.get_variant(c[0]).identity_init])
def test_output_unchanged_at_init(variant, kind):
    net, base, target, x = adapted(variant, kind)
    ld.set_timestep(net, 300)
    assert torch.equal(run(net, target, x), run(base, target, x))


@pytest.mark.parametrize("variant,kind", _cases_supported())
def test_merged_equals_unmerged_and_unmerge_is_exact(variant, kind):
    net, base, target, x = adapted(variant, kind)
    perturb(net)
    ld.set_timestep(net, 300)
    y = run(net, target, x)
    assert not close(y, run(base, target, x)), "perturbed adapter must change the output"
    w0 = net.get_submodule(target).weight.detach().clone()
    ld.merge_adapters(net)
    assert close(run(net, target, x), y)
    assert not torch.equal(net.get_submodule(target).weight, w0)
    ld.unmerge_adapters(net)
    assert torch.equal(net.get_submodule(target).weight, w0)
    assert close(run(net, target, x), y)


@pytest.mark.parametrize("variant,kind", _cases_supported())
def test_delta_weight_path_equals_forward_path(variant, kind):
    net, base, target, x = adapted(variant, kind)
    perturb(net)
    layer = net.get_submodule(target)
    ad = layer.adapters["default"]
    ctx = layer._holder.current()
    w = layer.base_weight()
    via_weight = layer.info.op(x, ad.merged_weight(w, ctx, 1.0)) + layer.info.channel_view(layer.bias)
    assert close(run(net, target, x), via_weight)
    if ad.additive:
        assert close(ad.delta_forward(x, ctx), layer.info.op(x, ad.delta_weight(ctx)))


@pytest.mark.parametrize("variant,kind", _cases_supported())
def test_only_adapter_params_trainable_and_count_matches_formula(variant, kind):
    net, _, target, _ = adapted(variant, kind, rank=2)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    layer = net.get_submodule(target)
    ad = layer.adapters["default"]
    n_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert n_params == type(ad).num_params(layer_info(layer.base_layer), ad.cfg)


@pytest.mark.parametrize("variant,kind", _cases_supported())
def test_save_load_roundtrip_is_exact(variant, kind, tmp_path):
    net, base, target, x = adapted(variant, kind, seed=7)
    perturb(net)
    ld.set_timestep(net, 640)
    path = ld.save_adapter(net, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    name = ld.load_adapter(fresh, path)
    assert name == "a"
    ld.set_timestep(fresh, 640)
    assert torch.equal(run(fresh, target, x), run(net, target, x))
    sd0, sd1 = ld.adapter_state_dict(net, "default"), ld.adapter_state_dict(fresh, "a")
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert ld.get_spec(fresh, "a") == ld.get_spec(net, "default")


@pytest.mark.parametrize("variant,kind", _cases_supported())
def test_named_adapters_switch_and_scale(variant, kind):
    net, base, target, x = adapted(variant, kind, name="a", seed=1)
    ld.add_adapter(net, ld.AdapterSpec(variant=variant, rank=2, alpha=3.0, targets=[target], seed=2), name="b")
    perturb(net, "a", seed=3)
    perturb(net, "b", seed=4)
    y0 = run(base, target, x)
    ld.set_adapters(net, ["a"])
    ya = run(net, target, x)
    ld.set_adapters(net, ["b"])
    yb = run(net, target, x)
    assert not close(ya, yb)
    ld.disable_adapters(net)
    assert torch.equal(run(net, target, x), y0)
    if ld.get_variant(variant).additive:
        ld.set_adapters(net, ["a", "b"], [0.5, 2.0])
        assert close(run(net, target, x), y0 + 0.5 * (ya - y0) + 2.0 * (yb - y0))
        ld.merge_adapters(net)  # merged with their scales
        assert close(run(net, target, x), y0 + 0.5 * (ya - y0) + 2.0 * (yb - y0))
        ld.set_adapters(net, ["a", "b"], [1.0, 1.0])  # rescaling a merged adapter re-merges it
        assert close(run(net, target, x), ya + yb - y0)
    ld.remove_adapters(net)
    assert type(net.get_submodule(target)) is type(base.get_submodule(target))
    assert torch.equal(run(net, target, x), y0)


@pytest.mark.parametrize("variant,kind", _cases_supported())
def test_gate_from_context_acts_as_a_scale(variant, kind):
    net, base, target, x = adapted(variant, kind)
    perturb(net)
    y0, y1 = run(base, target, x), run(net, target, x)
    ld.set_adapters(net, ["default"], [0.3])
    y_scaled = run(net, target, x)
    ld.set_adapters(net, ["default"], [1.0])
    ld.set_context(net, gates={"default": 0.3})
    assert close(run(net, target, x), y_scaled)
    if ld.get_variant(variant).additive:
        ld.set_context(net, gates={"default": 0.0})
        assert close(run(net, target, x), y0)
        gates = torch.tensor([0.0, 1.0, 0.5], dtype=x.dtype)  # one gate per batch row
        ld.set_context(net, gates={"default": gates})
        y = run(net, target, x)
        for i, g in enumerate(gates):
            assert close(y[i], y0[i] + g * (y1[i] - y0[i]))


@pytest.mark.parametrize("variant,kind", _cases_supported())
def test_print_shows_adapters(variant, kind):
    net, _, _, _ = adapted(variant, kind)
    text = repr(net)
    assert "AdaptedLayer" in text and f"default: {variant}" in text
