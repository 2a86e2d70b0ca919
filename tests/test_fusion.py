"""Fusion methods: the gated formula's limits (gates 1 = plain LoRA, gates 0 = base), static = diffusers
``set_adapters`` on the same files, K-LoRA's choice on a constructed case, schedules, registry-wide behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_diffusion as ld
from lora_diffusion.core.errors import AdapterError
from lora_diffusion.fusion import FUSION_METHODS, fuse, unfuse
from lora_diffusion.fusion.klora import gamma
from lora_diffusion.inject.walker import adapted_layers

from .conftest import perturb
from .test_formats_helpers import close, sd15_pipeline, sd15_unet_config, unet_call

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet_with(n: int, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15_unet_config()).eval()
    for i in range(n):
        ld.add_adapter(unet, ld.AdapterSpec(rank=4, alpha=4, targets="unet-full", seed=i), f"a{i}", trainable=False)
        perturb(unet, f"a{i}", std=0.3, seed=seed + i)
    return unet


def _set_gate(fusion, b: float, w_out: float = 1.0) -> None:
    with torch.no_grad():
        for c in fusion.combiners.values():
            c.b.fill_(b)
            c.w_out.fill_(w_out)


@pytest.fixture(params=[False, True], ids=["eager", "fused"])
def gate_options(request, monkeypatch):
    """Gated fusion options for both paths: the in-place eager one and the fused one (``compile=True``; its
    formula ``gate_sum`` runs uncompiled here, test_compiled_gate_equals_the_formula compiles it)."""
    if request.param:
        from lora_diffusion.fusion import gated

        monkeypatch.setitem(gated._COMPILED, "gate_sum", gated.gate_sum)
    return {"compile": request.param}


def test_gated_one_lora_gates_one_equals_plain_lora(gate_options):
    unet = _unet_with(1)
    ld.set_adapters(unet, ["a0"])
    plain = unet_call(unet)
    f = fuse(unet, ["a0"], method="gated", **gate_options)
    _set_gate(f, math.inf)  # sigmoid(inf) = 1 exactly
    assert close(unet_call(unet), plain, 1e-5)
    f.remove()
    assert torch.equal(unet_call(unet), plain)


def test_gated_all_gates_zero_is_the_base_model(gate_options):
    unet = _unet_with(2)
    ld.disable_adapters(unet)
    base = unet_call(unet)
    f = fuse(unet, ["a0", "a1"], method="gated", **gate_options)
    _set_gate(f, -math.inf)
    assert torch.equal(unet_call(unet), base)


def test_untrained_gate_is_the_static_sum_at_weight_one(gate_options):
    unet = _unet_with(2)
    fuse(unet, ["a0", "a1"], method="static")
    static = unet_call(unet)
    fuse(unet, ["a0", "a1"], method="gated", **gate_options)  # replaces the static fusion
    assert close(unet_call(unet), static, 1e-5)
    assert not torch.equal(static, unet_call(_unet_with(0)))


def test_static_equals_diffusers_set_adapters_with_the_same_files(tmp_path):
    src = sd15_pipeline()
    for i in range(2):
        ld.add_adapter(src.unet, ld.AdapterSpec(rank=4, alpha=2 + i, targets="unet-full", seed=i), f"l{i}")
        perturb(src.unet, f"l{i}", std=0.2, seed=i)
        ld.save_adapter(src, tmp_path / f"l{i}.safetensors", f"l{i}", format="diffusers")
    ref = sd15_pipeline()
    for i in range(2):
        ref.load_lora_weights(str(tmp_path / f"l{i}.safetensors"), adapter_name=f"l{i}")
    ref.set_adapters(["l0", "l1"], [0.7, 0.4])
    ours = sd15_pipeline()
    for i in range(2):
        ld.load_adapter(ours, tmp_path / f"l{i}.safetensors", name=f"l{i}")
    fuse(ours, ["l0", "l1"], method="static", weights=[0.7, 0.4])
    expected = unet_call(ref.unet)
    assert close(unet_call(ours.unet), expected)
    fused = fuse(ours, ["l0", "l1"], method="static", weights=[0.7, 0.4], fuse=True)
    assert close(unet_call(ours.unet), expected, 1e-4)
    fused.remove()  # unfuse exactly
    fuse(ours, ["l0", "l1"], method="static", weights=[0.7, 0.4])
    assert close(unet_call(ours.unet), expected)



class _Ops(TorchDispatchMode):
    """Every aten op a forward runs, in order (name, output shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((str(func), tuple(out.shape) if isinstance(out, torch.Tensor) else ()))
        return out


def _ops(unet) -> tuple[torch.Tensor, list]:
    with _Ops() as rec:
        out = unet_call(unet)
    return out, rec.ops


def _merged_by_hand(unet, weights: dict[str, float]):
    """A plain UNet (no wrappers) with W + Σ_i w_i (α_i/r) B_i A_i written into each adapted layer's weight."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    plain = UNet2DConditionModel(**sd15_unet_config()).eval()
    with torch.no_grad():
        for path, layer in adapted_layers(unet):
            w = plain.get_submodule(path).weight
            for n, wi in weights.items():
                ad = layer.adapters[n]
                w += wi * ad.scaling * (ad.lora_B.flatten(1) @ ad.lora_A.flatten(1)).view(w.shape)
    return plain


def test_fused_static_runs_exactly_the_base_models_ops():
    """fuse=True: the layers' forward is the base module's own call and a UNet call runs the same aten ops, in the
    same order and shapes, as a plain UNet (no adapters, no wrappers) with the weights merged by hand, and gives
    its output; no hook is added anywhere. What makes "fused = base speed" hold by construction (per call, the
    wrapper adds one attribute lookup and module dispatch per adapted layer, no tensor op)."""
    unet, weights = _unet_with(2), {"a0": 0.7, "a1": 0.4}
    hand = _merged_by_hand(unet, weights)
    hand_out, hand_ops = _ops(hand)
    fuse(unet, list(weights), "static", weights=list(weights.values()))
    static_out, static_ops = _ops(unet)
    fusion = fuse(unet, list(weights), "static", weights=list(weights.values()), fuse=True)
    fused_out, fused_ops = _ops(unet)
    layers = dict(adapted_layers(unet))
    assert len(layers) > 10 and all(layer.forward == layer.base_layer.__call__ for layer in layers.values())
    assert fused_ops == hand_ops and static_ops != hand_ops  # the recorder sees the LoRAs' ops when they run
    assert close(fused_out, hand_out, 1e-5) and close(static_out, hand_out, 1e-5)
    hooked = [n for n, m in unet.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == [n for n, m in hand.named_modules() if m._forward_hooks or m._forward_pre_hooks] == []
    fusion.remove()  # unfused: the adapters run beside the base layers again
    assert not any("forward" in layer.__dict__ for layer in layers.values())
    assert torch.equal(unet_call(unet), static_out)
    ld.disable_adapters(unet)  # disabled: the base model's ops again
    assert _ops(unet)[1] == hand_ops
    layer = next(iter(layers.values()))
    layer.forward = foreign = layer.base_layer.forward  # set by other code (a hook library): left alone
    ld.set_adapters(unet, ["a0"])
    assert layer.__dict__["forward"] is foreign


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_follows_fusing_unfusing_and_disabling(backend):
    """torch.compile of an adapted model sees the switch between the base module's call (fused, disabled) and the
    adapters' sum (guards on the layer's state): each state gives the eager output."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Two()
    ld.add_adapter(model, ld.AdapterSpec(rank=2, targets=["l1", "l2"]), "a", trainable=False)
    perturb(model, "a", std=0.5)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    seen = []
    for state in ("static", "fused", "unfused", "disabled", "static"):
        if state in ("static", "fused"):
            fuse(model, ["a"], "static", fuse=state == "fused")
        elif state == "unfused":
            unfuse(model)
        else:
            ld.disable_adapters(model)
        with torch.no_grad():
            eager, comp = model(x), compiled(x)
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6, msg=lambda m, s=state: f"{s}: {m}")
        seen.append(eager)
    assert torch.allclose(seen[0], seen[1], atol=1e-6) and not torch.allclose(seen[0], seen[3])

class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return torch.cat([self.l1(x), self.l2(x)], -1)


def _set_lora(model, name, layer, a, b):
    ad = getattr(model, layer).adapters[name]
    with torch.no_grad():
        ad.lora_A.copy_(torch.tensor(a))
        ad.lora_B.copy_(torch.tensor(b))


def test_klora_picks_per_its_formula_on_a_constructed_case():
    """Rank 1, so k = 1 and S = max |ΔW|. Layer 1: subject ΔW twice the style's; layer 2: equal.
    γ = mean(2, 1) = 1.5, ratios S_c/(γ S_s): 1.333 and 0.667; s(t) = 1.5 (1 - t/T) + 0.5."""
    torch.manual_seed(0)
    m = Two()
    for n in ("c", "s"):
        ld.add_adapter(m, ld.AdapterSpec(rank=1, alpha=1, targets=["l1", "l2"]), n, trainable=False)
    _set_lora(m, "c", "l1", [[1.0, 0.0, 0.0]], [[2.0], [0.0]])  # ΔW_c,1 = 2 e11
    _set_lora(m, "s", "l1", [[0.0, 1.0, 0.0]], [[0.0], [1.0]])  # ΔW_s,1 = e22
    _set_lora(m, "c", "l2", [[0.0, 0.0, 1.0]], [[1.0], [0.0]])
    _set_lora(m, "s", "l2", [[1.0, 0.0, 0.0]], [[0.0], [-1.0]])
    x = torch.tensor([[1.0, 2.0, 3.0]])
    with torch.no_grad():
        base = torch.cat([m.l1.base_layer(x), m.l2.base_layer(x)], -1)
    dc = torch.tensor([[2.0, 0.0, 3.0, 0.0]])  # subject's contribution to (l1, l2) outputs
    ds = torch.tensor([[0.0, 2.0, 0.0, -1.0]])
    f = fuse(m, ["c", "s"], method="klora", roles={"c": "subject", "s": "style"})
    assert f.method.gamma == pytest.approx(1.5)
    f.record()
    for t, use_c in ((1000, (1, 1)), (500, (1, 0)), (0, (0, 0))):  # s = 0.5, 1.25, 2.0
        with ld.timestep(m, t, 1000), torch.no_grad():
            out = m(x)
        pick = torch.tensor([[use_c[0]] * 2 + [use_c[1]] * 2], dtype=torch.float32)
        assert torch.allclose(out, base + pick * dc + (1 - pick) * ds), t
    st = f.stats()
    assert st.timesteps == [1000.0, 500.0, 0.0] and st.strength[:, :, 0].tolist() == [[1, 1, 0], [1, 0, 0]]


def test_klora_gamma_drops_outlier_ratios():
    one = torch.ones(2, 2)
    assert gamma([(one, one)] * 3 + [(100 * one, one)]) == pytest.approx(1.0)


def test_scheduled_subject_early_style_late():
    unet = _unet_with(2)
    ld.set_adapters(unet, ["a0"])
    only0 = unet_call(unet)
    ld.set_adapters(unet, ["a1"])
    only1 = unet_call(unet)
    fuse(unet, ["a0", "a1"], method="scheduled", roles={"a0": "subject", "a1": "style"}, width=0.2)
    with ld.timestep(unet, 999, 1000):  # p ~ 0: the subject alone
        assert close(unet_call(unet), only0, 1e-5)
    with ld.timestep(unet, 0, 1000):  # p = 1: the style alone
        assert close(unet_call(unet), only1, 1e-5)


@pytest.mark.parametrize("method", [m for m, c in FUSION_METHODS.items() if "diffusion" in c.models])
def test_every_method_runs_records_and_removes(method):
    unet = _unet_with(2)
    ld.set_adapters(unet, ["a0", "a1"])
    plain = unet_call(unet)
    f = fuse(unet, ["a0", "a1"], method=method)
    f.record()
    for t in (900, 100):
        with ld.timestep(unet, t, 1000):
            assert torch.isfinite(unet_call(unet)).all()
    st = f.stats()
    if f.combiners:
        assert st.strength.shape == (len(f.combiners), 2, 2) and st.timesteps == [900.0, 100.0]
        assert set(st.per_timestep()) == {"a0", "a1"}
    unfuse(unet)
    assert torch.equal(unet_call(unet), plain)


def test_bad_fusion_requests_are_named():
    unet = _unet_with(2)
    with pytest.raises(AdapterError, match="unknown fusion method 'nope'"):
        fuse(unet, ["a0"], method="nope")
    with pytest.raises(AdapterError, match="unknown option.*'bogus'"):
        fuse(unet, ["a0"], method="gated", bogus=1)
    with pytest.raises(AdapterError, match="one subject and one style"):
        fuse(unet, ["a0", "a1"], method="klora", roles={"a0": "subject", "a1": "subject"})
    with pytest.raises(AdapterError, match="no adapter named"):
        fuse(unet, ["zz"], method="static")
    fuse(unet, ["a0", "a1"], method="klora")
    with pytest.raises(AdapterError, match="needs the timestep"):
        unet_call(unet)


@pytest.mark.parametrize("method", ["gated", "klora", "scheduled"])
def test_half_precision_model_keeps_its_dtype(method):
    unet = _unet_with(2).to(torch.bfloat16)
    fuse(unet, ["a0", "a1"], method=method)
    g = torch.Generator().manual_seed(0)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    with ld.timestep(unet, torch.tensor([700, 700]), 1000), torch.no_grad():
        out = unet(x.bfloat16(), 700, enc.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_timestep_methods_leave_text_encoders_to_the_plain_sum(tmp_path):
    from .test_formats_helpers import te_call

    pipe = sd15_pipeline()
    for i in range(2):
        ld.add_adapter(pipe.text_encoder, ld.AdapterSpec(rank=2, targets="clip-text", seed=i), f"a{i}", trainable=False)
        ld.add_adapter(pipe.unet, ld.AdapterSpec(rank=2, targets="unet-attn", seed=i), f"a{i}", trainable=False)
        perturb(pipe.text_encoder, f"a{i}", std=0.2, seed=i)
    ld.set_adapters(pipe, ["a0", "a1"])
    plain = te_call(pipe.text_encoder)
    f = fuse(pipe, ["a0", "a1"], method="klora")
    assert f.combiners and not any(k.startswith("text_encoder") for k in f.combiners)
    assert torch.equal(te_call(pipe.text_encoder), plain)  # no timestep needed there


def _reference_gate(c, y0, ys, t, T=1000, roles=None):
    """The gated formula written out term by term, one LoRA at a time (what the stacked combiner must equal);
    ``roles`` (one role index per LoRA) adds the per-role terms β_r, υ_r, ω_r."""
    from lora_diffusion.fusion.base import fourier

    def ln(y):
        return torch.nn.functional.layer_norm(y.movedim(1, -1), y.shape[1:2]).movedim(-1, 1) if y.dim() == 4 else \
            torch.nn.functional.layer_norm(y, y.shape[-1:])

    def vec(p):
        return p.view(-1, 1, 1) if y0.dim() == 4 else p

    def per_sample(s):
        return s.view(-1, *([1] * (y0.dim() - 1))) if s.dim() else s

    phi = fourier(1 - t.float() / T, c.time_features)
    out = y0
    for i, y in enumerate(ys):
        pre = vec(c.w_base) * ln(y0) + vec(c.w_lora) * ln(y) + vec(c.w_cross) * ln(y0) * ln(y) + vec(c.b)
        pre, w_out = pre + per_sample(phi @ c.u), vec(c.w_out)
        if roles is not None:
            r = roles[i]
            pre = pre + vec(c.b_role[r]) + per_sample(phi @ c.u_role[r])
            w_out = w_out + vec(c.w_out_role[r])
        out = out + w_out * torch.sigmoid(pre) * y
    return out


@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 6, 3, 3)], ids=["linear", "conv"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("per_sample_t", [False, True])
@pytest.mark.parametrize("per_role", [False, True])
def test_stacked_gate_combiner_equals_the_formula(shape, k, per_sample_t, per_role, gate_options):
    from lora_diffusion.core.context import CallContext
    from lora_diffusion.fusion.base import ROLES
    from lora_diffusion.fusion.gated import GateCombiner

    g = torch.Generator().manual_seed(k)
    dim = 1 if len(shape) == 4 else -1
    roles = {f"a{i}": ROLES[(i + 1) % len(ROLES)] for i in range(k)}  # a0 style, a1 other, a2 subject
    c = GateCombiner([f"a{i}" for i in range(k)], 6, dim, 3, 2.0, roles, per_role)
    c.compiled = gate_options["compile"]
    with torch.no_grad():
        for p in c.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    y0 = torch.randn(shape, generator=g)
    ys = {f"a{i}": torch.randn(shape, generator=g) * (i + 1) for i in range(k)}
    t = torch.tensor([900.0, 100.0]) if per_sample_t else torch.tensor(500.0)
    want = _reference_gate(c, y0, list(ys.values()), t, roles=[ROLES.index(roles[n]) for n in ys] if per_role else None)
    with torch.no_grad():  # the in-place path
        got, _ = c.combine(None, y0, ys, CallContext(timestep=t))
    assert close(got, want, 1e-5)
    c.record = True  # recording keeps g intact
    with torch.no_grad():
        got, strengths = c.combine(None, y0, ys, CallContext(timestep=t))
        c.compiled, eager = False, c.combine(None, y0, ys, CallContext(timestep=t))[1]
    assert close(got, want, 1e-5) and set(strengths) == set(ys)
    assert all(close(strengths[n].mean(), eager[n].mean(), 1e-5) for n in ys)  # the fused path's means too
    c.record, c.compiled = False, gate_options["compile"]
    got, _ = c.combine(None, y0, ys, CallContext(timestep=t))  # with autograd: no in-place ops
    got.sum().backward()
    assert close(got.detach(), want, 1e-5) and all(p.grad is not None for p in c.parameters())
    with torch.no_grad():  # terms folded at inference are refreshed when a parameter changes
        for p in c.parameters():
            p.add_(0.1)
        got, _ = c.combine(None, y0, ys, CallContext(timestep=t))
    roles_i = [ROLES.index(roles[n]) for n in ys] if per_role else None
    assert close(got, _reference_gate(c, y0, list(ys.values()), t, roles=roles_i), 1e-5)


def test_compiled_gate_equals_the_formula():
    """``compile=True`` really compiles (torch.compile, inductor) and gives the formula, with and without autograd
    and recording (one case: k = 2 on a conv layer, per-role terms, per-sample timesteps; a few seconds)."""
    from lora_diffusion.core.context import CallContext
    from lora_diffusion.fusion import gated
    from lora_diffusion.fusion.base import ROLES

    g = torch.Generator().manual_seed(0)
    roles = {"a0": "subject", "a1": "style"}
    c = gated.GateCombiner(list(roles), 6, 1, 3, 2.0, roles, per_role=True)
    c.compiled = True
    with torch.no_grad():
        for p in c.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    y0 = torch.randn(2, 6, 3, 3, generator=g)
    ys = {n: torch.randn(2, 6, 3, 3, generator=g) * (i + 1) for i, n in enumerate(roles)}
    t = torch.tensor([900.0, 100.0])
    want = _reference_gate(c, y0, list(ys.values()), t, roles=[ROLES.index(r) for r in roles.values()])
    with torch.no_grad():
        got, _ = c.combine(None, y0, ys, CallContext(timestep=t))
    assert close(got, want, 1e-5) and gated._COMPILED["gate_sum"] is not gated.gate_sum  # compiled, no fallback
    got, _ = c.combine(None, y0, ys, CallContext(timestep=t))
    got.sum().backward()
    assert close(got.detach(), want, 1e-5) and all(p.grad is not None for p in c.parameters())
    assert gated._COMPILED["gate_sum"] is not gated.gate_sum


def _random_gates(fusion, seed: int = 0, scale: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_role_gates_treat_identical_loras_alike_within_a_role_and_apart_across_roles():
    """Two copies of one LoRA: same role -> the same gate (the gate is symmetric in its LoRAs); subject vs style
    -> different gates once the role terms are trained (what lets a gate weigh a concept down and a style up)."""
    from lora_diffusion.core.context import CallContext
    from lora_diffusion.fusion.gated import GateCombiner

    g = torch.Generator().manual_seed(0)
    y0, y = torch.randn(2, 6, 3, 3, generator=g), torch.randn(2, 6, 3, 3, generator=g)
    ctx = CallContext(timestep=torch.tensor(300.0))
    for roles, same in (({"a": "style", "b": "style"}, True), ({"a": "subject", "b": "style"}, False)):
        c = GateCombiner(["a", "b"], 6, 1, 3, 2.0, roles, per_role=True)
        with torch.no_grad():
            for p in c.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            gates = c.gates(y0, {"a": y, "b": y.clone()}, ctx)
            swapped = c.gates(y0, {"b": y.clone(), "a": y}, ctx)
        assert close(gates["a"], swapped["a"], 1e-6) and close(gates["b"], swapped["b"], 1e-6)  # order-free
        assert close(gates["a"], gates["b"], 1e-6) == same  # (float rounding of the stacked ops only)


def test_role_gates_with_one_lora_at_weight_zero_give_the_other_alone():
    unet = _unet_with(2)
    roles = {"a0": "subject", "a1": "style"}
    f = fuse(unet, ["a0", "a1"], method="gated", roles=roles, weights=[0.0, 1.0])
    _random_gates(f)
    state = {k: c.state_dict() for k, c in f.combiners.items()}
    with ld.timestep(unet, 400, 1000):
        both = unet_call(unet)
    f = fuse(unet, ["a1"], method="gated", roles=roles)
    for k, c in f.combiners.items():
        c.load_state_dict(state[k])
    with ld.timestep(unet, 400, 1000):
        alone = unet_call(unet)
    assert close(both, alone, 1e-6)
    f = fuse(unet, ["a0", "a1"], method="gated", roles=roles, weights=[1.0, 1.0])
    for k, c in f.combiners.items():
        c.load_state_dict(state[k])
    with ld.timestep(unet, 400, 1000):
        assert not close(unet_call(unet), alone, 1e-3)  # a0 at weight 1 does change it


def test_gates_files_without_role_terms_load_as_the_gate_they_were(tmp_path):
    """A file from before the role terms (options without per_role) loads into a per-role fusion with zero
    offsets and gives the same output as the role-free gate; a per-role file into a role-free fusion is refused."""
    import json

    from lora_diffusion.core.errors import AdapterFileError
    from lora_diffusion.fusion import load_gates, save_gates
    from lora_diffusion.fusion.gated import gate_state_dict
    from lora_diffusion.io.files import write_safetensors
    from lora_diffusion.io.library import GATES_FORMAT

    unet = _unet_with(2)
    old = fuse(unet, ["a0", "a1"], method="gated", per_role=False)
    _random_gates(old)
    with ld.timestep(unet, 600, 1000):
        want = unet_call(unet)
    path = tmp_path / "old.safetensors"
    write_safetensors(path, gate_state_dict(old), {"format": GATES_FORMAT, "loras": json.dumps({"a0": "0", "a1": "1"}),
                                                    "options": json.dumps({"time_features": 3, "init_out": 2.0})})
    new = fuse(unet, ["a0", "a1"], method="gated", roles={"a0": "subject", "a1": "style"})
    load_gates(new, path)
    assert all(not c.b_role.any() and not c.w_out_role.any() for c in new.combiners.values())
    with ld.timestep(unet, 600, 1000):
        assert close(unet_call(unet), want, 1e-5)
    _random_gates(new, seed=1)
    save_gates(new, tmp_path / "roles.safetensors", {"a0": "0", "a1": "1"})
    fuse(unet, ["a0", "a1"], method="gated", per_role=False)
    with pytest.raises(AdapterFileError, match=r"per-role terms.*per_role=True"):
        load_gates(unet.__dict__["_lora_fusion"], tmp_path / "roles.safetensors")
