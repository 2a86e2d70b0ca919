"""LAG (LoRA-Augmented Generation) on the fusion layer: spectral alignment keeps ΔW, Arrow + SpectR routing picks
the adapter a token was built from, one adapter per token, PEFT Arrow parity, and refused inputs (variants.md §21)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion.core.errors import AdapterError
from lora_diffusion.fusion import fuse, unfuse
from lora_diffusion.fusion.lag import spectral_align

from .conftest import perturb

pytestmark = pytest.mark.usefixtures("one_thread")
IN, OUT = 16, 24


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=False)

    def forward(self, x):
        return self.proj(x)


def _library(n: int, rank: int = 2, seed: int = 0) -> nn.Module:
    """Adapter i: ΔW_i = B_i diag(3, 1) [e_2i; e_2i+1] with orthonormal B_i columns, so its right singular vectors are
    e_2i (first: its Arrow vector) and e_2i+1."""
    torch.manual_seed(seed)
    model = One().double()
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        ld.add_adapter(model, ld.AdapterSpec(rank=rank, targets=["proj"], seed=i), f"k{i}", trainable=False)
        ad = model.proj.adapters[f"k{i}"]
        q, _ = torch.linalg.qr(torch.randn(OUT, rank, generator=g, dtype=torch.float64))
        a = torch.zeros(rank, IN, dtype=torch.float64)
        a[0, 2 * i], a[1, 2 * i + 1] = 3.0, 1.0
        with torch.no_grad():
            ad.lora_A.copy_(a)
            ad.lora_B.copy_(q)
    return model


def _delta(model: nn.Module, name: str) -> torch.Tensor:
    return model.proj.adapters[name].delta_weight().detach().clone()


def test_alignment_preserves_delta_w_and_is_orthonormal():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 8, 40, generator=g, dtype=torch.float64), torch.randn(5, 30, 8, generator=g, dtype=torch.float64)
    a, b, S = spectral_align(A, B)
    assert torch.allclose(b @ a, B @ A, atol=1e-10, rtol=0)
    assert torch.allclose(a @ a.transpose(1, 2), torch.eye(8, dtype=torch.float64).expand(5, 8, 8), atol=1e-10)
    assert torch.allclose(b.norm(dim=1), S, atol=1e-10) and (S[:, :-1] >= S[:, 1:]).all()
    sv = torch.linalg.svdvals(B @ A)[:, :8]
    assert torch.allclose(S, sv, atol=1e-10)


def test_inplace_alignment_keeps_every_delta_w_and_shares_memory():
    model = _library(3)
    perturb(model, std=0.3, seed=4)  # generic factors
    before = {f"k{i}": _delta(model, f"k{i}") for i in range(3)}
    f = fuse(model, list(before), method="lag", top_k=2, inplace=True)
    for n, dw in before.items():
        assert torch.allclose(_delta(model, n), dw, atol=1e-10, rtol=0)
    c = next(iter(f.combiners.values()))
    assert c.A.data_ptr() == model.proj.adapters["k0"].lora_A.data_ptr()  # the adapters are views of the stack
    assert f.parameters() == [] and not any(p.requires_grad for _, p in ld.adapter_parameters(model))


def test_one_adapter_library_equals_that_adapter():
    model = _library(1)
    perturb(model, std=0.3, seed=2)
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x)
        fuse(model, ["k0"], method="lag", top_k=1)
        assert torch.allclose(model(x), plain, atol=1e-12, rtol=0)


def test_routing_picks_the_adapter_each_token_was_built_from():
    n = 6
    model = _library(n)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(0, n, (40,), generator=g)
    x = torch.nn.functional.one_hot(2 * src, IN).double() + 0.05 * torch.randn(40, IN, generator=g, dtype=torch.float64)
    deltas = torch.stack([_delta(model, f"k{i}") for i in range(n)])  # (n, out, in)
    with torch.no_grad():
        y0 = model.proj.base_layer(x)
        f = fuse(model, [f"k{i}" for i in range(n)], method="lag", top_k=3)
        f.record()
        y = model(x)
    comb = next(iter(f.combiners.values()))
    assert torch.equal(comb.last_index[:, 0], src)
    expected = y0 + torch.einsum("toi,ti->to", deltas[src], x)  # exactly one adapter per token
    assert torch.allclose(y, expected, atol=1e-12, rtol=0)
    st = f.stats()
    assert abs(sum(st.summary()["mean"].values()) - 1.0) < 1e-6  # routed fractions sum to one adapter per token


def test_spectr_rerank_overrides_arrow_and_k1_is_arrow():
    """x = 0.5 e_2m + 0.45 (e_2j + e_2j+1): Arrow's top-1 is m (0.5 > 0.45); SpectR's norm prefers j (0.64 > 0.5)."""
    model = _library(4)
    m, j = 1, 3
    x = torch.zeros(1, IN, dtype=torch.float64)
    x[0, 2 * m], x[0, 2 * j], x[0, 2 * j + 1] = 0.5, 0.45, 0.45
    names = [f"k{i}" for i in range(4)]
    picks = {}
    for k in (1, 2, 4):
        f = fuse(model, names, method="lag", top_k=k)
        f.record()
        with torch.no_grad():
            model(x)
        picks[k] = int(next(iter(f.combiners.values())).last_index[0, 0])
    assert picks == {1: m, 2: j, 4: j}


def test_arrow_score_ignores_the_singular_vector_sign():
    model = _library(3)
    x = torch.randn(20, IN, dtype=torch.float64)
    names = ["k0", "k1", "k2"]
    with torch.no_grad():
        fuse(model, names, method="lag", top_k=2)
        y = model(x)
        unfuse(model)
        for n in names:  # negate both factors: same ΔW, opposite singular-vector signs
            ad = model.proj.adapters[n]
            ad.lora_A.neg_()
            ad.lora_B.neg_()
        fuse(model, names, method="lag", top_k=2)
        assert torch.allclose(model(x), y, atol=1e-12, rtol=0)


def test_arrow_mode_is_the_softmax_mixture_of_the_top_k():
    n, k, temp = 5, 3, 0.7
    model = _library(n)
    perturb(model, std=0.2, seed=3)
    x = torch.randn(9, IN, dtype=torch.float64)
    deltas = torch.stack([_delta(model, f"k{i}") for i in range(n)])
    protos = torch.stack([torch.linalg.svd(d)[2][0] for d in deltas])  # (n, in) top right singular vectors
    with torch.no_grad():
        y0 = model.proj.base_layer(x)
        fuse(model, [f"k{i}" for i in range(n)], method="lag", mode="arrow", top_k=k, temperature=temp)
        y = model(x)
    v, idx = (x @ protos.T).abs().topk(k, dim=1)
    w = torch.softmax(v / temp, dim=1)
    expected = y0 + torch.einsum("tk,tkoi,ti->to", w, deltas[idx], x)
    assert torch.allclose(y, expected, atol=1e-12, rtol=0)


def test_user_scales_and_remove():
    model = _library(2)
    x = torch.randn(4, IN, dtype=torch.float64)
    with torch.no_grad():
        plain = model.proj.base_layer(x)
        f = fuse(model, ["k0", "k1"], method="lag", top_k=1, weights=[0.0, 0.0])
        assert torch.allclose(model(x), plain, atol=1e-12, rtol=0)
        f.remove()
        ld.set_adapters(model, ["k0"], [1.0])
        assert torch.allclose(model(x), plain + x @ _delta(model, "k0").T, atol=1e-12, rtol=0)


def test_ranks_may_differ():
    model = _library(2, rank=2)
    ld.add_adapter(model, ld.AdapterSpec(rank=5, targets=["proj"], seed=9), "wide", trainable=False)
    perturb(model, "wide", std=0.3)
    x = torch.randn(6, IN, dtype=torch.float64)
    with torch.no_grad():
        ld.set_adapters(model, ["wide"])
        only = model(x)
        fuse(model, ["k0", "k1", "wide"], method="lag", top_k=1)
        f = fuse(model, ["wide"], method="lag", top_k=1)
        assert torch.allclose(model(x), only, atol=1e-12, rtol=0) and f.combiners


def test_bad_requests_are_named_and_nothing_is_half_applied():
    model = _library(2)
    ld.add_adapter(model, ld.AdapterSpec(variant="dora", rank=2, targets=["proj"]), "dd", trainable=False)
    ld.add_adapter(model, ld.AdapterSpec(variant="loha", rank=2, targets=["proj"]), "hh", trainable=False)
    ld.set_adapters(model, ["k0"])
    a0 = model.proj.adapters["k0"].lora_A.detach().clone()
    with pytest.raises(AdapterError, match=r"top_k=3 is larger than the library \(2 adapters\)"):
        fuse(model, ["k0", "k1"], method="lag", top_k=3)
    with pytest.raises(AdapterError, match=r"adapter 'dd' on module 'proj' is DoRA"):
        fuse(model, ["k0", "k1", "dd"], method="lag", top_k=1)
    with pytest.raises(AdapterError, match=r"adapter 'hh' on module 'proj' is 'loha'"):
        fuse(model, ["k0", "hh"], method="lag", top_k=1)
    with pytest.raises(AdapterError, match="mode='soft'"):
        fuse(model, ["k0"], method="lag", mode="soft")
    assert model.proj.combiner is None and model.proj.active == ["k0"]
    assert torch.equal(model.proj.adapters["k0"].lora_A, a0)


def test_conv_layers_are_refused():
    conv = nn.Sequential(nn.Conv2d(2, 3, 3))
    ld.add_adapter(conv, ld.AdapterSpec(rank=2, targets=["0"]), "c", trainable=False)
    with pytest.raises(AdapterError, match="adapter 'c' on module '0' is a conv2d layer"):
        fuse(conv, ["c"], method="lag", top_k=1)


# --- parity with PEFT's Arrow on a tiny Llama (fp64) ---
def _peft_arrow(base: nn.Module, folders: list, top_k: int, temperature: float) -> nn.Module:
    from peft import ArrowConfig, create_arrow_model

    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    return create_arrow_model(base, [str(f) for f in folders], cfg).eval()


def _arrow_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    return {n.split("model.layers.", 1)[1]: m.lora_arrow["arrow_router"] for n, m in peft_model.named_modules()
            if hasattr(m, "lora_arrow") and "arrow_router" in m.lora_arrow}


@pytest.mark.parametrize("gap", [False, True])
def test_arrow_mode_equals_peft_arrow(tiny_llama, tmp_path, gap):
    """Same adapters, same tokens. Without a spectral gap PEFT's 15 power iterations have not converged, so PEFT
    is given our exact prototypes (then the outputs agree to 1e-10); with a gap (first singular value 4x) PEFT's own
    fp32 power-iteration prototypes are used and agree with ours to fp32 precision."""
    from lora_diffusion import llm

    n, k, temp = 6, 3, 0.5
    model = tiny_llama.double()
    base = copy.deepcopy(model)
    names, folders = [f"t{i}" for i in range(n)], []
    for i, name in enumerate(names):
        ld.add_adapter(model, ld.AdapterSpec(rank=4, alpha=8, targets="llm", seed=i), name, trainable=False)
        perturb(model, name, std=0.3, seed=10 + i)
        if gap:
            with torch.no_grad():
                for _, layer in ld.inject.walker.adapted_layers(model):
                    a, b, _ = spectral_align(layer.adapters[name].lora_A[None], layer.adapters[name].lora_B[None])
                    layer.adapters[name].lora_A.copy_(a[0])
                    layer.adapters[name].lora_B.copy_(b[0] * torch.tensor([4.0, 1, 1, 1], dtype=b.dtype))
        folders.append(llm.save_peft_adapter(model, tmp_path / name, name=name))
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(input_ids=ids).logits  # before PEFT injects into base
    f = fuse(model, names, method="lag", mode="arrow", top_k=k, temperature=temp)
    peft_model = _peft_arrow(base, folders, k, temp)
    if not gap:
        ours = {key.split("model.layers.", 1)[1]: c.arrows for key, c in f.combiners.items()}
        for key, layer in _arrow_layers(peft_model).items():
            layer.register_buffer("prototypes", ours[key].clone(), persistent=False)
            layer._protos_ready = True
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert not torch.allclose(got, plain, atol=1e-3)
    assert torch.allclose(got, theirs, atol=1e-10 if not gap else 1e-5, rtol=0)
    if gap:
        ours = {key.split("model.layers.", 1)[1]: c.arrows for key, c in f.combiners.items()}
        for key, layer in _arrow_layers(peft_model).items():
            cos = (layer.prototypes * ours[key]).sum(-1).abs()
            assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6), key


# --- a library of files: load_library and the chat CLI ---
def _save_loras(folder, model_dir, n: int, hidden: int = 32, variant: str = "lora") -> list:
    from lora_diffusion import llm

    paths = []
    for i in range(n):
        model, _ = llm.load_causal_lm(model_dir)
        ld.add_adapter(model, ld.AdapterSpec(variant=variant, rank=4, targets="llm", seed=i))
        perturb(model, std=0.3, seed=20 + i)
        paths.append(llm.save_llm_adapter(model, folder / f"fact{i}.safetensors"))
    return paths


def test_library_loads_routes_and_refuses_other_bases_whole(tmp_path, monkeypatch, capsys):
    from lora_diffusion import llm
    from lora_diffusion.fusion.lag import load_library
    from lora_diffusion.llm import chat

    from .test_llm_train import make_tiny_folder

    base_dir, other_dir = make_tiny_folder(tmp_path / "m"), make_tiny_folder(tmp_path / "o", hidden=48)
    lib = tmp_path / "lib"
    lib.mkdir()
    paths = _save_loras(lib, base_dir, 3)
    model, tok = llm.load_causal_lm(base_dir)
    f = load_library(model, [lib], top_k=2)
    assert f.names == ["fact0", "fact1", "fact2"] and f.method.options.inplace
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        routed = model(input_ids=ids).logits
        unfuse(model)
        for name in f.names:  # per token one of the three: never the sum of all
            ld.set_adapters(model, [name])
            assert not torch.allclose(model(input_ids=ids).logits, routed, atol=1e-6)
    # a file for another base model: one error naming it, nothing of the library left loaded
    bad = tmp_path / "bad"
    bad.mkdir()
    _save_loras(bad, other_dir, 1)
    fresh, _ = llm.load_causal_lm(base_dir)
    with pytest.raises(AdapterError, match=r"fact0\.safetensors.*trained on base model"):
        load_library(fresh, [paths[0], paths[1], bad / "fact0.safetensors"])
    assert ld.list_adapters(fresh) == []
    dora = tmp_path / "dora"
    dora.mkdir()
    _save_loras(dora, base_dir, 1, variant="dora")
    with pytest.raises(AdapterError, match="adapter 'fact0_2' on module .* is DoRA"):
        load_library(fresh, [paths[0], dora])
    assert ld.list_adapters(fresh) == []
    chat.main(["--model", str(base_dir), "--library", str(lib), "--lag_top_k", "2", "--prompt", "hi",
               "--max_new_tokens", "4", "--save_library", str(tmp_path / "lib.safetensors")])
    first = capsys.readouterr().out
    assert first.endswith("\n")  # the streamed answer (possibly empty for a random model) ended
    chat.main(["--model", str(base_dir), "--adapter", str(tmp_path / "lib.safetensors"), "--prompt", "hi",
               "--max_new_tokens", "4"])
    assert capsys.readouterr().out == first  # the bundled library answers the same (greedy)


def test_routing_happens_before_any_adapter_output_is_computed(monkeypatch):
    """The library is never run adapter by adapter: no adapter_output / delta_forward call during a LAG forward."""
    model = _library(4)
    fuse(model, [f"k{i}" for i in range(4)], method="lag", top_k=2)

    def boom(*_a, **_k):
        raise AssertionError("an adapter output was computed")

    monkeypatch.setattr(type(model.proj), "adapter_output", boom)
    for i in range(4):
        for method in ("delta_forward", "adapted_output"):
            monkeypatch.setattr(model.proj.adapters[f"k{i}"], method, boom)
    x = torch.randn(5, IN, dtype=torch.float64)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
        unfuse(model)  # the plain sum does run every adapter: the patch is live
        with pytest.raises(AssertionError, match="an adapter output was computed"):
            model(x)


def test_library_file_round_trip_through_load_adapter(tmp_path, tiny_llama):
    from lora_diffusion.fusion.lag import save_library

    model = tiny_llama.double()
    names = [f"t{i}" for i in range(4)]
    for i, n in enumerate(names):
        ld.add_adapter(model, ld.AdapterSpec(rank=4, targets="llm", seed=i), n, trainable=False)
        perturb(model, n, std=0.3, seed=30 + i)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    f = fuse(model, names, method="lag", top_k=2, score="delta", inplace=True)
    want = model(input_ids=ids).logits.detach()
    path = save_library(model, f, tmp_path / "lib.safetensors")
    fresh = copy.deepcopy(tiny_llama)
    ld.remove_adapters(fresh)
    ld.load_adapter(fresh, path)
    g = fresh.__dict__["_lora_fusion"]
    assert g.method.name == "lag" and g.names == names and g.method.options.score == "delta"
    assert torch.allclose(fresh(input_ids=ids).logits, want, atol=1e-10, rtol=0)
