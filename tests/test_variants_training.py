"""Variants that change how training works (issue 14; variants.md §9-11, 13, 15) and the core mechanisms they use:
the optimizer-step counter in the per-call context, post-step hooks, regularization losses and variant optimizers,
all driven by ``training.loop.fit`` with no user code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.variants.lora import LoRA
from training.loop import LoopConfig, fit, make_accelerator

from .conftest import layer_and_input, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def one_layer(variant: str, kind: str = "linear", **spec_kw):
    net, target, x = layer_and_input(kind)
    ld.add_adapter(net, ld.AdapterSpec(variant=variant, targets=[target], **spec_kw))
    return net, net.get_submodule(target), x


class Regression:
    """Batches for ``net.lin``: x (4, 16) -> a fixed random target (4, 24)."""

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(0)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(4, 16, generator=self.gen, dtype=torch.float64)
        return x, torch.randn(4, 24, generator=self.gen, dtype=torch.float64)


def fit_lin(net: nn.Module, steps: int, opt: torch.optim.Optimizer | None = None, on_step=None):
    opt = opt or torch.optim.AdamW(ld.param_groups(net, 1e-2), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    hooks = [on_step] if on_step else []
    return fit(make_accelerator(cpu=True), net, opt, sched, Regression(),
               lambda b: nn.functional.mse_loss(net.lin(b[0]), b[1]), LoopConfig(steps, progress=False), 0, hooks)


# --- the core mechanisms ---
def test_loop_advances_step_counter_and_calls_post_step_and_regularization(monkeypatch):
    seen: list[tuple[str, int | None]] = []
    orig_forward = LoRA.delta_forward

    def delta_forward(self, x, ctx=None):
        seen.append(("forward", ctx.step))
        return orig_forward(self, x, ctx)

    def after_step(self, step):
        assert not torch.is_grad_enabled()
        seen.append(("after", step))

    monkeypatch.setattr(LoRA, "delta_forward", delta_forward)
    monkeypatch.setattr(LoRA, "after_step", after_step)
    monkeypatch.setattr(LoRA, "regularization", lambda self: 100.0 * self.lora_B.pow(2).sum())
    net, layer, _ = one_layer("lora", rank=2, dropout=0.1)  # dropout: the generic (non-addmm) path
    result = fit_lin(net, 3)
    assert seen == [("forward", 0), ("after", 1), ("forward", 1), ("after", 2), ("forward", 2), ("after", 3)]
    assert layer._holder.state.step == 3  # saving or sampling after training sees the final count
    # the regularization term is in the optimized (and reported) loss: B is pulled to 0 much harder than without it
    net2, layer2, _ = one_layer("lora", rank=2, dropout=0.1)
    monkeypatch.setattr(LoRA, "regularization", LoRA.__mro__[1].regularization)
    result2 = fit_lin(net2, 3)
    assert result.losses[0] == pytest.approx(result2.losses[0])  # B = 0 at step 1: no penalty yet
    assert layer.adapters["default"].lora_B.norm() < layer2.adapters["default"].lora_B.norm()


def test_variant_optimizer_is_none_for_plain_variants():
    net, _, _ = one_layer("lora", rank=2)
    assert ld.variant_optimizer([net], ld.param_groups(net, 1e-3), lr=1e-3) is None


# --- SingLoRA (§9) ---
def test_singlora_square_delta_is_symmetric_psd_and_count():
    lin = nn.Linear(12, 12).double()
    net = nn.Sequential(lin)
    ld.add_adapter(net, ld.AdapterSpec("singlora", rank=3, alpha=6, targets=["0"]))
    ad = net[0].adapters["default"]
    dw = ad.delta_weight()
    assert torch.equal(dw, dw.T) and torch.linalg.eigvalsh(dw).min() >= -1e-12
    assert torch.linalg.matrix_rank(dw) == 3
    assert sum(p.numel() for p in ad.parameters()) == 12 * 3  # d·r, half of LoRA's 2·d·r


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_singlora_nonsquare_is_top_left_block_of_aat(kind):
    net, layer, _ = one_layer("singlora", kind, rank=2, alpha=4)
    ad = layer.adapters["default"]
    a = ad.lora_A  # (d_max, r)
    out, fan_in = layer.info.out_features, layer.info.fan_in
    assert a.shape == (max(out, fan_in), 2)
    full = (a @ a.T) * 2.0  # alpha / r = 2
    dw = ad.delta_weight().reshape(out, fan_in)
    assert torch.allclose(dw, full[:out, :fan_in], atol=1e-12)
    d = min(out, fan_in)
    assert torch.allclose(dw[:d, :d], dw[:d, :d].T, atol=1e-12)


def test_singlora_ramp_follows_step_and_is_identity_at_step_0():
    net, layer, x = one_layer("singlora", rank=2, options={"ramp_steps": 4})
    ad = layer.adapters["default"]
    base = layer.base_layer(x)
    full = None
    ld.set_context(net, step=None)
    full = layer(x) - base
    for t, u in [(0, 0.0), (1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)]:
        ld.set_context(net, step=t)
        assert ad.ramp(layer._holder.current()) == u
        y = layer(x)
        if t == 0:
            assert torch.equal(y, base)
        assert torch.allclose(y - base, u * full, atol=1e-12)
    ld.set_context(net, step=7)  # after the ramp: merged == unmerged
    y = layer(x)
    ld.merge_adapters(net)
    assert torch.allclose(layer(x), y, atol=1e-12)


def test_singlora_trains_through_the_loop_with_no_user_code():
    net, layer, _ = one_layer("singlora", rank=2, options={"ramp_steps": 2})
    a0 = layer.adapters["default"].lora_A.detach().clone()
    fit_lin(net, 1)
    assert torch.equal(layer.adapters["default"].lora_A, a0)  # step 1 runs at u(0) = 0: no gradient, no move
    net, layer, _ = one_layer("singlora", rank=2, options={"ramp_steps": 2})
    fit_lin(net, 3)
    assert not torch.equal(layer.adapters["default"].lora_A, a0)
    assert layer._holder.state.step == 3


def test_singlora_bad_options_refused_before_anything_is_built():
    net, target, _ = layer_and_input("linear")
    with pytest.raises(ld.AdapterError, match="ramp_steps"):
        ld.add_adapter(net, ld.AdapterSpec("singlora", rank=2, targets=[target], options={"ramp_steps": 0}))
    assert not isinstance(net.get_submodule(target), ld.AdaptedLayer)


def test_singlora_save_load_keeps_a_and_runs_at_full_ramp(tmp_path):
    net, layer, x = one_layer("singlora", rank=2)
    perturb(net)
    path = ld.save_adapter(net, tmp_path / "s.safetensors")
    fresh, target, _ = layer_and_input("linear")
    ld.load_adapter(fresh, path)
    ld.set_context(net, step=None)
    assert torch.equal(fresh.lin(x), layer(x))


# --- LoRA-FA (§10) ---
def test_lorafa_a_is_bitwise_frozen_and_only_b_trains():
    net, layer, _ = one_layer("lorafa", rank=2, alpha=4)
    ad = layer.adapters["default"]
    a0 = ad.lora_A.clone()
    assert [n for n, _ in ad.named_parameters()] == ["lora_B"] and "lora_A" in ad.state_dict()
    opt = ld.variant_optimizer([net], ld.param_groups(net, 1e-2), lr=1e-2)
    assert type(opt).__name__ == "LoraFAOptimizer"
    fit_lin(net, 3, opt)
    assert torch.equal(ad.lora_A, a0) and ad.lora_A.grad is None
    assert ad.lora_B.abs().sum() > 0


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_lorafa_projection_is_least_squares_fit_of_the_full_gradient(kind):
    from lora_diffusion.variants.lorafa import project_grad

    net, layer, x = one_layer("lorafa", kind, rank=2, alpha=6)
    perturb(net)
    ad = layer.adapters["default"]
    layer.base_layer.weight.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    g_full = layer.base_layer.weight.grad.reshape(layer.info.out_features, -1)  # ∂L/∂W (out, fan_in)
    a = ad.lora_A.reshape(2, -1)
    g = project_grad(ad.lora_B.grad, ad.lora_A, ad.scaling).reshape(-1, 2)
    # s·g̃·A is ∂L/∂W projected onto A's row space
    assert torch.allclose(ad.scaling * g @ a, g_full @ torch.linalg.pinv(a) @ a, atol=1e-8)
    q = torch.linalg.qr(torch.randn(a.shape[1], 2, dtype=a.dtype)).Q.T  # orthonormal rows, s = 1: identity
    gb = torch.randn(5, 2, dtype=a.dtype)
    assert torch.allclose(project_grad(gb, q, 1.0), gb, atol=1e-7)


def test_lorafa_backward_keeps_the_rank_r_activation_not_the_input():
    sizes = {}
    for variant in ("lora", "lorafa"):
        net, layer, _ = one_layer(variant, rank=2)
        x = torch.randn(64, 16, dtype=torch.float64)
        saved: list[int] = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        sizes[variant] = saved
    assert x.numel() in sizes["lora"] and x.numel() not in sizes["lorafa"]
    assert sum(sizes["lorafa"]) < sum(sizes["lora"]) / 2


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lorafa_parity_with_peft_create_lorafa_optimizer(weight_decay):
    """Same A, B, data in fp64: PEFT's LoraFAOptimizer and ours give the same B and outputs step by step."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_lorafa_optimizer

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24)).double()
    import copy

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=6, target_modules=["0"]))
    ours = copy.deepcopy(base)
    ld.add_adapter(ours, ld.AdapterSpec("lorafa", rank=4, alpha=6, targets=["0"]))
    ad = ours[0].adapters["default"]
    with torch.no_grad():
        ad.lora_A.copy_(pm.base_model.model[0].lora_A["default"].weight)
    popt = create_lorafa_optimizer(pm, r=4, lora_alpha=6, lr=1e-2, weight_decay=weight_decay)
    oopt = ld.variant_optimizer([ours], ld.param_groups(ours, 1e-2, weight_decay=weight_decay), lr=1e-2,
                                betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(8, 16, generator=gen, dtype=torch.float64), torch.randn(8, 24, generator=gen, dtype=torch.float64)
        for model, opt in ((pm, popt), (ours, oopt)):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        pb = pm.base_model.model[0].lora_B["default"].weight
        assert torch.allclose(ad.lora_B, pb, rtol=1e-9, atol=1e-12)
        assert torch.allclose(ours(x), pm(x), rtol=1e-9, atol=1e-12)
    assert pb.abs().sum() > 0


# --- DyLoRA (§13) ---
def _dylora(kind: str = "linear", rank: int = 8, alpha: float = 4.0, **options):
    net, layer, x = one_layer("dylora", kind, rank=rank, alpha=alpha, options=options)
    perturb(net)
    return net, layer, layer.adapters["default"], x


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dylora_truncation_and_scale(kind):
    net, layer, ad, x = _dylora(kind, rank=6)
    for b in (1, 3, 6):
        ad.set_inference_rank(b)
        a, up = ad.lora_A.flatten(1)[:b], ad.lora_B.flatten(1)[:, :b]
        expected = (4.0 / b) * (up @ a)  # scale α/b
        assert torch.allclose(ad.delta_weight().flatten(1), expected, atol=1e-12)
        y = layer(x)
        saved = ad.lora_A.detach().clone(), ad.lora_B.detach().clone()
        with torch.no_grad():  # rows/columns above b change nothing
            ad.lora_A[b:] += 1.0
            ad.lora_B[:, b:] += 1.0
        assert torch.equal(layer(x), y)
        with torch.no_grad():
            ad.lora_A.copy_(saved[0])
            ad.lora_B.copy_(saved[1])


@pytest.mark.parametrize("mode", ["frozen", "all"])
def test_dylora_training_gradients_reach_only_the_sampled_block(mode):
    from lora_diffusion.variants.dylora import sampled_rank

    net, layer, ad, x = _dylora(rank=8, block_size=2, mode=mode)
    step = next(s for s in range(100) if sampled_rank(0, s, 8, 2) == 6)
    ld.set_context(net, step=step)
    assert ad.rank_for(layer._holder.current()) == 6
    layer(x).pow(2).sum().backward()
    ga = ad.lora_A.grad.abs().sum(dim=1)  # per row
    assert torch.all(ga[6:] == 0) and torch.all(ga[4:6] > 0)
    assert torch.all(ga[:4] == 0) if mode == "frozen" else torch.all(ga[:4] > 0)
    gb = ad.lora_B.grad.abs().sum(dim=0)
    assert torch.all(gb[6:] == 0) and (torch.all(gb[:4] == 0) if mode == "frozen" else torch.all(gb[:4] > 0))


def test_dylora_sampled_ranks_are_uniform_and_shared_by_all_layers():
    from lora_diffusion.variants.dylora import sampled_rank

    counts = torch.bincount(torch.tensor([sampled_rank(3, s, 8, 2) for s in range(4000)]), minlength=9)
    assert counts[[1, 3, 5, 7]].sum() == 0 and counts[[2, 4, 6, 8]].min() > 900  # 1000 each expected


def test_dylora_export_at_rank_b_is_a_plain_lora_with_the_truncated_output(tmp_path):
    net, layer, ad, x = _dylora(rank=8, alpha=4.0, inference_rank=3)
    y = layer(x)
    path = ld.save_adapter(net, tmp_path / "k", format="peft")  # external formats get a plain LoRA of rank b
    fresh, _, _ = layer_and_input("linear")
    ld.load_adapter(fresh, path)
    assert ld.get_spec(fresh, "k").variant == "lora" and ld.get_spec(fresh, "k").rank == 3
    assert torch.allclose(fresh.lin(x), y, atol=1e-12)


def test_dylora_rank_not_multiple_of_block_is_refused_before_anything_is_built():
    net, target, _ = layer_and_input("linear")
    with pytest.raises(ld.AdapterError, match="module 'lin'.*rank.*6.*block_size=4"):
        ld.add_adapter(net, ld.AdapterSpec("dylora", rank=6, targets=[target], options={"block_size": 4}))
    assert not isinstance(net.get_submodule(target), ld.AdaptedLayer)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dylora_parity_with_lycoris_at_several_ranks(kind):
    """LyCORIS' DyLoraModule with alpha a at k blocks (get_weight(rank=(k-1)·block)) equals ours with α = a·block
    at b = k·block (its scale is alpha / blocks): ΔW, and the gradients of the one trainable block."""
    from lycoris.modules.dylora import DyLoraModule

    from lora_diffusion.variants.dylora import sampled_rank

    bs, r, a_l = 2, 6, 3.0
    net, layer, ad, x = _dylora(kind, rank=r, alpha=a_l * bs, block_size=bs)
    ly = DyLoraModule("m", layer.base_layer, lora_dim=r, alpha=a_l, block_size=bs).double()
    with torch.no_grad():
        for i in range(r // bs):
            ly.down_list[i].copy_(ad.lora_A[i * bs:(i + 1) * bs].reshape(bs, -1))
            ly.up_list[i].copy_(ad.lora_B[:, i * bs:(i + 1) * bs].reshape(-1, bs))
    for k in range(1, r // bs + 1):
        theirs, _ = ly.get_diff_weight(rank=(k - 1) * bs)
        step = next(s for s in range(200) if sampled_rank(0, s, r, bs) == k * bs)
        ld.set_context(net, step=step)
        ours = ad.delta_weight(layer._holder.current())
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-14)
        g = torch.randn(ours.shape, dtype=ours.dtype, generator=torch.Generator().manual_seed(k))
        ad.zero_grad()
        ly.zero_grad()
        (ours * g).sum().backward()
        (theirs * g).sum().backward()
        sl = slice((k - 1) * bs, k * bs)
        assert torch.allclose(ad.lora_A.grad[sl].reshape(bs, -1), ly.down_list[k - 1].grad, rtol=1e-12, atol=1e-14)
        assert torch.allclose(ad.lora_B.grad[:, sl].reshape(-1, bs), ly.up_list[k - 1].grad, rtol=1e-12, atol=1e-14)


# --- Delta-LoRA (§11) ---
def test_deltalora_matches_the_in_place_rule_step_by_step_fp64():
    """Reference: the paper's algorithm written out (W a tensor updated in place after each step t > K)."""
    lam, K, steps = 0.7, 2, 5
    net, layer, _ = one_layer("deltalora", rank=2, alpha=3, options={"update_ratio": lam, "start_step": K})
    ad = layer.adapters["default"]
    s = ad.scaling
    w = layer.base_layer.weight.detach().clone()
    bias = layer.base_layer.bias.detach()
    a, b = ad.lora_A.detach().clone().requires_grad_(), ad.lora_B.detach().clone().requires_grad_()
    ref_opt = torch.optim.AdamW([a, b], lr=1e-2, weight_decay=0.0)  # as ld.param_groups
    data = Regression()
    seen = []
    fit_lin(net, steps, on_step=lambda st, logs: seen.append((st, ad.base_update().clone(), ad.lora_A.detach().clone())))
    for t in range(1, steps + 1):
        x, y = data.next_batch()
        out = nn.functional.linear(x, w, bias) + s * (x @ a.T @ b.T)
        nn.functional.mse_loss(out, y).backward()
        before = (b @ a).detach()
        ref_opt.step()
        ref_opt.zero_grad()
        if t > K:
            w += lam * s * ((b @ a).detach() - before)
        st, moved, a_ours = seen[t - 1]
        assert st == t and torch.allclose(a_ours, a, atol=1e-12)
        w_ours = layer.base_layer.weight + moved
        assert torch.allclose(w_ours, w, atol=1e-12)
        if t <= K:
            assert torch.equal(moved, torch.zeros_like(moved))  # W untouched while t <= K
    assert (w - layer.base_layer.weight).abs().max() > 1e-4  # W did move after K
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


def test_deltalora_dropout_is_refused_before_anything_is_built():
    net, target, _ = layer_and_input("linear")
    with pytest.raises(ld.AdapterError, match="module 'lin': variant 'deltalora' needs dropout = 0"):
        ld.add_adapter(net, ld.AdapterSpec("deltalora", rank=2, dropout=0.1, targets=[target]))
    assert not isinstance(net.get_submodule(target), ld.AdaptedLayer)


def test_deltalora_checkpoint_carries_the_snapshot_and_export_is_exact(tmp_path):
    from training.checkpoint import TrainableParams

    net, layer, x = one_layer("deltalora", rank=2, options={"update_ratio": 0.5, "start_step": 1})
    fit_lin(net, 3)
    keys = set(TrainableParams(net).state_dict())
    assert keys == {f"lin.adapters.default.{k}" for k in ("lora_A", "lora_B", "lora_A_K", "lora_B_K")}
    y = layer(x)
    path = ld.save_adapter(net, tmp_path / "p", format="peft")  # external formats: a plain LoRA of rank 2r
    fresh, _, _ = layer_and_input("linear")
    ld.load_adapter(fresh, path)
    assert ld.get_spec(fresh, "p").rank == 4 and torch.allclose(fresh.lin(x), y, atol=1e-12)


# --- AdaLoRA (§15) ---
class _Out:
    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 12), nn.Linear(12, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> _Out:
        return _Out(nn.functional.mse_loss(self.b(torch.tanh(self.a(x))), y))


class _ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6 * 16, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> _Out:
        return _Out(nn.functional.mse_loss(self.b(torch.tanh(self.a(x)).flatten(1)), y))


def test_adalora_budget_schedule():
    from lora_diffusion.variants.adalora import budget_schedule

    kw = dict(init_budget=24, target_budget=8, total_step=20, tinit=2, tfinal=4, delta_t=1)
    assert budget_schedule(2, **kw) == (24, False)
    assert budget_schedule(9, **kw)[0] == int(8 + 16 / 8)  # midpoint: b_T + (b_init − b_T)/8
    assert budget_schedule(16, **kw)[0] == 8 and budget_schedule(17, **kw) == (8, True)


@pytest.mark.parametrize("net_cls,x_shape", [(_TwoLinears, (6, 16)), (_ConvLinear, (6, 4, 4, 4))],
                         ids=["linear", "conv2d"])
def test_adalora_parity_with_peft_over_a_short_run(net_cls, x_shape):
    """PEFT's AdaLoraModel and ours from the same weights and data in fp64: losses (with the orthogonality penalty),
    λ masks (counts equal the budget) and all tensors, step by step through the warm-up, budget and final phases."""
    peft = pytest.importorskip("peft")
    import copy

    torch.manual_seed(0)
    base = net_cls().double()
    opts = dict(total_step=8, target_rank=2, tinit=1, tfinal=3, delta_t=1, orth_reg_weight=0.5)
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=8, tinit=1, tfinal=3, deltaT=1,
                             orth_reg_weight=0.5, target_modules=["a", "b"])
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).double()
    ours = copy.deepcopy(base)
    ld.add_adapter(ours, ld.AdapterSpec("adalora", rank=4, alpha=8, targets=["a", "b"], options=opts))
    theirs = {m: getattr(pm.base_model.model, m) for m in ("a", "b")}
    for layer in theirs.values():
        layer.ranknum["default"].requires_grad_(False)  # .double() left PEFT's frozen ranknum trainable
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m, layer in theirs.items():
            ad = getattr(ours, m).adapters["default"]
            layer.lora_E["default"].copy_(torch.randn(4, 1, generator=gen, dtype=torch.float64))
            for n in ("lora_A", "lora_E", "lora_B"):
                getattr(ad, n).copy_(getattr(layer, n)["default"])
    popt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    oopt = torch.optim.AdamW(ld.param_groups(ours, 1e-2), lr=1e-2)
    hooks = ld.TrainingHooks(ours)
    for t in range(1, 11):
        x, y = torch.randn(x_shape, generator=gen, dtype=torch.float64), torch.randn(6, 8, generator=gen, dtype=torch.float64)
        ploss = pm.base_model(x, y).loss  # AdaLoraModel.forward adds the penalty (PeftModel's skips it here)
        ploss.backward()
        popt.step()
        pm.base_model.update_and_allocate(t)
        popt.zero_grad()
        hooks.begin_step(t)
        oloss = ours(x, y).loss + hooks.regularization()
        oloss.backward()
        oopt.step()
        hooks.after_step(t)
        oopt.zero_grad()
        assert oloss.item() == pytest.approx(ploss.item(), rel=1e-10)
        for m, layer in theirs.items():
            ad = getattr(ours, m).adapters["default"]
            for n in ("lora_A", "lora_E", "lora_B"):
                assert torch.allclose(getattr(ad, n), getattr(layer, n)["default"], rtol=1e-8, atol=1e-10), (t, m, n)
            assert torch.equal(ad.lora_E == 0, layer.lora_E["default"] == 0), (t, m)
        if t >= 5:  # from the final phase on: the target budget, 2 per module on average
            assert sum(getattr(ours, m).adapters["default"].allocated_rank() for m in "ab") == 4


def test_adalora_without_total_step_is_refused_when_training_starts():
    net, layer, _ = one_layer("adalora", rank=4)  # fine for inference and loading
    with pytest.raises(ld.AdapterError, match="module 'lin': AdaLoRA option total_step is not set"):
        fit_lin(net, 1)
    assert layer._holder.state.step is None  # nothing ran


def test_adalora_orth_penalty_zero_for_orthonormal_factors():
    net, layer, _ = one_layer("adalora", rank=4, options={"total_step": 10})
    ad = layer.adapters["default"]
    hooks = ld.TrainingHooks(net)
    assert hooks.regularization() > 0
    with torch.no_grad():
        ad.lora_A.copy_(torch.linalg.qr(torch.randn(16, 4, dtype=torch.float64)).Q.T)
        ad.lora_B.copy_(torch.linalg.qr(torch.randn(24, 4, dtype=torch.float64)).Q)
    assert hooks.regularization() < 1e-12


def test_adalora_allocated_ranks_shown_by_convert_inspect(tmp_path):
    from lora_diffusion.io.library import describe

    net, layer, _ = one_layer("adalora", rank=4, options={"total_step": 10})
    with torch.no_grad():
        layer.adapters["default"].lora_E.copy_(torch.tensor([[1.0], [0.0], [2.0], [0.0]]))
    info = describe(ld.save_adapter(net, tmp_path / "a.safetensors"))
    assert info["allocated_ranks"] == {"total": 2, "per_module": {"lin": 2}}


@pytest.mark.parametrize("variant,options", [("adalora", {"total_step": 6, "target_rank": 2, "tinit": 1, "tfinal": 2}),
                                             ("deltalora", {"start_step": 1})])
def test_resume_from_a_checkpoint_retraces_the_run(variant, options):
    """Training state beyond parameters (AdaLoRA's importance EMAs and mask, Delta-LoRA's snapshot) is checkpointed:
    3 steps, checkpoint, a fresh model resumed for 3 more equals 6 uninterrupted steps bitwise."""
    from training.checkpoint import TrainableParams

    def build():
        net, layer, _ = one_layer(variant, rank=4, options=options)
        return net, torch.optim.AdamW(ld.param_groups(net, 1e-2), lr=1e-2), ld.TrainingHooks(net)

    def steps(net, opt, hooks, data, ts):
        for t in ts:
            x, y = data.next_batch()
            hooks.begin_step(t)
            loss = nn.functional.mse_loss(net.lin(x), y)
            reg = hooks.regularization()
            (loss if reg is None else loss + reg).backward()
            opt.step()
            hooks.after_step(t)
            opt.zero_grad()

    full = build()
    data = Regression()
    steps(*full, data, range(1, 7))
    first = build()
    data = Regression()
    steps(*first, data, range(1, 4))
    saved = TrainableParams(first[0]).state_dict(), first[1].state_dict()
    second = build()
    TrainableParams(second[0]).load_state_dict(saved[0])
    second[1].load_state_dict(saved[1])
    steps(*second, data, range(4, 7))
    a, b = TrainableParams(full[0]).state_dict(), TrainableParams(second[0]).state_dict()
    assert len(a) > 2 and all(torch.equal(a[k], b[k]) for k in a)
