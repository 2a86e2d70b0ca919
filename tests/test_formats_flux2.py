"""Flux.2 LoRA/LoKr layouts (BFL names: ai-toolkit's ``diffusion_model.double_blocks.N.img_attn.qkv.lokr_w1``,
kohya sd-scripts' ``lora_unet_double_blocks_…``) on ``Flux2Transformer2DModel``: parity with diffusers' Flux.2
loader on a reduced model built from the real FLUX.2-dev config, the LoKr formula on fused modules, the map against
diffusers' checkpoint converter at the real shapes, and refusals that name Flux.2."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.io import dit
from lora_diffusion.io.files import write_safetensors

from .conftest import perturb
from .test_formats_helpers import close
from .tiny_dit import FLUX2, dit_call, flux2_call, tiny_dit, tiny_flux2

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = ("double_blocks", "single_blocks")


def _dims(model, paths: list[str]) -> tuple[int, int]:
    return sum(model.get_submodule(p).weight.shape[0] for p in paths), model.get_submodule(paths[0]).weight.shape[1]


def bfl_lokr(model, factor: int = 16, rank: int = 4, alpha: float = 2.0, seed: int = 0, extra: tuple = ()) -> dict:
    """An ai-toolkit / LyCORIS-style BFL LoKr: W1 full (a, c), W2 = W2a W2b (rank ``rank``, scaled alpha/rank) where
    LyCORIS factorizes it, else full (scale 1); factors from LyCORIS' ``factorization`` (PEFT's copy)."""
    from peft.tuners.lokr.layer import factorization

    g = torch.Generator().manual_seed(seed)
    targets, _ = dit.flux2_map(model.config)
    sd = {}
    for name, paths in targets.items():
        if not name.startswith(BLOCKS) and name not in extra:
            continue
        (a, b), (c, d) = (factorization(n, factor) for n in _dims(model, paths))
        key = f"diffusion_model.{name}"
        sd[f"{key}.lokr_w1"] = torch.randn(a, c, generator=g, dtype=torch.float64) * 0.3
        if rank < max(b, d) / 2:
            sd[f"{key}.lokr_w2_a"] = torch.randn(b, rank, generator=g, dtype=torch.float64) * 0.3
            sd[f"{key}.lokr_w2_b"] = torch.randn(rank, d, generator=g, dtype=torch.float64) * 0.3
            sd[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float64)
        else:
            sd[f"{key}.lokr_w2"] = torch.randn(b, d, generator=g, dtype=torch.float64) * 0.3
    return sd


def bfl_lora(model, rank: int = 4, seed: int = 0, prefix: str = "diffusion_model.", extra: tuple = ()) -> dict:
    g = torch.Generator().manual_seed(seed)
    targets, _ = dit.flux2_map(model.config)
    sd = {}
    for name, paths in targets.items():
        if not name.startswith(BLOCKS) and name not in extra:
            continue
        out, inn = _dims(model, paths)
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, inn, generator=g, dtype=torch.float64) * 0.3
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(out, rank, generator=g, dtype=torch.float64) * 0.3
    return sd


def diffusers_flux2(model, sd: dict):
    """diffusers' own path: ``Flux2Pipeline.lora_state_dict`` (BFL LoKr: fused to_qkv targets) then
    ``load_lora_into_transformer`` (fuses the model's QKV projections for a LoKr on them; PEFT's LoKr)."""
    from diffusers import Flux2Pipeline

    state, meta = Flux2Pipeline.lora_state_dict(dict(sd), return_lora_metadata=True)
    Flux2Pipeline.load_lora_into_transformer(state, transformer=model, metadata=meta)
    return model


def _load(model, sd: dict, path) -> torch.nn.Module:
    write_safetensors(path, sd, {})
    ours = copy.deepcopy(model)
    ld.load_adapter(ours, path)
    return ours


@pytest.mark.parametrize("factor", [16, -1])
def test_bfl_lokr_matches_diffusers(tmp_path, factor):
    """Every block module of a Flux.2 BFL LoKr (fused qkv on the double blocks, whose W2 height does not divide the
    q/k/v parts here, as on the real 6144-wide model) gives diffusers' transformer output."""
    base = tiny_flux2()
    sd = bfl_lokr(base, factor)
    ours = _load(base, sd, tmp_path / "lokr.safetensors")
    offsets = {o.get("row_offset") for o in _lokr_options(ours)}
    assert offsets - {None}, "the q/k/v parts start inside W2's rows (LoKr row_offset)"
    theirs = diffusers_flux2(copy.deepcopy(base), sd)
    assert not close(flux2_call(ours), flux2_call(base))
    assert close(flux2_call(ours), flux2_call(theirs))


def _lokr_options(model) -> list[dict]:
    from lora_diffusion.core.layer import AdaptedLayer

    return [dict(vars(a.cfg.options)) for m in model.modules() if isinstance(m, AdaptedLayer)
            for a in m.adapters.values()]


def _delta(model, path: str) -> torch.Tensor:
    layer = model.get_submodule(path)
    return next(iter(layer.adapters.values())).delta_weight().detach()


def test_bfl_lokr_fused_parts_equal_the_formula(tmp_path):
    """The q/k/v parts of ``img_attn.qkv`` stacked are ΔW = (alpha/r) · W1 ⊗ (W2a W2b) (LyCORIS' LoKr), exactly;
    a full-factor module (``img_attn.proj`` at rank 16: W2 24 x 24) has scale 1."""
    base = tiny_flux2()
    sd = bfl_lokr(base, factor=16, rank=4, alpha=2.0)
    ours = _load(base, sd, tmp_path / "lokr.safetensors")
    key = "diffusion_model.double_blocks.1.img_attn.qkv"
    want = 0.5 * torch.kron(sd[f"{key}.lokr_w1"], sd[f"{key}.lokr_w2_a"] @ sd[f"{key}.lokr_w2_b"])
    got = torch.cat([_delta(ours, f"transformer_blocks.1.attn.to_{c}") for c in "qkv"])
    assert want.shape == (3 * 384, 384) and torch.allclose(got, want, atol=1e-12)
    full = bfl_lokr(base, factor=16, rank=16)
    key = "diffusion_model.double_blocks.0.img_attn.proj"
    assert f"{key}.lokr_w2" in full
    ours = _load(base, full, tmp_path / "full.safetensors")
    want = torch.kron(full[f"{key}.lokr_w1"], full[f"{key}.lokr_w2"])
    assert torch.allclose(_delta(ours, "transformer_blocks.0.attn.to_out.0"), want, atol=1e-12)


@pytest.mark.parametrize("prefix", ["diffusion_model.", "lora_unet_"], ids=["ai-toolkit", "kohya"])
def test_bfl_lora_matches_diffusers(tmp_path, prefix):
    """Flux.2 LoRAs in BFL names (ai-toolkit ``diffusion_model.…lora_A/B``, kohya ``lora_unet_…lora_down/up`` with
    alpha), blocks, embedders and (ai-toolkit) the shared modulation, give diffusers' outputs."""
    base = tiny_flux2()
    extra = ("img_in", "time_in.in_layer") + (  # diffusers' kohya Flux.2 converter drops modulation keys (a warning)
        ("double_stream_modulation_img.lin", "single_stream_modulation.lin") if prefix != "lora_unet_" else ())
    sd = bfl_lora(base, extra=extra)
    if prefix == "lora_unet_":
        sd = {f"lora_unet_{k.removeprefix('diffusion_model.').rsplit('.lora_', 1)[0].replace('.', '_')}"
              f".lora_{'down' if '.lora_A.' in k else 'up'}.weight": v for k, v in sd.items()}
        sd |= {f"{k.split('.')[0]}.alpha": torch.tensor(2.0, dtype=torch.float64) for k in list(sd)}
    ours = _load(base, sd, tmp_path / "lora.safetensors")
    theirs = diffusers_flux2(copy.deepcopy(base), sd)
    assert not close(flux2_call(ours), flux2_call(base))
    assert close(flux2_call(ours), flux2_call(theirs))


@pytest.mark.parametrize("fmt,preset", [("kohya", "dit-attn-mlp"), ("kohya", "dit-full"), ("diffusers", "dit-full")])
def test_flux2_export_round_trip(tmp_path, fmt, preset):
    """Our LoRA on a Flux.2 transformer written in kohya's layout (q/k/v fused exactly into ``img_attn.qkv``) or
    diffusers' reads back in our loader and in diffusers' Flux.2 loader with our outputs (kohya: blocks only, its
    kohya Flux.2 converter drops modulation keys with a warning)."""
    from lora_diffusion.io.files import read_safetensors

    base = tiny_flux2()
    model = copy.deepcopy(base)
    ld.add_adapter(model, ld.AdapterSpec(rank=4, alpha=2, targets=preset))
    perturb(model, std=0.3)
    out = tmp_path / "k.safetensors"
    ld.save_adapter(model, out, format=fmt)
    sd, meta = read_safetensors(out)
    if fmt == "kohya":
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in sd
        assert meta["ss_base_model_version"] == "flux2"
    again = copy.deepcopy(base)
    ld.load_adapter(again, out)
    assert close(flux2_call(again), flux2_call(model))
    if (fmt, preset) != ("kohya", "dit-full"):
        assert close(flux2_call(diffusers_flux2(copy.deepcopy(base), sd)), flux2_call(model))


def test_flux2_names_match_diffusers_single_file_converter():
    """The Flux.2 original-name map (qkv row order, the final layer's swapped halves) equals diffusers'
    ``convert_flux2_transformer_checkpoint_to_diffusers`` on the real FLUX.2-dev shapes, every Linear."""
    from .test_formats_dit import check_against_single_file_converter

    check_against_single_file_converter(FLUX2, "flux2")


def _refused(tmp_path, model, sd: dict, match: str, call) -> None:
    write_safetensors(tmp_path / "bad.safetensors", sd, {})
    before = call(model)
    with pytest.raises(ld.AdapterFileError, match=match):
        ld.load_adapter(model, tmp_path / "bad.safetensors")
    assert ld.list_adapters(model) == [] and torch.equal(call(model), before)


def test_flux2_file_on_flux1_refused(tmp_path):
    flux2 = bfl_lora(tiny_flux2())
    _refused(tmp_path, tiny_dit(), flux2, r"this LoRA is for Flux\.2, a transformer model; the model is Flux, a "
             r"transformer model; expected a Flux LoRA", dit_call)


def test_flux1_file_on_flux2_refused(tmp_path):
    from .test_formats_dit import _kohya_flux_file

    flux1 = _kohya_flux_file(tiny_dit())
    _refused(tmp_path, tiny_flux2(), flux1, r"this LoRA is for Flux, a transformer model; the model is Flux\.2, a "
             r"transformer model; expected a Flux\.2 LoRA", flux2_call)


def test_flux2_deeper_file_refused(tmp_path):
    deeper = bfl_lokr(tiny_flux2(num_layers=3))
    _refused(tmp_path, tiny_flux2(), deeper, r"key 'diffusion_model\.double_blocks\.2\.[^']*': this LoRA is for "
             r"Flux\.2 and adapts double_blocks\.2; the model is Flux\.2 with 2 double-stream and 2 single-stream",
             flux2_call)


def test_flux_generation_from_shapes():
    """Flux.1 vs Flux.2 from BFL-named shapes (their MLPs and single blocks differ); attention alone at 3072 wide
    (Flux.1, or Flux.2 klein 4B) does not tell, and such a file is accepted on either."""
    from lora_diffusion.io.detect import file_family, flux_generation

    def shapes(sd):
        return {k: tuple(v.shape) for k, v in sd.items()}

    assert file_family(shapes(bfl_lokr(tiny_flux2())), {}) == "flux2"
    assert file_family(shapes(bfl_lora(tiny_flux2())), {}) == "flux2"
    qkv = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (4, 3072),
           "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": (9216, 4)}
    assert flux_generation(qkv) is None and file_family(qkv, {}) == "flux"
    wide = {k.replace("3072", "6144"): (s[0], 6144) if s[1] == 3072 else (18432, 4) for k, s in qkv.items()}
    assert file_family(wide, {}) == "flux2"


def test_bfl_lokr_saved_canonical_and_refused_elsewhere(tmp_path):
    """A loaded BFL LoKr (its q/k/v parts are further variant groups: their own row offsets) round-trips through the
    canonical file, groups included; diffusers / PEFT, which have no form for a LoKr on part of a fused module,
    refuse it with the module named and write nothing (kohya / bfl fuse it back: the next test)."""
    base = tiny_flux2()
    ours = _load(base, bfl_lokr(base), tmp_path / "lokr.safetensors")
    name, *groups = ld.list_adapters(ours)
    assert len(groups) == 3  # one per q/k/v row offset
    ld.save_adapter(ours, tmp_path / "canon.safetensors", name=name)
    again = copy.deepcopy(base)
    assert ld.load_adapter(again, tmp_path / "canon.safetensors", name="back") == "back"
    assert len(ld.list_adapters(again)) == 4
    assert torch.equal(flux2_call(again), flux2_call(ours))
    ld.remove_adapters(again, ["back"])
    assert ld.list_adapters(again) == [] and torch.equal(flux2_call(again), flux2_call(base))
    from lora_diffusion.convert import convert

    with pytest.raises(ld.AdapterFileError, match="a LoKr on part of a fused module"):  # the groups read as parts
        convert(tmp_path / "canon.safetensors", tmp_path / "c.safetensors", "diffusers", model=copy.deepcopy(base))
    for fmt in ("diffusers", "peft"):
        with pytest.raises(ld.AdapterFileError, match=r"module 'transformer_blocks\.\d\.attn\.[a-z_]+': a LoKr on "
                           rf"part of a fused module .* has no {fmt} form"):
            ld.save_adapter(ours, tmp_path / f"out-{fmt}", name=name, format=fmt)
        assert not (tmp_path / f"out-{fmt}").exists()


@pytest.mark.parametrize("fixture,base", [(FLUX2, "flux2"), ("flux2-klein-4b-transformer.json", "flux2-klein-4b")])
def test_convert_flux2_without_a_model(tmp_path, fixture, base):
    """``python -m lora_diffusion.convert`` maps a real-shaped Flux.2 ai-toolkit LoRA (FLUX.2-dev, or klein 4B told
    from its 3072 width) through a meta-device transformer: the diffusers file equals diffusers' own conversion, and
    converting that to kohya gives sd-scripts' names."""
    from diffusers import Flux2Pipeline

    from lora_diffusion.convert import main
    from lora_diffusion.io.files import read_safetensors

    from .test_presets_dit_meta import meta_transformer

    model = meta_transformer(fixture)
    g = torch.Generator().manual_seed(0)
    last = model.config.num_single_layers - 1
    sd = {}
    for name in ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", f"single_blocks.{last}.linear1"):
        paths = dit.flux2_map(model.config)[0][name]
        out, inn = _dims(model, paths)
        sd[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(2, inn, generator=g)
        sd[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(out, 2, generator=g)
    write_safetensors(tmp_path / "a.safetensors", sd, {})
    assert main([str(tmp_path / "a.safetensors"), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    ours, meta = read_safetensors(tmp_path / "d.safetensors")
    assert meta["base_model_family"] == "flux2"
    theirs = Flux2Pipeline.lora_state_dict(dict(sd))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert main([str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    back = read_safetensors(tmp_path / "k.safetensors")[0]
    assert {k.split(".")[0] for k in back} == {f"lora_unet_{n.replace('.', '_')}" for n in (
        "double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", f"single_blocks.{last}.linear1")}


UNSUPPORTED = {  # one key of each family's usual LoRA files (diffusers, ai-toolkit/ComfyUI or kohya names)
    "Qwen-Image": "transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight",
    "Z-Image / Lumina 2": "diffusion_model.noise_refiner.0.attention.to_q.lora_A.weight",
    "HiDream": "diffusion_model.double_stream_blocks.0.block.attn1.to_q.lora_A.weight",
    "Chroma": "diffusion_model.distilled_guidance_layer.layers.0.in_layer.lora_A.weight",
    "Wan": "lora_unet_blocks_0_self_attn_q.lora_down.weight",
    "AuraFlow": "transformer.joint_transformer_blocks.0.attn.to_q.lora_A.weight",
    "SANA": "transformer.transformer_blocks.0.ff.conv_inverted.lora_A.weight",
}


@pytest.mark.parametrize("family", sorted(UNSUPPORTED))
def test_unsupported_family_refused_naming_it(tmp_path, family):
    """A LoRA for a diffusion transformer this project does not adapt is refused before anything is injected, naming
    the family found and the model's (here on Flux.2; the same check runs for every model), and convert names it."""
    from lora_diffusion.convert import convert

    key = UNSUPPORTED[family]
    down = key.endswith(("lora_A.weight", "lora_down.weight"))
    sd = {key: torch.randn(4, 384) if down else torch.randn(384, 4)}
    up = key.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
    sd[up] = torch.randn(384, 4)
    _refused(tmp_path, tiny_flux2(), sd, rf"this LoRA is for {re.escape(family)}, a model family this project does not "
             r"support; the model is Flux\.2, a transformer model", flux2_call)
    with pytest.raises(ld.AdapterError, match=rf"this LoRA is for {re.escape(family)}, a model family"):
        convert(tmp_path / "bad.safetensors", tmp_path / "out.safetensors", "diffusers")


def test_unsupported_family_on_a_unet_refused(tmp_path):
    from .test_formats_helpers import sdxl_pipeline

    pipe = sdxl_pipeline()
    sd = {UNSUPPORTED["Qwen-Image"]: torch.randn(4, 64), UNSUPPORTED["Qwen-Image"].replace("lora_A", "lora_B"):
          torch.randn(64, 4)}
    write_safetensors(tmp_path / "q.safetensors", sd, {})
    with pytest.raises(ld.AdapterFileError, match=r"this LoRA is for Qwen-Image, a model family this project does not "
                       r"support; the model is SDXL"):
        ld.load_adapter(pipe, tmp_path / "q.safetensors")
    assert ld.list_adapters(pipe) == []


def test_flux2_in_library_sidecars_and_file_descriptions(tmp_path):
    """Civitai's "Flux.2 D" / "Flux.2 Klein" base models and a Flux.2 file's keys give the flux2 family (not Flux.1)."""
    from lora_diffusion.io.library import describe
    from lora_diffusion.retrieval.library import _sidecar_fields

    assert _sidecar_fields({"baseModel": "Flux.2 D"})["family"] == "flux2"
    assert _sidecar_fields({"baseModel": "Flux.2 Klein 4B"})["family"] == "flux2"
    assert _sidecar_fields({"baseModel": "Flux.1 D"})["family"] == "flux"
    write_safetensors(tmp_path / "f2.safetensors", bfl_lokr(tiny_flux2()), {})
    assert describe(tmp_path / "f2.safetensors")["base_family"] == "flux2"


@pytest.mark.parametrize("factor", [16, -1])
def test_bfl_lokr_written_back_exactly(tmp_path, factor):
    """A BFL LoKr loaded (q/k/v parts with row offsets) and saved as ``format="bfl"`` is the original file again,
    tensor for tensor (W1 put back from the parts' rows); diffusers' Flux.2 loader reads the export with our outputs;
    ``format="kohya"`` names the same fused modules (sd-scripts names) and reads back equal. Parts trained apart are
    refused with the module named."""
    from lora_diffusion.io.files import read_safetensors

    base = tiny_flux2()
    sd = bfl_lokr(base, factor)
    ours = _load(base, sd, tmp_path / "lokr.safetensors")
    name = ld.list_adapters(ours)[0]
    ld.save_adapter(ours, tmp_path / "bfl.safetensors", name=name, format="bfl")
    back, _ = read_safetensors(tmp_path / "bfl.safetensors")
    assert set(back) == set(sd) and all(torch.equal(back[k].to(sd[k].dtype), sd[k]) for k in sd)
    assert close(flux2_call(diffusers_flux2(copy.deepcopy(base), back)), flux2_call(ours))
    ld.save_adapter(ours, tmp_path / "k.safetensors", name=name, format="kohya")
    kohya, _ = read_safetensors(tmp_path / "k.safetensors")
    assert "lora_unet_double_blocks_1_img_attn_qkv.lokr_w1" in kohya
    assert torch.equal(flux2_call(_load(base, kohya, tmp_path / "k2.safetensors")), flux2_call(ours))
    with torch.no_grad():  # the k part trains apart from q and v
        ours.get_submodule("transformer_blocks.0.attn.to_k").adapters[f"{name}_lokr2"].lokr_w1.add_(0.1)
    with pytest.raises(ld.AdapterFileError, match=r"module 'transformer_blocks\.0\.attn\.to_[qkv]': its LoKr and those of "
                       r"the other parts of the fused module 'double_blocks\.0\.img_attn\.qkv'"):
        ld.save_adapter(ours, tmp_path / "apart.safetensors", name=name, format="bfl")
    assert not (tmp_path / "apart.safetensors").exists()


@pytest.mark.parametrize("preset", ["dit-attn-mlp", "dit-full"])
def test_bfl_lora_export_through_diffusers(tmp_path, preset):
    """Our LoRA on Flux.2 as ``format="bfl"`` (ai-toolkit's ``diffusion_model.…lora_A/B``, alpha folded): diffusers'
    Flux.2 loader (modulation included) and ours give our outputs."""
    from lora_diffusion.io.files import read_safetensors

    base = tiny_flux2()
    model = copy.deepcopy(base)
    ld.add_adapter(model, ld.AdapterSpec(rank=4, alpha=2, targets=preset))
    perturb(model, std=0.3)
    out = ld.save_adapter(model, tmp_path / "a.safetensors", format="bfl")
    sd, _ = read_safetensors(out)
    assert all(k.startswith("diffusion_model.") and ".lora_" in k for k in sd)
    assert close(flux2_call(diffusers_flux2(copy.deepcopy(base), sd)), flux2_call(model))
    assert close(flux2_call(_load(base, sd, tmp_path / "b.safetensors")), flux2_call(model))
