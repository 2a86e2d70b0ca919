"""MoLE (lora_diffusion/fusion/mole.py): the invariants of the reference test list (variants.md §19) on a tiny Llama
and a tiny UNet, block grouping, the balancing loss through TrainingHooks, masking, the mixture file."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.fusion import fuse, save_mixture, unfuse
from lora_diffusion.fusion.mole import MoleState, block_of, gate_weights, set_mask

from .conftest import perturb, unet_inputs
from .test_llm_train import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.tensor([[5, 17, 33, 9, 101, 4], [2, 8, 8, 90, 14, 3]])
NAMES = ["a", "b", "c"]


def llama():
    m = tiny_model("llama", torch.float64).requires_grad_(False)
    for i, n in enumerate(NAMES):
        ld.add_adapter(m, ld.AdapterSpec(rank=2 + i, alpha=4, targets="llm", seed=i), n, trainable=False)
        perturb(m, n, seed=i + 1)
    return m


def unet():
    from diffusers import UNet2DConditionModel

    from .conftest import tiny_unet_config

    torch.manual_seed(0)
    m = UNet2DConditionModel(**tiny_unet_config()).eval().to(torch.float64).requires_grad_(False)
    for i, n in enumerate(NAMES):
        ld.add_adapter(m, ld.AdapterSpec(rank=2, alpha=2, targets="unet-full", seed=i), n, trainable=False)
        perturb(m, n, seed=i + 1)
    return m


MODELS = {"llama": llama, "unet": unet}


def call(kind, m):
    if kind == "llama":
        return m(input_ids=IDS).logits
    x, c = unet_inputs()
    return m(x.double(), 10, c.double()).sample


def randomize_gates(f, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in f.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.dim() else 0.2))


@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_gate_weights_sum_to_one_and_are_shared_in_a_block(kind, granularity):
    m = MODELS[kind]()
    f = fuse(m, NAMES, method="mole", granularity=granularity)
    randomize_gates(f)
    with torch.no_grad():
        call(kind, m)
    w = gate_weights(f)
    blocks = {c.block for c in f.combiners.values()}
    assert set(w) == blocks and len(w) >= 2
    for g in w.values():
        assert g.shape == (2, 3)
        torch.testing.assert_close(g.sum(-1), torch.ones(2, dtype=g.dtype))
    leaders = [c for c in f.combiners.values() if c.leader]
    assert len(leaders) == len(blocks)
    if granularity == "block":
        assert len(blocks) < len(f.combiners)


@pytest.mark.parametrize("kind", list(MODELS))
def test_equal_logits_give_the_expert_mean(kind):
    m = MODELS[kind]()
    with torch.no_grad():
        fuse(m, NAMES, method="static", weights=[1 / 3] * 3)
        want = call(kind, m)
        fuse(m, NAMES, method="mole")  # e = 0 at init: equal logits
        got = call(kind, m)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", list(MODELS))
def test_training_moves_only_the_gates_and_the_balance_loss_reaches_the_loop(kind):
    m = MODELS[kind]()
    f = fuse(m, NAMES, method="mole", balance_weight=0.5)
    randomize_gates(f)
    frozen = {k: v.clone() for n in NAMES for k, v in ld.adapter_state_dict(m, n).items()}
    gates = [p.detach().clone() for p in f.parameters()]
    hooks = ld.TrainingHooks(m)
    opt = torch.optim.AdamW(f.parameters(), lr=1e-2)
    m.train()
    for step in range(1, 4):
        hooks.begin_step(step)
        task = call(kind, m).pow(2).mean()
        reg = hooks.regularization()
        assert reg is not None and float(reg.detach()) >= 0.5 * 3 * math.log(3) - 1e-9
        (task + reg).backward()
        opt.step()
        opt.zero_grad()
        hooks.after_step(step)
    assert all(torch.equal(v, {k: t for n in NAMES for k, t in ld.adapter_state_dict(m, n).items()}[k])
               for k, v in frozen.items())
    assert all(not torch.equal(a, b) for a, b in zip(gates, f.parameters()))
    assert hooks.regularization() is None  # the records were consumed by the last step


@pytest.mark.parametrize("n", [2, 3, 5])
def test_balance_loss_is_n_log_n_at_uniform_q_and_larger_otherwise(n):
    st = MoleState([str(i) for i in range(n)], 1.0)
    st.records = [(torch.full((4, n), 1 / n, dtype=torch.float64), torch.ones(n, dtype=torch.float64))]
    assert float(st.balance_loss()) == pytest.approx(n * math.log(n), rel=1e-12)
    skew = torch.softmax(torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)), -1)
    st.records = [(skew, torch.ones(n, dtype=torch.float64))]
    assert float(st.balance_loss()) > n * math.log(n)


@pytest.mark.parametrize("drop", [["a"], ["b"], ["a", "c"]])
@pytest.mark.parametrize("kind", list(MODELS))
def test_masking_renormalizes_the_rest(kind, drop):
    m = MODELS[kind]()
    f = fuse(m, NAMES, method="mole")
    randomize_gates(f)
    with torch.no_grad():
        call(kind, m)
        full = {b: w.clone() for b, w in gate_weights(f).items()}
        set_mask(f, drop)
        call(kind, m)
        masked = gate_weights(f)
    keep = torch.tensor([n not in drop for n in NAMES])
    first = next(iter(full))  # the first block to run sees the same input with and without the mask
    want = torch.where(keep, full[first], torch.zeros_like(full[first]))
    torch.testing.assert_close(masked[first], want / want.sum(-1, keepdim=True), rtol=1e-12, atol=1e-14)
    for w in masked.values():  # later blocks see other inputs; still: dropped ones 0, the rest sum to 1
        assert torch.all(w[:, ~keep] == 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, dtype=w.dtype))


def test_masking_one_expert_when_two_remain_equals_their_weighted_sum():
    m = llama()
    f = fuse(m, NAMES, method="mole", granularity="layer", mask=["c"])
    randomize_gates(f)
    with torch.no_grad():
        call("llama", m)
    for w in gate_weights(f).values():
        assert torch.all(w[:, 2] == 0)


TB = "unet.down_blocks.0.attentions.0.transformer_blocks.0"


@pytest.mark.parametrize("key,block", [
    ("model.model.layers.3.self_attn.q_proj", "model.model.layers.3"),
    ("model.model.layers.0.mlp.down_proj", "model.model.layers.0"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", f"{TB}"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj", f"{TB}"),
    ("unet.down_blocks.1.resnets.0.conv1", "unet.down_blocks.1.resnets.0"),
    ("unet.down_blocks.0.attentions.0.proj_in", "unet.down_blocks.0.attentions.0"),
    ("unet.mid_block.resnets.1.conv2", "unet.mid_block.resnets.1"),
    ("text_encoder.text_model.encoder.layers.11.self_attn.out_proj", "text_encoder.text_model.encoder.layers.11"),
    ("unet.conv_in", "unet.conv_in"),
])
def test_block_of(key, block):
    assert block_of(key) == block


def test_mixture_file_round_trip(tmp_path):
    m = unet()
    f = fuse(m, NAMES, method="mole", mask=["b"])
    randomize_gates(f)
    with torch.no_grad():
        want = call("unet", m)
    path = save_mixture(m, f, tmp_path / "mole.safetensors")
    fresh = unet()
    ld.remove_adapters(fresh)
    ld.load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(call("unet", fresh), want, rtol=0, atol=0)


@pytest.mark.parametrize("bad,msg", [
    ({"mask": ["z"]}, r"mask names \['z'\] are not in the mixture"),
    ({"mask": NAMES}, r"masking every adapter"),
    ({"granularity": "pixel"}, r"granularity='pixel'"),
])
def test_bad_options_are_refused_before_anything_changes(bad, msg):
    m = llama()
    ld.set_adapters(m, ["a"])
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ld.AdapterError, match=msg):
        fuse(m, NAMES, method="mole", **bad)
    assert all(layer.combiner is None and layer.active == ["a"] for _, layer in ld.inject.walker.adapted_layers(m))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_unfuse_restores_the_sum():
    m = llama()
    with torch.no_grad():
        want = call("llama", m)
        fuse(m, NAMES, method="mole")
        unfuse(m)
        torch.testing.assert_close(call("llama", m), want, rtol=0, atol=0)


# --- gate training on the demo model (training/train_gates.py --method mole) ---
from .test_train_gates import _cfg, loras  # noqa: E402,F401  (the demo-world LoRAs with captioned images)


def test_train_gates_mole_learns_resumes_exactly_and_the_file_loads(loras, tmp_path):  # noqa: F811
    import shutil

    from lora_diffusion.demo.model import load_demo_pipeline
    from training.train_gates import train

    args = ("--method", "mole", "--checkpointing_steps", "3", "--lr", "0.05")
    full = train(_cfg(loras, tmp_path / "a", 6, *args))
    # a convex mixture of 2 LoRAs moves the objective little in 6 steps (30 steps: 0.633 -> 0.628, docs/autolora.md):
    # what is checked here is that the gates train, resume exactly and travel in the file
    assert full.gates.name == "mole.safetensors" and all(map(math.isfinite, full.losses))
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-3", tmp_path / "b" / "checkpoints" / "checkpoint-3")
    resumed = train(_cfg(loras, tmp_path / "b", 6, *args, "--resume_from_checkpoint", "latest"))
    assert resumed.first_step == 4 and resumed.losses == full.losses[3:]
    pipe = load_demo_pipeline()
    ld.load_adapter(pipe, full.gates)
    assert sorted(ld.list_adapters(pipe.unet)) == ["dotted", "ring"]
    from lora_diffusion.embeddings import current_vectors

    ref = load_demo_pipeline()
    ld.load_adapter(ref, loras / "ring.safetensors", name="ring")  # the pivotal-tuned 'ring' row travels along
    (got,), (want,) = current_vectors(pipe, "ring"), current_vectors(ref, "ring")
    assert got.token == want.token and all(torch.equal(got.vectors[r], want.vectors[r]) for r in want.vectors)
    f = pipe.unet.__dict__["_lora_fusion"]
    assert f.method.name == "mole" and any(float(p.abs().sum()) > 0 for p in f.parameters())  # trained, not zero
    with pytest.raises(ld.AdapterError, match="already loaded"):
        ld.load_adapter(pipe, full.gates)
