"""LoRA-Squeeze (lora_diffusion/squeeze.py; variants.md §24): invariants, every registered variant, formats, errors."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.convert import main as convert_main
from lora_diffusion.inject.walker import adapted_layers
from lora_diffusion.squeeze import allocate, dense_spectrum, factored_spectrum, squeeze_file, truncate

from .conftest import all_variants, perturb, tiny_unet_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base64():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).double().eval()


def deltas(model, name: str = "default") -> dict[str, torch.Tensor]:
    """Each adapted module's effective ΔW (out, fan_in): W' − W for DoRA."""
    out = {}
    with torch.no_grad():
        for n, layer in adapted_layers(model):
            ad = layer.adapters[name]
            w = layer.base_weight().double()
            dw = ad.delta_weight(None) if ad.additive else ad.merged_weight(w, None, 1.0) - w
            out[n] = dw.double().flatten(1)
    return out


def adapted(base, variant: str, tmp_path, rank: int = 4, **kw):
    model = copy.deepcopy(base)
    targets = "unet-full" if "conv2d" in ld.get_variant(variant).kinds else None
    ld.add_adapter(model, ld.AdapterSpec(variant=variant, rank=rank, targets=targets, **kw))
    perturb(model)
    path = tmp_path / f"{variant}.safetensors"
    ld.save_adapter(model, path)
    return model, path


def reload(base, path):
    fresh = copy.deepcopy(base)
    ld.load_adapter(fresh, path, name="default")
    return fresh


def max_rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).norm() / max(float(b[n].norm()), 1e-300)) for n in b)


# --- every registered variant: exact when k >= the true rank of ΔW ---
@pytest.mark.parametrize("variant", all_variants())
def test_squeeze_exact_at_true_rank_every_variant(base64, variant, tmp_path):
    model, path = adapted(base64, variant, tmp_path)
    d0 = deltas(model)
    k = max(int(torch.linalg.matrix_rank(d)) for d in d0.values())  # DoRA's W' − W: full rank, exact only there
    rep = squeeze_file(path, tmp_path / "sq.safetensors", rank=k, model=model)
    sq = reload(base64, tmp_path / "sq.safetensors")
    assert ld.get_spec(sq).variant == "lora"
    assert max_rel(deltas(sq), d0) < 1e-10
    assert rep.total_error < 1e-7 and len(rep.modules) == len(d0)
    assert all(m.rank <= k for m in rep.modules)


@pytest.mark.parametrize("variant", ["lora", "loha", "tlora"])
def test_squeeze_below_rank_is_the_eckart_young_error(base64, variant, tmp_path):
    model, path = adapted(base64, variant, tmp_path, rank=6)
    d0 = deltas(model)
    rep = squeeze_file(path, tmp_path / "sq.safetensors", rank=2, model=model, method="exact")
    d1 = deltas(reload(base64, tmp_path / "sq.safetensors"))
    for m in rep.modules:
        s = torch.linalg.svdvals(d0[m.module])
        best = math.sqrt(float((s[2:] ** 2).sum() / (s ** 2).sum()))
        got = float((d1[m.module] - d0[m.module]).norm() / d0[m.module].norm())
        assert m.rank == 2 and got == pytest.approx(best, rel=1e-6, abs=1e-12)
        assert m.error == pytest.approx(got, rel=1e-6, abs=1e-12)


# --- the math ---
def test_factored_equals_dense_and_rsvd_is_accurate():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(8, 40, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    dense = dense_spectrum(0.5 * up @ down, None, "exact", g)
    fact = factored_spectrum(down, up, 0.5)
    assert torch.allclose(fact.s, dense.s[:8], rtol=1e-12)
    # low rank plus noise: randomized SVD (p = 10, q = 2) within 1e-6 of the exact best rank-k error
    dw = up @ down + 1e-4 * torch.randn(30, 40, generator=g, dtype=torch.float64)
    info = ld.core.layerinfo.LayerInfo("linear", 30, 40)
    exact = truncate(dense_spectrum(dw, 8, "exact", g), 8, info, torch.float64)[2]
    rand = truncate(dense_spectrum(dw, 8, "rsvd", g), 8, info, torch.float64)[2]
    assert rand == pytest.approx(exact, abs=1e-6)


def test_energy_allocation_is_global_monotonic_and_reaches_the_fraction():
    g = torch.Generator().manual_seed(0)
    spectra = {i: torch.sort(torch.rand(12, generator=g) * (i + 1), descending=True).values for i in range(5)}
    total = sum(float((s ** 2).sum()) for s in spectra.values())
    prev = None
    for e in (0.1, 0.3, 0.5, 0.8, 0.9, 0.99, 1.0):
        ranks = allocate(spectra, e)
        kept = sum(float((spectra[i][:r] ** 2).sum()) for i, r in ranks.items())
        assert kept >= e * total * (1 - 1e-9) and all(r >= 1 for r in ranks.values())
        if prev is not None:
            assert all(ranks[i] >= prev[i] for i in ranks)
        prev = ranks
    assert sum(allocate(spectra, 1.0).values()) == 60


def test_energy_squeeze_monotonic_on_a_file(base64, tmp_path):
    model, path = adapted(base64, "lora", tmp_path, rank=8)
    errs, sizes = [], []
    for i, e in enumerate((0.5, 0.9, 0.99, 1.0)):
        rep = squeeze_file(path, tmp_path / f"e{i}.safetensors", energy=e, model=model)
        errs.append(rep.total_error)
        sizes.append(rep.params_after)
        assert rep.total_error ** 2 <= 1 - e + 1e-9  # relative error² = the energy left out
    assert errs == sorted(errs, reverse=True) and sizes == sorted(sizes) and errs[-1] < 1e-7


# --- formats from the wild: kohya LoRA, LyCORIS LoHa / LoKr ---
@pytest.mark.parametrize("variant", ["lora", "loha", "lokr"])
def test_squeeze_kohya_files_stay_kohya(base64, variant, tmp_path):
    model = copy.deepcopy(base64)
    ld.add_adapter(model, ld.AdapterSpec(variant=variant, rank=4))
    perturb(model)
    src = tmp_path / "in.safetensors"
    ld.save_adapter(model, src, format="kohya")
    d0 = deltas(reload(base64, src))
    rep = squeeze_file(src, tmp_path / "out.safetensors", rank=64, model=model)
    from lora_diffusion.io.library import describe

    info = describe(tmp_path / "out.safetensors")
    assert info["format"] == "kohya" and info["variant"] == "lora"
    assert max_rel(deltas(reload(base64, tmp_path / "out.safetensors")), d0) < 1e-5  # kohya files are fp32
    assert rep.bytes_before > 0 and rep.bytes_after > 0


def test_squeeze_keeps_bundled_embeddings_and_writes_fp16_for_fp16(base64, tmp_path):
    from safetensors.torch import load_file, save_file

    from lora_diffusion.io.files import read_safetensors

    model, path = adapted(base64, "lora", tmp_path)
    tensors, meta = read_safetensors(path)
    tensors = {k: v.half() for k, v in tensors.items()} | {"bundle_emb.<sks>.clip_l": torch.ones(1, 32)}
    save_file(tensors, str(tmp_path / "h.safetensors"), meta)
    squeeze_file(tmp_path / "h.safetensors", tmp_path / "o.safetensors", rank=2, model=model)
    out = load_file(str(tmp_path / "o.safetensors"))
    assert torch.equal(out["bundle_emb.<sks>.clip_l"], torch.ones(1, 32))
    assert {v.dtype for k, v in out.items() if not k.startswith("bundle_emb.")} == {torch.float16}


# --- bad input: one clear error naming the option ---
@pytest.mark.parametrize("kw,match", [
    ({"energy": 0.0}, r"--energy: expected a fraction in \(0, 1\]"), ({"energy": 1.5}, r"--energy: expected a fraction"),
    ({"rank": 0}, r"--rank: expected an integer >= 1"), ({"rank": -3}, r"--rank: expected an integer >= 1"),
    ({}, "exactly one of rank"), ({"rank": 2, "energy": 0.5}, "exactly one of rank")])
def test_bad_targets(base64, tmp_path, kw, match):
    model, path = adapted(base64, "lora", tmp_path)
    with pytest.raises(ld.AdapterError, match=match):
        squeeze_file(path, tmp_path / "o.safetensors", model=model, **kw)
    assert not (tmp_path / "o.safetensors").exists()


def test_existing_output_needs_overwrite_and_dora_needs_weights(base64, tmp_path):
    model, path = adapted(base64, "lora", tmp_path)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(ld.AdapterError, match="already exists.*--overwrite"):
        squeeze_file(path, out, rank=2, model=model)
    assert out.read_bytes() == b"keep me"
    squeeze_file(path, out, rank=2, model=model, overwrite=True)
    assert ld.get_spec(reload(base64, out)).rank == 2
    dora, dpath = adapted(base64, "dora", tmp_path)
    with pytest.raises(ld.AdapterError, match="not additive.*base weights"):
        squeeze_file(dpath, tmp_path / "d.safetensors", rank=2, model=copy.deepcopy(dora).to("meta"))


def test_cli(base64, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.safetensors"
    out = tmp_path / "out.safetensors"
    assert convert_main(["squeeze", str(src), str(out), "--energy", "2"]) == 2
    assert "--energy: expected a fraction in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --rank and --energy are exclusive, one is required
        convert_main(["squeeze", str(src), str(out)])
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SD1: Linear 768 -> 320
    down, up = torch.randn(8, 768, generator=g), torch.randn(320, 8, generator=g)
    from safetensors.torch import save_file

    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0)},
              str(src), {"ss_network_dim": "8", "ss_network_alpha": "4"})
    assert convert_main(["squeeze", str(src), str(out), "--rank", "3", "--base", "sd1", "--table"]) == 0
    printed = capsys.readouterr().out
    assert "squeezed 1 modules (rank 3)" in printed and "attn2.to_k" in printed
    from safetensors.torch import load_file

    t = load_file(str(out))
    dw = 0.5 * up.double() @ down.double()
    approx = t[f"{key}.lora_up.weight"].double() @ t[f"{key}.lora_down.weight"].double()
    alpha = float(t.get(f"{key}.alpha", torch.tensor(3.0))) / 3
    s = torch.linalg.svdvals(dw)
    assert float((alpha * approx - dw).norm() / dw.norm()) == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4)
    assert convert_main(["squeeze", str(src), str(out), "--rank", "3", "--base", "sd1"]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err


# --- the peer: PEFT's convert_to_lora (exact SVD of the dense ΔW, float32) on identical weights ---
PEER_CASES = {
    "lora": lambda peft: (peft.LoraConfig(r=4, lora_alpha=6, target_modules=["lin", "lin2"]),
                          ld.AdapterSpec("lora", rank=4, alpha=6, targets=["lin", "lin2"])),
    "loha": lambda peft: (peft.LoHaConfig(r=4, alpha=6, target_modules=["lin", "lin2"]),
                          ld.AdapterSpec("loha", rank=4, alpha=6, targets=["lin", "lin2"])),
    "lokr": lambda peft: (peft.LoKrConfig(r=2, alpha=3, target_modules=["lin"]),
                          ld.AdapterSpec("lokr", rank=2, alpha=3, targets=["lin"])),
    "vera": lambda peft: (peft.VeraConfig(r=4, target_modules=["lin", "lin2"], projection_prng_key=7),
                          ld.AdapterSpec("vera", rank=4, seed=7, targets=["lin", "lin2"])),
}


@pytest.mark.parametrize("variant", sorted(PEER_CASES))
def test_squeeze_equals_peft_convert_to_lora(variant, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.conversion import convert_to_lora

    from .test_parity_peft import ParityNet, transfer

    torch.manual_seed(0)
    base = ParityNet().double()
    pcfg, spec = PEER_CASES[variant](peft)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    ours = copy.deepcopy(base)
    ld.add_adapter(ours, spec)
    transfer(ours, pm.base_model.model, "ours_to_peft")
    ld.save_adapter(ours, tmp_path / "in.safetensors")
    squeeze_file(tmp_path / "in.safetensors", tmp_path / "out.safetensors", rank=2, model=ours, method="exact")
    mine = deltas(reload(base, tmp_path / "out.safetensors"))
    with pytest.warns(UserWarning) if variant == "lora" else contextlib.nullcontext():  # "already a LoRA adapter"
        _, sd = convert_to_lora(pm, 2)
    for m, dw in mine.items():
        a = next(v for k, v in sd.items() if f".{m}.lora_A" in k).double()
        b = next(v for k, v in sd.items() if f".{m}.lora_B" in k).double()
        torch.testing.assert_close(dw, b @ a, rtol=0, atol=1e-5 * float(dw.abs().max()))  # PEFT: float32 SVD
