"""Gradient checkpointing and torch.compile with adapters.

Checkpointing re-runs forwards during backward. Every variant must give the same adapter
gradients with and without it; T-LoRA must also see, in the recomputation, the timestep its
forward saw, even when the backward runs after the ``with ld.timestep(...)`` block has exited.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import lora_diffusion as ld
from lora_diffusion.inject.walker import model_state

from .conftest import all_variants, perturb, tiny_unet_config, unet_inputs

DTYPE = torch.float64
REL = 1e-10  # float64; recomputation repeats the same ops, so gradients should agree to rounding


def _reentrant_checkpoint(module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=True)


def make_unet(variant: str, checkpointing: bool | str, reentrant: bool = False, targets=None,
              dropout: float = 0.0) -> nn.Module:
    """checkpointing: False, True (diffusers' plain switch) or "context" (ld.enable_gradient_checkpointing)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config()).to(DTYPE)
    if checkpointing is True:
        unet.enable_gradient_checkpointing(_reentrant_checkpoint if reentrant else None)
    unet.train()
    if targets is None:  # convolutions too where the variant supports them (resnets are checkpointed as well)
        targets = "unet-full" if "conv2d" in ld.get_variant(variant).kinds else "unet-attn"
    ld.add_adapter(unet, ld.AdapterSpec(variant=variant, rank=4, targets=targets, seed=7, dropout=dropout))
    perturb(unet, seed=11)  # non-zero everywhere, so every adapter tensor gets a gradient
    if checkpointing == "context":
        ld.enable_gradient_checkpointing(unet)
    return unet


class CallCounter:
    """Counts forward calls of the adapted layers (a recomputation calls them again)."""

    def __init__(self, model: nn.Module) -> None:
        self.n = 0
        for m in model.modules():
            if isinstance(m, ld.AdaptedLayer):
                m.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def inputs(requires_grad: bool = False):
    sample, enc = unet_inputs(batch=2, seed=0)
    sample = sample.to(DTYPE).requires_grad_(requires_grad)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(2, 4, 8, 8, generator=g, dtype=DTYPE)
    return sample, enc.to(DTYPE), weight


def forward_loss(unet: nn.Module, requires_grad_input: bool = False) -> torch.Tensor:
    sample, enc, weight = inputs(requires_grad_input)
    out = unet(sample, torch.tensor([500, 500]), enc).sample
    return (out * weight).sum()


def grads(unet: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in ld.adapter_parameters(unet):
        assert p.grad is not None, f"no gradient for {name}"
        out[name] = p.grad.detach().clone()
    return out


def assert_grads_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float = REL) -> None:
    assert actual.keys() == expected.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    assert scale > 0, "all gradients are zero: the test would be vacuous"
    bad = {k: (actual[k] - expected[k]).abs().max().item() for k in expected}
    bad = {k: v for k, v in bad.items() if v > rel * scale}
    assert not bad, f"{len(bad)} gradients differ (max grad {scale:.3g}), e.g. {list(bad.items())[:3]}"


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    scale = max(g.abs().max().item() for g in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


def run_backward(unet: nn.Module, requires_grad_input: bool = False) -> tuple[dict[str, torch.Tensor], CallCounter]:
    counter = CallCounter(unet)
    loss = forward_loss(unet, requires_grad_input)
    n_forward = counter.n
    loss.backward()
    counter.recomputed = counter.n - n_forward
    return grads(unet), counter


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("variant", all_variants())
def test_checkpointing_same_gradients(variant, dropout):
    """Same adapter init (spec.seed), same input: same adapter gradients. With adapter dropout the
    recomputation must draw the same masks (checkpoint restores the RNG state)."""
    if dropout and not ld.get_variant(variant).supports_dropout:  # declared: refused before anything is built
        with pytest.raises(ld.TargetError, match=f"variant '{variant}' needs dropout = 0"):
            make_unet(variant, checkpointing=False, dropout=dropout)
        return
    torch.manual_seed(123)
    ref_grads, ref_count = run_backward(make_unet(variant, checkpointing=False, dropout=dropout))
    torch.manual_seed(123)
    ck_grads, ck_count = run_backward(make_unet(variant, checkpointing=True, dropout=dropout))
    assert ref_count.recomputed == 0
    assert ck_count.recomputed > 0, "checkpointing did not re-run any adapted layer"
    assert_grads_close(ck_grads, ref_grads)


def _tlora_grads(unet: nn.Module, t, backward_inside: bool, requires_grad_input: bool = False):
    counter = CallCounter(unet)
    holder_state = model_state(unet).holder.state
    if t is None:
        loss = forward_loss(unet, requires_grad_input)
        n_forward = counter.n
        loss.backward()
    else:
        with ld.timestep(unet, t):
            loss = forward_loss(unet, requires_grad_input)
            n_forward = counter.n
            if backward_inside:
                loss.backward()
        assert model_state(unet).holder.state is holder_state, "the with block must restore the context"
        if not backward_inside:
            loss.backward()  # after the block: the context is back to "no timestep" (full rank)
    counter.recomputed = counter.n - n_forward
    return grads(unet), counter


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("t", [100, 900])
def test_tlora_checkpointing_backward_after_timestep_block(t, reentrant):
    # reentrant checkpointing needs an input that requires grad (or nothing inside gets a gradient)
    ref, _ = _tlora_grads(make_unet("tlora", checkpointing=False), t, backward_inside=True, requires_grad_input=reentrant)
    ck, count = _tlora_grads(make_unet("tlora", checkpointing=True, reentrant=reentrant), t, backward_inside=False,
                             requires_grad_input=reentrant)
    assert count.recomputed > 0, "checkpointing did not re-run any adapted layer"
    assert_grads_close(ck, ref)
    # the recomputation did not fall back to the restored context (no timestep = full rank)
    full, _ = _tlora_grads(make_unet("tlora", checkpointing=False), None, backward_inside=True,
                           requires_grad_input=reentrant)
    assert max_rel_diff(ck, full) > 1e-3


def test_tlora_gradients_depend_on_timestep():
    """The rank mask is really applied: r(100) = 3, r(900) = 2 of rank 4, so gradients differ,
    and the masked singular values get no gradient."""
    g100, _ = _tlora_grads(make_unet("tlora", checkpointing=False), 100, backward_inside=True)
    g900, _ = _tlora_grads(make_unet("tlora", checkpointing=False), 900, backward_inside=True)
    assert max_rel_diff(g100, g900) > 1e-3
    s = [k for k in g900 if k.endswith("lora_S")]
    assert s
    for k in s:
        assert torch.all(g900[k][2:] == 0) and torch.any(g900[k][:2] != 0), k
        assert torch.all(g100[k][3:] == 0) and torch.any(g100[k][:3] != 0), k


@pytest.mark.parametrize("second", ["grad", "no_grad"])
def test_tlora_checkpointing_two_forwards_one_backward(second):
    """Two forwards at different timesteps before one backward (a summed loss, or a no_grad forward
    in between, e.g. a logging pass): each recomputation must see the context its own forward saw,
    not the context of the last forward. This needs ld.enable_gradient_checkpointing (a context_fn that
    snapshots the context per checkpointed segment); diffusers' plain switch only covers one forward."""
    def run(unet):
        with ld.timestep(unet, 100):
            loss = forward_loss(unet)
        with ld.timestep(unet, 900):
            if second == "grad":
                loss = loss + forward_loss(unet)
            else:
                with torch.no_grad():
                    forward_loss(unet)
        loss.backward()
        return grads(unet)

    ref = run(make_unet("tlora", checkpointing=False))
    ck = run(make_unet("tlora", checkpointing="context"))
    assert_grads_close(ck, ref)


# --- torch.compile --------------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _small_tlora() -> nn.Module:
    torch.manual_seed(0)
    model = Small()
    ld.add_adapter(model, ld.AdapterSpec(variant="tlora", rank=4, targets=["fc1", "fc2"], seed=2))
    perturb(model, seed=4, std=0.3)
    return model


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_tlora_compile_no_stale_mask(backend):
    torch._dynamo.reset()
    model = _small_tlora()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    seen = {}
    for t in (100, 900, 100, None, 900):
        ld.set_timestep(model, t)
        with torch.no_grad():
            eager = model(x)
            comp = compiled(x)
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6, msg=lambda m, t=t: f"timestep {t}: {m}")
        seen[t] = eager
    assert not torch.allclose(seen[100], seen[900]), "the mask should change the output"
    assert not torch.allclose(seen[None], seen[900])
    # the context manager and a per-sample timestep (B,) go through the same path
    tb = torch.tensor([100, 900, 500])
    with ld.timestep(model, tb), torch.no_grad():
        eager, comp = model(x), compiled(x)
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
    rows = []
    for i, t in enumerate(tb.tolist()):
        with ld.timestep(model, t), torch.no_grad():
            rows.append(model(x[i:i + 1]))
    torch.testing.assert_close(eager, torch.cat(rows), rtol=1e-6, atol=1e-6)


def test_tlora_compile_gradients():
    """aot_eager compiles the backward too: gradients equal eager ones for two timesteps."""
    torch._dynamo.reset()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    eager_model, comp_model = _small_tlora(), _small_tlora()
    compiled = torch.compile(comp_model, backend="aot_eager")
    for t in (100, 900):
        for m in (eager_model, comp_model):
            m.zero_grad(set_to_none=True)
        with ld.timestep(eager_model, t):
            eager_model(x).square().sum().backward()
        with ld.timestep(comp_model, t):
            compiled(x).square().sum().backward()
        ge = dict(ld.adapter_parameters(eager_model))
        gc = dict(ld.adapter_parameters(comp_model))
        for k in ge:
            torch.testing.assert_close(gc[k].grad, ge[k].grad, rtol=1e-5, atol=1e-6, msg=lambda m, t=t, k=k: f"t={t} {k}: {m}")
