"""Paper-specific properties (variants.md "Tests" lines; tlora.md §1-2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.core.functional import active_rank, factorization, rank_mask

from .conftest import layer_and_input, perturb


def one_layer(variant: str, kind: str = "linear", **spec_kw):
    net, target, x = layer_and_input(kind)
    ld.add_adapter(net, ld.AdapterSpec(variant=variant, targets=[target], **spec_kw))
    return net, net.get_submodule(target), x


# --- T-LoRA ---
@pytest.mark.parametrize("r,r_min,expected", [(64, 32, [64, 56, 48, 40, 32]), (64, 16, [64, 52, 40, 28, 16]),
                                              (64, 1, [64, 48, 32, 16, 1])])
def test_tlora_schedule_matches_paper_table(r, r_min, expected):
    assert [active_rank(t, r, r_min, 1000) for t in (0, 250, 500, 750, 999)] == expected


def test_tlora_schedule_exponent_and_per_sample():
    assert active_rank(500, 64, 32, 1000, exponent=2.0) == 32 + math.floor(0.25 * 32)
    m = rank_mask(torch.tensor([0, 999]), 8, 2, 1000)
    assert m.tolist() == [[1.0] * 8, [1.0] * 2 + [0.0] * 6]


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_tlora_ortho_factors_orthonormal_and_zero_output_at_init(kind):
    net, layer, x = one_layer("tlora", kind, rank=4, options={"min_rank": 2})
    ad = layer.adapters["default"]
    a, b = ad.lora_A.flatten(1), ad.lora_B.flatten(1)  # (r, in·k), (out, r)
    eye = torch.eye(4, dtype=a.dtype)
    assert torch.allclose(a @ a.T, eye, atol=1e-10) and torch.allclose(b.T @ b, eye, atol=1e-10)
    assert torch.all(ad.lora_S[:-1] >= ad.lora_S[1:])  # the r smallest singular values, descending
    base = layer.base_layer(x)
    for t in (None, 0, 500, 999):
        ld.set_timestep(net, t)
        assert torch.equal(layer(x), base)


def test_tlora_mask_changes_output_with_t_and_masks_gradients():
    net, layer, x = one_layer("tlora", rank=8, options={"min_rank": 2})
    perturb(net)
    outs = {}
    for t in (0, 500, 999):
        ld.set_timestep(net, t)
        outs[t] = layer(x)
    assert not torch.allclose(outs[0], outs[500]) and not torch.allclose(outs[500], outs[999])
    ld.set_timestep(net, 999)  # r(999) = 2: components 2..7 are masked
    layer(x).pow(2).sum().backward()
    ad = layer.adapters["default"]
    assert torch.all(ad.lora_A.grad[2:] == 0) and torch.all(ad.lora_A.grad[:2] != 0)
    assert torch.all(ad.lora_B.grad[:, 2:] == 0)


def test_tlora_at_t0_equals_unmasked_and_per_sample_timesteps():
    net, layer, x = one_layer("tlora", rank=8, options={"min_rank": 2})
    perturb(net)
    ld.set_timestep(net, None)
    full = layer(x)
    ld.set_timestep(net, 0)
    assert torch.equal(layer(x), full)
    ts = torch.tensor([0, 400, 999])
    ld.set_timestep(net, ts)
    y = layer(x)
    for i, t in enumerate(ts):
        ld.set_timestep(net, t)
        assert torch.allclose(y[i], layer(x)[i], atol=1e-12)


def test_tlora_vanilla_mask_is_prefix():
    net, layer, x = one_layer("tlora", rank=8, options={"min_rank": 3, "ortho": False})
    perturb(net)
    ad = layer.adapters["default"]
    ld.set_timestep(net, 999)
    ctx = layer._holder.current()
    expected = (ad.lora_B[:, :3] @ ad.lora_A[:3]) * ad.scaling
    assert torch.allclose(ad.delta_weight(ctx), expected)


def test_tlora_file_no_larger_than_lora(tmp_path):
    sizes = {}
    for v in ("lora", "tlora"):
        net, _, _ = one_layer(v, rank=4)
        sizes[v] = ld.save_adapter(net, tmp_path / f"{v}.safetensors").stat().st_size
    # T-LoRA stores one extra vector λ (r floats) and no frozen copies
    assert sizes["tlora"] - sizes["lora"] < 4 * 8 + 400


# --- LoRA / rsLoRA ---
def test_lora_gradients_at_init():
    net, layer, x = one_layer("lora", rank=2)
    layer(x).sum().backward()
    ad = layer.adapters["default"]
    assert torch.all(ad.lora_A.grad == 0) and ad.lora_B.grad.abs().sum() > 0


def test_rslora_scaling():
    for spec_kw in ({"variant": "rslora"}, {"variant": "lora", "rslora": True}):
        _, layer, _ = one_layer(rank=4, alpha=8, **spec_kw)
        assert layer.adapters["default"].scaling == pytest.approx(8 / math.sqrt(4))


# --- DoRA ---
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dora_merged_row_norms_equal_magnitude(kind):
    net, layer, _ = one_layer("dora", kind, rank=2, alpha=4)
    perturb(net)
    ld.merge_adapters(net)
    norms = layer.base_weight().flatten(1).norm(dim=1)
    assert torch.allclose(norms, layer.adapters["default"].magnitude, atol=1e-10)


def test_dora_over_loha_is_supported():
    net, layer, x = one_layer("dora", rank=2, options={"inner": "loha"})
    assert layer.adapters["default"].inner.variant == "loha"
    assert torch.equal(layer(x), layer.base_layer(x))


# --- VeRA ---
def test_vera_projections_regenerate_bitwise_and_are_shared():
    net1, target, _ = layer_and_input("linear")
    net1.lin2 = nn.Linear(24, 8).double()
    ld.add_adapter(net1, ld.AdapterSpec(variant="vera", rank=4, targets=["lin", "lin2"], seed=3))
    net2, _, _ = layer_and_input("linear")
    net2.lin2 = nn.Linear(24, 8).double()
    ld.add_adapter(net2, ld.AdapterSpec(variant="vera", rank=4, targets=["lin", "lin2"], seed=3))
    a1, a2 = ld.shared_tensors(net1)["vera_A__default"], ld.shared_tensors(net2)["vera_A__default"]
    assert torch.equal(a1, a2) and a1.shape == (4, 24)  # in_max = 24
    assert len(list(net1.buffers())) == 2  # stored once, not per layer
    lin2 = net1.lin2.adapters["default"]
    assert lin2._projections(torch.float64)[0].shape == (4, 24) and net1.lin.adapters["default"]._projections(
        torch.float64)[0].shape == (4, 16)


def test_vera_gradients_at_init():
    net, layer, x = one_layer("vera", rank=4)
    layer(x).sum().backward()
    ad = layer.adapters["default"]
    assert torch.all(ad.vera_lambda_d.grad == 0) and ad.vera_lambda_b.grad.abs().sum() > 0


# --- LoHa ---
def test_loha_rank_is_r_squared():
    net, layer, _ = one_layer("loha", rank=3)
    perturb(net, std=1.0)
    assert torch.linalg.matrix_rank(layer.adapters["default"].delta_weight()) == 9


# --- LoKr ---
@pytest.mark.parametrize("dim,expected", [(4096, (64, 64)), (11008, (86, 128)), (768, (24, 32)), (14336, (112, 128)),
                                          (127, (1, 127))])
def test_lokr_factorization(dim, expected):
    assert factorization(dim) == expected


def test_lokr_delta_is_kronecker():
    net, layer, _ = one_layer("lokr", rank=1, alpha=2)  # out 24 = 4·6, in 16 = 4·4; r < 6/2: W2 low-rank
    perturb(net)
    ad = layer.adapters["default"]
    assert (ad.shapes.a * ad.shapes.b, ad.shapes.c * ad.shapes.d) == (24, 16) and not ad.shapes.full_w2
    expected = torch.kron(ad.lokr_w1, ad.lokr_w2_a @ ad.lokr_w2_b) * 2.0
    assert torch.allclose(ad.delta_weight(), expected)
