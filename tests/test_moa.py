"""MoA (heterogeneous mixture of adapters, variants.md §25): identity at init, router weights in (0, 1), sparse
threshold behaviour, forced-one router = plain sum of experts, the canonical file round trip, and the trainer."""

from __future__ import annotations

import json

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion import llm
from lora_diffusion.core.errors import AdapterError
from lora_diffusion.fusion.moa import MoAConfig, add_moa, get_moa
from lora_diffusion.io.files import read_header

from .test_llm_train import EVAL, TRAIN, make_tiny_folder

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _perturb_all(model, std: float = 0.2, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("sparse", [False, True])
def test_zero_init_gates_and_b_give_the_base_output(tiny_llama, sparse):
    model = tiny_llama.double()
    base = _logits(model)
    moa = add_moa(model, MoAConfig(sparse=sparse, rank=4))
    assert torch.equal(_logits(model), base)
    assert set(MoAConfig(sparse=sparse).experts()) == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "adapter"} | (
        set() if sparse else {"prompt"})
    assert all(p.requires_grad for p in moa.parameters()) and moa.parameters()


def test_router_weights_lie_in_0_1_and_experts_change_the_output(tiny_llama):
    model = tiny_llama.double()
    base = _logits(model)
    moa = add_moa(model, MoAConfig(rank=4))
    _perturb_all(model)
    out = _logits(model)
    assert not torch.allclose(out, base, atol=1e-4)
    for b in moa.blocks.values():
        assert b.w.shape == (2, 9, 7) and (b.w > 0).all() and (b.w < 1).all()


def test_sparse_experts_under_the_threshold_contribute_exactly_zero(tiny_llama):
    model = tiny_llama.double()
    moa = add_moa(model, MoAConfig(rank=4, sparse=True, max_threshold=0.5))
    _perturb_all(model, std=0.5)
    _logits(model)
    block = next(iter(moa.blocks.values()))
    assert (block.gamma <= 0.5).all() and (block.gamma > 0).all()
    assert ((block.w == 0) | (block.w >= block.gamma)).all() and (block.w == 0).any() and (block.w > 0).any()
    # a LoRA expert's layer: where its weight is 0 the layer gives the base output bit for bit
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    block.w = torch.rand(2, 9, len(moa.cfg.experts()), dtype=torch.float64)
    block.w[0, :4, 0] = 0.0
    with torch.no_grad():
        y = attn.q_proj(x)
        y0 = attn.q_proj.base_layer(x)
    assert torch.equal(y[0, :4], y0[0, :4]) and not torch.allclose(y[0, 4:], y0[0, 4:])


@pytest.mark.parametrize("ste", [True, False])
def test_the_threshold_learns_only_with_the_straight_through_gradient(tiny_llama, ste):
    model = tiny_llama.double()
    moa = add_moa(model, MoAConfig(rank=4, sparse=True, threshold_grad=ste))
    _perturb_all(model, std=0.5)
    model(input_ids=IDS, labels=IDS).loss.backward()
    g = next(iter(moa.blocks.values())).threshold.weight.grad
    assert (g is not None and g.abs().sum() > 0) == ste


def test_router_forced_to_one_is_the_plain_sum_of_experts(tiny_llama, monkeypatch):
    model = tiny_llama.double()
    moa = add_moa(model, MoAConfig(rank=4))
    _perturb_all(model)
    for b in moa.blocks.values():
        monkeypatch.setattr(b, "route", lambda h: torch.ones(*h.shape[:-1], 7, dtype=h.dtype))
    forced = _logits(model)
    for layer in moa.layers:  # LoRA experts as the plain additive sum
        layer.set_combiner(None)
    assert torch.allclose(_logits(model), forced, atol=1e-12, rtol=0)
    blk, mb = model.model.layers[1], moa.blocks["model.layers.1"]
    h2 = torch.randn(2, 9, 32, dtype=torch.float64)
    mb.w = torch.ones(2, 9, 7, dtype=torch.float64)
    with torch.no_grad():  # the parallel adapter adds U silu(D h2) at weight 1
        assert torch.allclose(blk.mlp(h2) - blk.mlp.forward(h2), mb.up(torch.nn.functional.silu(mb.down(h2))),
                              atol=1e-12, rtol=0)


@pytest.mark.parametrize("sparse", [False, True])
def test_canonical_file_round_trip_and_removal(tmp_path, sparse):
    folder = make_tiny_folder(tmp_path / "m")
    model, _ = llm.load_causal_lm(folder)
    base = _logits(model)
    add_moa(model, MoAConfig(rank=4, sparse=sparse))
    _perturb_all(model)
    want = _logits(model)
    path = llm.save_llm_adapter(model, tmp_path / "moa.safetensors")
    meta = read_header(path)[1]
    assert json.loads(meta["moa"])["sparse"] is sparse
    fresh, _ = llm.load_causal_lm(folder)
    name = llm.load_llm_adapter(fresh, path)
    assert torch.equal(_logits(fresh), want) and get_moa(fresh, name) is not None
    with pytest.raises(AdapterError, match="cannot be merged"):
        ld.merge_adapters(fresh)
    with pytest.raises(AdapterError, match="only the canonical file holds its router"):
        ld.save_adapter(fresh, tmp_path / "peft", name, format="peft")
    ld.remove_adapters(fresh, [name])
    assert torch.equal(_logits(fresh), base) and get_moa(fresh, name) is None
    assert not any("moa_" in n for n, _ in fresh.named_parameters())


def test_non_llama_models_are_refused_and_nothing_is_added(tiny_gpt2):
    with pytest.raises(AdapterError, match="MoA needs Llama-style decoder blocks"):
        add_moa(tiny_gpt2)
    assert ld.list_adapters(tiny_gpt2) == []


def test_train_llm_mixture_moa_trains_saves_and_chats(tmp_path, capsys):
    from lora_diffusion.llm import chat
    from training import train_llm

    folder = make_tiny_folder(tmp_path / "m")
    out = tmp_path / "o"
    metrics = train_llm.main(["--model", str(folder), "--train_file", str(TRAIN), "--eval_file", str(EVAL),
                              "--output_dir", str(out), "--max_length", "64", "--lr", "1e-2", "--train_batch_size", "4",
                              "--max_train_steps", "6", "--no-progress", "--report_to", "none", "--mixture", "moa",
                              "--lora_rank", "4", "--mixture_options", '{"sparse": true, "adapter_size": 8}'])
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    assert "peft" not in metrics  # a PEFT folder would hold the LoRA experts without their router
    model, _ = llm.load_causal_lm(folder)
    llm.load_llm_adapter(model, out / "adapter.safetensors")
    moa = get_moa(model, "adapter")
    assert moa.cfg.sparse and moa.cfg.adapter_size == 8 and moa.cfg.rank == 4
    chat.main(["--model", str(folder), "--adapter", str(out / "adapter.safetensors"), "--prompt", "Shout: cat",
               "--max_new_tokens", "4"])
    assert capsys.readouterr().out.endswith("\n")
    with pytest.raises(Exception, match="--merge with --mixture moa"):
        train_llm.main(["--model", str(folder), "--train_file", str(TRAIN), "--output_dir", str(tmp_path / "x"),
                        "--mixture", "moa", "--merge"])


def test_merge_refuses_only_the_mixture(tmp_path):
    """MoA is a model-level mixture (core/mixtures.py): merging refuses it by name, not every other adapter with it."""
    from lora_diffusion.core import mixtures

    model, _ = llm.load_causal_lm(make_tiny_folder(tmp_path / "m"))
    add_moa(model, MoAConfig(rank=4), name="moa")
    ld.add_adapter(model, ld.AdapterSpec(rank=2, targets=["gate_proj"]), "plain")
    assert mixtures.model_mixtures(model)["moa"].kind == "moa" and "moa" in mixtures.KINDS
    with pytest.raises(AdapterError, match=r"\['moa'\] are mixtures \(MoA\).*cannot be merged"):
        ld.merge_adapters(model, ["plain", "moa"])
    with pytest.raises(AdapterError, match="cannot be merged"):
        ld.remove_adapters(model, ["moa"], merge=True)
    assert get_moa(model, "moa") is not None and ld.list_adapters(model) == ["moa", "plain"]  # nothing changed
    ld.set_adapters(model, ["plain"])
    ld.merge_adapters(model)  # only the active plain LoRA is merged
    ld.unmerge_adapters(model)
    ld.remove_adapters(model, ["plain"], merge=True)
    assert ld.list_adapters(model) == ["moa"] and get_moa(model, "moa") is not None


def test_switching_the_experts_off_switches_the_whole_moa(tmp_path):
    """disable_adapters / set_adapters without the MoA leave the base model exactly: its prompt and parallel adapter
    experts (hooks on the blocks, not adapted layers) follow its LoRA experts."""
    model, _ = llm.load_causal_lm(make_tiny_folder(tmp_path / "m"))
    base = _logits(model)
    add_moa(model, MoAConfig(rank=4), name="moa")
    _perturb_all(model)
    on = _logits(model)
    assert not torch.allclose(on, base)
    ld.disable_adapters(model)
    assert torch.equal(_logits(model), base)
    ld.set_adapters(model, ["moa"])
    assert torch.equal(_logits(model), on)
