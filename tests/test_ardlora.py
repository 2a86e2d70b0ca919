"""ARD-LoRA (variants.md §18 "Tests"): α = 1 is LoRA, minimum rank, ℓ1 + TV by hand, ∂L/∂α ≠ 0, exact truncation,
heads found on transformers and diffusers attention, training through TrainingHooks and the variant optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.variants.ardlora import ARDLoRA, role, total_variation, truncate_to_lora

from .conftest import TOL, TinyNet, layer_and_input, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def _one(kind: str, rank: int = 4, **options):
    net, target, x = layer_and_input(kind)
    ld.add_adapter(net, ld.AdapterSpec("ardlora", rank=rank, alpha=2.0, targets=[target], seed=3, options=options))
    return net, net.get_submodule(target), x


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_alpha_one_equals_lora_at_rank_r0(kind):
    net, layer, x = _one(kind)
    ref, _, _ = layer_and_input(kind)
    target = "lin" if kind == "linear" else "conv"
    ld.add_adapter(ref, ld.AdapterSpec("lora", rank=4, alpha=2.0, targets=[target], seed=3))
    ard, lora = layer.adapters["default"], ref.get_submodule(target).adapters["default"]
    assert torch.equal(ard.lora_A, lora.lora_A)  # same init draws
    with torch.no_grad():
        lora.lora_B.normal_()
        ard.lora_B.copy_(lora.lora_B)
    assert torch.equal(ard.ard_alpha, torch.ones(1)) and torch.equal(ard.mask(), torch.ones(1, 4, dtype=x.dtype))
    assert torch.allclose(layer(x), ref.get_submodule(target)(x), atol=TOL[x.dtype], rtol=0)


def test_minimum_rank_is_enforced_after_each_step():
    net, layer, _ = _one("linear", rank=4, min_rank=2)
    ad = layer.adapters["default"]
    with torch.no_grad():
        ad.ard_alpha.fill_(-3.0)
    ld.TrainingHooks(net).after_step(1)
    assert ad.ard_alpha.item() == 0.5 and ad.ranks() == [2]
    with torch.no_grad():
        ad.ard_alpha.fill_(7.0)
    ld.TrainingHooks(net).after_step(2)
    assert ad.ard_alpha.item() == 1.0 and ad.ranks() == [4]
    with pytest.raises(ld.AdapterError, match="min_rank=5 must be <= rank=4"):
        _one("linear", rank=4, min_rank=5)


class _Blocks(nn.Module):
    """Two blocks with a 2-head q projection (head size 4) under a parent that says so."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(2):
            attn = nn.Module()
            attn.head_dim = 4
            attn.q_proj = nn.Linear(6, 8)
            attn.o_proj = nn.Linear(8, 6)
            self.layers.append(attn)

    def forward(self, x):
        for attn in self.layers:
            x = attn.o_proj(torch.tanh(attn.q_proj(x)))
        return x


def _blocks(**options):
    torch.manual_seed(0)
    net = _Blocks().double()
    ld.add_adapter(net, ld.AdapterSpec("ardlora", rank=3, targets=["q_proj", "o_proj"], options=options))
    return net


def test_heads_are_found_and_stored_in_the_spec():
    net = _blocks(l1=0.1, tv=0.5)
    spec = ld.get_spec(net)
    assert "head_dims" not in spec.options  # the user's spec is stored; loading resolves it again
    targets = {n: net.get_submodule(n) for n in ("layers.0.q_proj", "layers.0.o_proj", "layers.1.q_proj")}
    resolved = ARDLoRA.resolve_spec(net, spec, targets)
    assert resolved.options["head_dims"] == {"layers.0.q_proj": 4, "layers.1.q_proj": 4}  # o_proj: rows not per head
    q = net.layers[0].q_proj.adapters["default"]
    assert q.heads == 2 and q.lora_A.shape == (6, 6) and q.lora_B.shape == (8, 3)
    assert net.layers[0].o_proj.adapters["default"].heads == 1
    assert role("layers.0.q_proj") == role("layers.1.q_proj") == "layers.#.q_proj"
    none = _blocks(heads="none")
    assert all(a.heads == 1 for a in ld.TrainingHooks(none).adapters)


def test_diffusers_attention_heads_are_found():
    from diffusers.models.attention_processor import Attention

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(query_dim=16, heads=2, dim_head=8)

    m = M()
    ld.add_adapter(m, ld.AdapterSpec("ardlora", rank=2, targets=["to_q", "to_k", "to_v", "to_out.0"]))
    heads = {n: a.heads for n, a in zip(["to_q", "to_k", "to_v", "to_out.0"], ld.TrainingHooks(m).adapters)}
    assert heads == {"to_q": 2, "to_k": 2, "to_v": 2, "to_out.0": 1}


def test_l1_and_tv_match_hand_computation():
    net = _blocks(l1=0.1, tv=0.5)
    ads = ld.TrainingHooks(net).adapters  # model order: q0, o0, q1, o1
    vals = {"layers.0.q_proj": [0.9, 0.5], "layers.0.o_proj": [0.7], "layers.1.q_proj": [0.4, 0.6],
            "layers.1.o_proj": [1.0]}
    with torch.no_grad():
        for a in ads:
            a.ard_alpha.copy_(torch.tensor(vals[a.cfg.module_name]))
    l1 = 0.9 + 0.5 + 0.7 + 0.4 + 0.6 + 1.0
    tv = abs(0.5 - 0.9) + abs(0.6 - 0.4) + (abs(0.4 - 0.9) + abs(0.6 - 0.5)) + abs(1.0 - 0.7)
    assert total_variation(ads).item() == pytest.approx(tv)
    assert ld.TrainingHooks(net).regularization().item() == pytest.approx(0.1 * (l1 + 0.5 * tv))


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_gradient_reaches_alpha(alpha):
    net, layer, x = _one("linear", rank=4)
    perturb(net)
    ad = layer.adapters["default"]
    with torch.no_grad():
        ad.ard_alpha.fill_(alpha)
    layer(x).pow(2).sum().backward()
    assert ad.ard_alpha.grad is not None and ad.ard_alpha.grad.abs().item() > 0


def test_per_head_delta_is_the_block_structure():
    net = _blocks()
    perturb(net)
    q = net.layers[0].q_proj.adapters["default"]
    with torch.no_grad():
        q.ard_alpha.copy_(torch.tensor([1.0, 0.5]))
    m = q.mask()
    a, b = q.lora_A.view(2, 3, 6), q.lora_B.view(2, 4, 3)
    expected = torch.cat([b[h] @ torch.diag(m[h]) @ a[h] for h in range(2)]) * q.scaling
    assert torch.allclose(q.delta_weight(), expected, atol=1e-12)
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(q.delta_forward(x), x @ expected.T, atol=1e-12)


def test_truncation_is_exact_and_counts_the_kept_components(tmp_path):
    net = _blocks()
    perturb(net)
    ads = {a.cfg.module_name: a for a in ld.TrainingHooks(net).adapters}
    with torch.no_grad():  # r₀ = 3: head ranks ⌈3α⌉ = 3, 1 | 2 | 2, 3 | 1, with a fractional last component where 3α ∉ Z
        ads["layers.0.q_proj"].ard_alpha.copy_(torch.tensor([1.0, 0.2]))
        ads["layers.0.o_proj"].ard_alpha.fill_(2 / 3)
        ads["layers.1.q_proj"].ard_alpha.copy_(torch.tensor([0.5, 0.9]))
        ads["layers.1.o_proj"].ard_alpha.fill_(1 / 3)
    expected = {"layers.0.q_proj": [3, 1], "layers.0.o_proj": [2], "layers.1.q_proj": [2, 3], "layers.1.o_proj": [1]}
    assert {k: a.ranks() for k, a in ads.items()} == expected
    q = ads["layers.0.q_proj"]
    down, up, _ = q.lowrank_factors()
    assert down.shape == (4, 6) and up.shape == (8, 4)
    assert down.numel() + int((up != 0).sum()) == 4 * (6 + 4)  # Σ r_h·(in + d_head)
    x = torch.randn(7, 6, dtype=torch.float64)
    with torch.no_grad():
        y = net(x)
    ranks = truncate_to_lora(net)
    assert ranks == {k: sum(v) for k, v in expected.items()}
    assert ld.get_spec(net).variant == "lora" and ld.get_spec(net).rank_pattern == ranks
    with torch.no_grad():
        assert torch.allclose(net(x), y, atol=1e-12)
    path = ld.save_adapter(net, tmp_path / "plain.safetensors")
    fresh = _Blocks().double()
    ld.remove_adapters(net)
    fresh.load_state_dict(net.state_dict())
    ld.load_adapter(fresh, path)
    assert ld.get_spec(fresh, "plain").rank_pattern == ranks
    with torch.no_grad():
        assert torch.allclose(fresh(x), y, atol=1e-12)


def test_trains_with_hooks_and_its_optimizer():
    net = _blocks(l1=0.05)
    hooks = ld.TrainingHooks(net)
    groups = ld.param_groups(net, 1e-2, weight_decay=0.1)
    assert ld.variant_optimizer([net], groups, lr=1e-2, weight_decay=0.1) is None  # the trainer's own, α group set
    opt = torch.optim.AdamW(groups)
    lrs = {g["role"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert lrs["ard_scale"] == (0.1, 0.0) and lrs["A"] == (1e-2, 0.1)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64)
    losses = []
    for step in range(1, 31):
        hooks.begin_step(step)
        task = (net(x) - y).pow(2).mean()
        loss = task + hooks.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hooks.after_step(step)
        losses.append(task.item())
    alphas = torch.cat([a.ard_alpha for a in hooks.adapters])
    assert losses[-1] < losses[0] and bool((alphas < 1).any()) and bool((alphas >= 1 / 3).all())


def test_bad_options_are_refused():
    for opts, match in [({"heads": "some"}, "option heads"), ({"l1": -1}, "options l1"),
                        ({"head_dims": {"lin": 0}}, "option head_dims"), ({"head_dims": {"lin": 5}}, "does not divide")]:
        with pytest.raises(ld.AdapterError, match=match):
            ld.add_adapter(TinyNet(), ld.AdapterSpec("ardlora", rank=2, targets=["lin"], options=opts))
    assert ARDLoRA.paper.endswith("2506.18267")
