"""Doc-to-LoRA hypernetwork (lora_diffusion/hyper/d2l.py): the invariants of variants.md §23 on a tiny Llama
(shapes, zero delta at init, determinism, rank concatenation == sum of chunk deltas, reset restores the base)
and its refusals (empty / too-long document, checkpoint for another base)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.core.errors import AdapterError, AdapterFileError
from lora_diffusion.hyper.d2l import (
    D2L,
    D2LConfig,
    DocumentError,
    apply_lora,
    concat_ranks,
    internalize,
    read_document,
    reset,
)

DOC = "The capital of Zorblat is Mivo. Kelvar's favourite colour is teal."


pytestmark = pytest.mark.usefixtures("one_thread")


class CharTokenizer:
    """Characters -> ids < 128, the tiny Llama's vocabulary."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 128 for c in text]}


def make_llama(layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def tiny_hyper(model: nn.Module, **kw) -> D2L:
    kw = {"rank": 4, "alpha": 8.0, "latent_dim": 16, "n_heads": 2, "targets": ["down_proj", "v_proj"], **kw}
    return D2L.for_model(model, D2LConfig(**kw)).eval()


def perturb(hyper: D2L, seed: int = 1) -> None:
    """Move every parameter off its init (B != 0): a 'trained' hypernetwork."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hyper.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model: nn.Module, ids: list[int] | None = None) -> torch.Tensor:
    ids = ids or [5, 17, 99, 3, 64, 12]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_shapes_per_module():
    model = make_llama()
    hyper = tiny_hyper(model)
    lora = hyper.generate(read_document(model, CharTokenizer(), DOC, hyper.config))
    assert set(lora) == {s.name for s in hyper.slots} and len(lora) == 4
    for s in hyper.slots:
        a, b = lora[s.name]
        assert a.shape == (4, s.in_features) and b.shape == (s.out_features, 4)


def test_zero_delta_at_init_and_nonzero_after_training():
    model = make_llama()
    hyper = tiny_hyper(model)
    before = logits(model)
    lora = internalize(model, DOC, hyper, CharTokenizer())
    assert all(torch.count_nonzero(b) == 0 for _, b in lora.values())
    assert torch.equal(logits(model), before)
    perturb(hyper)
    internalize(model, DOC, hyper, CharTokenizer())
    assert not torch.allclose(logits(model), before)


def test_determinism_seeded_and_per_document():
    model = make_llama()
    h1, h2 = tiny_hyper(model, seed=3), tiny_hyper(model, seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    perturb(h1), perturb(h2)
    acts = read_document(model, CharTokenizer(), DOC, h1.config)
    l1, l2 = h1.generate(acts), h2.generate(acts)
    assert all(torch.equal(l1[k][0], l2[k][0]) and torch.equal(l1[k][1], l2[k][1]) for k in l1)
    other = h1.generate(read_document(model, CharTokenizer(), "Mivo is the capital of Zorblat.", h1.config))
    assert any(not torch.allclose(l1[k][1], other[k][1]) for k in l1)  # another document, another LoRA


def test_rank_concatenation_equals_sum_of_chunk_deltas():
    torch.set_default_dtype(torch.float64)
    try:
        model = make_llama()
        hyper = tiny_hyper(model, chunk_tokens=20)
        perturb(hyper)
        chunks = read_document(model, CharTokenizer(), DOC, hyper.config)
        assert len(chunks) == 4  # 66 characters in chunks of 20
        per_chunk = [hyper(c) for c in chunks]
        cat = concat_ranks(per_chunk)
        for m, (a, b) in cat.items():
            assert a.shape[0] == b.shape[1] == 16
            summed = sum(bc @ ac for ac, bc in (lo[m] for lo in per_chunk))
            torch.testing.assert_close(b @ a, summed, rtol=0, atol=1e-12)
        # through the core: base + s·Σ_c B_c A_c x, each chunk at scale alpha/r (not alpha/(n·r))
        base = logits(model)
        apply_lora(model, hyper, cat, "cat")
        with_cat = logits(model)
        ld.remove_adapters(model, ["cat"])
        for i, lo in enumerate(per_chunk):
            apply_lora(model, hyper, {k: (a.detach(), b.detach()) for k, (a, b) in lo.items()}, f"c{i}")
        with_sum = logits(model)
        assert not torch.allclose(with_cat, base)
        torch.testing.assert_close(with_cat, with_sum, rtol=0, atol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


def test_reset_restores_the_base_exactly():
    model = make_llama()
    hyper = tiny_hyper(model)
    perturb(hyper)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m).__name__ for m in model.modules()]
    before = logits(model)
    internalize(model, DOC, hyper, CharTokenizer())
    assert not torch.equal(logits(model), before)
    internalize(model, DOC + " Gorp.", hyper, CharTokenizer())  # a second document replaces the first
    assert ld.list_adapters(model) == ["d2l"]
    reset(model)
    assert ld.list_adapters(model) == []
    assert [type(m).__name__ for m in model.modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and len(state) == len(model.state_dict())
    assert torch.equal(logits(model), before)
    reset(model)  # nothing internalized: a no-op


def test_saved_adapter_reloads_with_identical_logits(tmp_path):
    from lora_diffusion.llm import load_llm_adapter, save_llm_adapter

    model = make_llama()
    hyper = tiny_hyper(model, chunk_tokens=40)
    perturb(hyper)
    internalize(model, DOC, hyper, CharTokenizer())  # 2 chunks -> rank 8
    want = logits(model)
    path = save_llm_adapter(model, tmp_path / "doc.safetensors", name="d2l")
    reset(model)
    load_llm_adapter(model, path, name="doc")
    assert ld.get_spec(model, "doc").rank == 8
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-6)


def test_refuses_empty_and_too_long_documents():
    model = make_llama()
    hyper = tiny_hyper(model, chunk_tokens=20, chunking=False)
    for bad in ("", "  \n "):
        with pytest.raises(DocumentError, match="non-empty"):
            internalize(model, bad, hyper, CharTokenizer())
    with pytest.raises(DocumentError, match=r"66 tokens is longer than the chunk limit of 20 tokens.*chunking is off"):
        internalize(model, DOC, hyper, CharTokenizer())
    hyper.config.chunking, hyper.config.max_chunks = True, 3
    with pytest.raises(DocumentError, match=r"needs 4 chunks of 20 tokens; the limit is 3"):
        internalize(model, DOC, hyper, CharTokenizer())
    assert ld.list_adapters(model) == []  # nothing half-applied


def test_checkpoint_round_trip_and_another_base(tmp_path):
    model = make_llama()
    hyper = tiny_hyper(model)
    perturb(hyper)
    path = hyper.save(tmp_path / "d2l.safetensors", base_model="tiny")
    again = D2L.load(path, model)
    acts = read_document(model, CharTokenizer(), DOC, hyper.config)
    a, b = hyper.generate(acts), again.generate(acts)
    assert all(torch.equal(a[k][1], b[k][1]) for k in a)
    with pytest.raises(AdapterFileError, match=r"num_hidden_layers 2 vs 3"):
        D2L.load(path, make_llama(layers=3))
    with pytest.raises(AdapterFileError, match=r"hidden_size 32 vs 48"):
        D2L.load(path, make_llama(hidden=48))
    (tmp_path / "not.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFileError):
        D2L.load(tmp_path / "not.safetensors", model)


def test_refuses_reading_through_an_adapted_model_and_bad_shapes():
    model = make_llama()
    hyper = tiny_hyper(model)
    ld.add_adapter(model, ld.AdapterSpec(rank=2, targets=["q_proj"]), name="other")
    with pytest.raises(AdapterError, match=r"adapters \['other'\] are on it"):
        internalize(model, DOC, hyper, CharTokenizer())
    with pytest.raises(AdapterError, match=r"expected \(2, tokens, 32\)"):
        hyper(torch.zeros(3, 5, 32))
    with pytest.raises(AdapterError, match="divisible"):
        D2LConfig(latent_dim=10, n_heads=4)
