"""Flux.1 / SD3.5 LoRA layouts: read and written, with parity against diffusers (its Flux/SD3 LoRA loaders and
converters) on reduced models built from the real configs, and on the real-shaped (meta) models for coverage."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.io.files import read_safetensors, write_safetensors

from .conftest import perturb
from .test_formats_helpers import close
from .tiny_dit import dit_call, tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")

FLUX, SCHNELL = "flux1-dev-transformer.json", "flux1-schnell-transformer.json"
SD35M, SD35L = "sd35-medium-transformer.json", "sd35-large-transformer.json"


def _pipe_cls(model):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return FluxPipeline if "Flux" in type(model).__name__ else StableDiffusion3Pipeline


def diffusers_load(model, sd: dict, metadata: dict | None = None):
    """diffusers' own path: ``<Pipeline>.lora_state_dict`` (its format conversions) then ``load_lora_into_transformer``
    (PEFT), as ``pipe.load_lora_weights`` does for the transformer."""
    cls = _pipe_cls(model)
    out = cls.lora_state_dict(dict(sd), return_lora_metadata=True, **({"return_alphas": True} if "Flux" in cls.__name__ else {}))
    state, meta = out[0], out[-1]
    kw = {"network_alphas": out[1]} if len(out) == 3 else {}
    cls.load_lora_into_transformer(state, transformer=model, metadata=metadata if metadata is not None else meta, **kw)
    return model


def _random_lora(model, preset: str, rank: int = 4, seed: int = 0, prefix: str = "transformer.") -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ld.find_targets(model, ld.AdapterSpec(targets=preset)):
        w = model.get_submodule(name).weight
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g, dtype=torch.float64) * 0.3
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g, dtype=torch.float64) * 0.3
    return sd


@pytest.mark.parametrize("fixture", [FLUX, SCHNELL, SD35M, SD35L])
@pytest.mark.parametrize("with_meta", [False, True], ids=["ai-toolkit", "diffusers"])
def test_diffusers_layout_parity(tmp_path, fixture, with_meta):
    """``transformer.…lora_A/B`` files (diffusers; ai-toolkit writes them without ``lora_adapter_metadata``,
    meaning alpha = rank) load with the same outputs as diffusers' loader."""
    base = tiny_dit(fixture)
    sd = _random_lora(base, "dit-full")
    meta = {"format": "pt"}
    if with_meta:
        names = sorted({k.split(".lora_")[0].removeprefix("transformer.") for k in sd})
        meta["lora_adapter_metadata"] = json.dumps({"transformer.r": 4, "transformer.lora_alpha": 2,
                                                    "transformer.target_modules": names})
    write_safetensors(tmp_path / "l.safetensors", sd, meta)
    ours = copy.deepcopy(base)
    ld.load_adapter(ours, tmp_path / "l.safetensors")
    theirs = diffusers_load(copy.deepcopy(base), sd, json.loads(meta["lora_adapter_metadata"]) if with_meta else None)
    assert not close(dit_call(ours), dit_call(base))
    assert close(dit_call(ours), dit_call(theirs))


# --- the original (BFL / kohya sd-scripts) layout on the real-shaped model -------------------------------------
def _meta_model(fixture):
    from .test_presets_dit_meta import meta_transformer

    return meta_transformer(fixture)


def _kohya_flux_file(model, seed: int = 0, rank: int = 4, te: bool = False) -> dict:
    """Every module a kohya Flux file can name (304 in the blocks + the embedders and final layer), real shapes."""
    from lora_diffusion.io import dit

    g = torch.Generator().manual_seed(seed)
    targets, _ = dit.flux_map(model.config)
    sd = {}
    for i, (dotted, paths) in enumerate(targets.items()):
        mods = [model.get_submodule(p) for p in paths if _has(model, p)]
        if not mods:
            continue
        flat = dit.flat("lora_unet", dotted)
        sd[flat + ".lora_down.weight"] = torch.randn(rank, mods[0].in_features, generator=g) * 0.1
        sd[flat + ".lora_up.weight"] = torch.randn(sum(m.out_features for m in mods), rank, generator=g) * 0.1
        # diffusers ignores the alphas of final_layer (its converter's TODO): leave those at alpha = rank
        sd[flat + ".alpha"] = torch.tensor(float(rank if "final_layer" in dotted else 1 + i % 7))
    if te:
        sd |= {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(rank, 768, generator=g),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(768, rank, generator=g),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0)}
    return sd


def _has(model, path):
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _our_bundle(tmp_path, sd, model, name="k.safetensors", **components):
    from lora_diffusion.io import formats
    from lora_diffusion.io.bundle import model_view

    write_safetensors(tmp_path / name, sd, {})
    models = {"transformer": model, **components}
    views = {k: model_view(m) for k, m in models.items()}
    return formats.read_bundle(tmp_path / name, views, None, read_safetensors(tmp_path / name), models=models)


def _delta_probe(part, module: str, x: torch.Tensor) -> torch.Tensor:
    spec = part.spec
    a, b = part.tensors[f"{module}.lora_A"].double(), part.tensors[f"{module}.lora_B"].double()
    s = (spec.alpha_for(module) or spec.rank_for(module)) / spec.rank_for(module)
    return s * (b @ (a @ x[: a.shape[1]]))


@pytest.mark.parametrize("fixture", [FLUX, SCHNELL])
def test_kohya_flux_real_shapes_match_diffusers_conversion(tmp_path, fixture):
    """A kohya Flux file at the real shapes (every block module, embedders, final layer with its swapped halves):
    per module, our ΔW·x equals that of diffusers' converted LoRA (``FluxPipeline.lora_state_dict``)."""
    from diffusers import FluxPipeline

    model = _meta_model(fixture)
    sd = _kohya_flux_file(model)
    # diffusers names the embedders and the final layer without the "transformer." prefix (its loader then drops
    # them: only "transformer.*" keys reach the model); the conversion itself is compared here
    theirs = {k.removeprefix("transformer."): v for k, v in FluxPipeline.lora_state_dict(dict(sd)).items()}
    bundle = _our_bundle(tmp_path, sd, model)
    (part,) = bundle.parts
    assert set(part.modules) == {k.rsplit(".lora_", 1)[0] for k in theirs}
    assert len(part.modules) == 494 + (10 if fixture == FLUX else 8)  # blocks + 8 embedder linears (schnell 6), final layer
    x = torch.randn(21504, dtype=torch.float64)
    for m in part.modules:
        a, b = theirs[f"{m}.lora_A.weight"].double(), theirs[f"{m}.lora_B.weight"].double()
        assert close(_delta_probe(part, m, x), b @ (a @ x[: a.shape[1]]), tol=1e-5), m  # float32 files


# --- reduced pipelines: our load_adapter vs diffusers' load_lora_weights -----------------------------------------
def _te_lora(prefix: str, encoder, rank: int = 4, seed: int = 3, t5: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    names = ld.find_targets(encoder, ld.AdapterSpec(targets="t5-text-mlp" if t5 else "clip-text-mlp"))
    sd = {}
    for n in names:
        m = encoder.get_submodule(n)
        flat = f"{prefix}_{('' if t5 or n.startswith('text_model.') else 'text_model_')}{n.replace('.', '_')}"
        sd[f"{flat}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.2
        sd[f"{flat}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.2
        sd[f"{flat}.alpha"] = torch.tensor(2.0)
    return sd


def _double_only(sd: dict) -> dict:
    """diffusers' kohya Flux converter splits single blocks' linear1 by Flux.1's real widths (3072 x 3 + 12288):
    on a reduced model only the double blocks can go through it."""
    return {k: v for k, v in sd.items() if "double_blocks" in k}


def test_kohya_flux_with_text_encoders_matches_diffusers(tmp_path):
    from .tiny_dit import te_out, tiny_dit_pipeline

    base = tiny_dit_pipeline()
    sd = _double_only(_kohya_flux_file(base.transformer)) | _te_lora("lora_te1", base.text_encoder)
    t5 = _te_lora("lora_te3", base.text_encoder_2, t5=True)  # sd-scripts' T5 prefix (lora_te2 in its first release)
    write_safetensors(tmp_path / "k.safetensors", sd | t5, {"ss_base_model_version": "flux1"})
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    ld.load_adapter(ours, tmp_path / "k.safetensors", name="k")
    theirs.load_lora_weights(dict(sd | t5))
    layers = [ours.transformer.get_submodule(f"transformer_blocks.0.attn.to_{c}").adapters["k"] for c in "qkv"]
    assert len({ad.lora_A.data_ptr() for ad in layers}) == 3  # split parts do not share storage (trained apart)
    assert not close(dit_call(ours.transformer), dit_call(base.transformer))
    assert close(dit_call(ours.transformer), dit_call(theirs.transformer))
    assert not close(te_out(ours.text_encoder), te_out(base.text_encoder))
    assert close(te_out(ours.text_encoder), te_out(theirs.text_encoder))
    # diffusers drops T5 LoRAs (logged); we apply them
    assert close(te_out(theirs.text_encoder_2), te_out(base.text_encoder_2))
    assert not close(te_out(ours.text_encoder_2), te_out(base.text_encoder_2))
    ld.remove_adapters(ours)
    assert close(dit_call(ours.transformer), dit_call(base.transformer))


def _xlabs_file(model, rank: int = 4, seed: int = 5) -> dict:
    from lora_diffusion.io import dit

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for dotted, paths in dit.xlabs_map(model.config).items():
        mods = [model.get_submodule(p) for p in paths]
        sd[f"{dotted}.down.weight"] = torch.randn(rank, mods[0].in_features, generator=g) * 0.2
        sd[f"{dotted}.up.weight"] = torch.randn(sum(m.out_features for m in mods), rank, generator=g) * 0.2
    return sd


@pytest.mark.parametrize("layout", ["xlabs", "comfyui", "onetrainer"])
def test_flux_layouts_match_diffusers(tmp_path, layout):
    """XLabs (``double_blocks.N.processor.qkv_lora1.down.weight``), ComfyUI (``diffusion_model.<BFL name>``) and
    OneTrainer (``lora_transformer_<diffusers path>``, CLIP ``lora_te1_``) files: the same outputs as diffusers."""
    from .tiny_dit import te_out, tiny_dit_pipeline

    base = tiny_dit_pipeline()
    if layout == "xlabs":
        sd = _xlabs_file(base.transformer)
    elif layout == "comfyui":
        sd = _comfy(_double_only(_kohya_flux_file(base.transformer)), base.transformer)
        for k, v in _te_lora("lora_te1", base.text_encoder).items():  # ComfyUI's own text-encoder names
            module, _, param = k.partition(".")
            dotted = module.removeprefix("lora_te1_").replace("_", ".").replace("self.attn", "self_attn")
            dotted = dotted.replace("text.model", "text_model").replace("q.proj", "q_proj").replace("k.proj", "k_proj")
            dotted = dotted.replace("v.proj", "v_proj").replace("out.proj", "out_proj")
            sd[f"text_encoders.clip_l.transformer.{dotted}.{param}"] = v
    else:
        sd = {k.replace("transformer.", "lora_transformer_", 1).rsplit(".lora_", 1)[0].replace(".", "_")
              + {"A": ".lora_down.weight", "B": ".lora_up.weight"}[k[-8]]: v.float()
              for k, v in _random_lora(base.transformer, "dit-attn").items()}  # diffusers' OneTrainer converter
        # names attention modules only (an MLP / modulation key becomes 'transformer_blocks.N', a KeyError)
        sd |= {k.split(".")[0] + ".alpha": torch.tensor(2.0) for k in list(sd)}
        sd |= _te_lora("lora_te1", base.text_encoder)
    write_safetensors(tmp_path / f"{layout}.safetensors", sd, {})
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    ld.load_adapter(ours, tmp_path / f"{layout}.safetensors")
    theirs.load_lora_weights(dict(sd))
    assert not close(dit_call(ours.transformer), dit_call(base.transformer))
    assert close(dit_call(ours.transformer), dit_call(theirs.transformer))
    assert close(te_out(ours.text_encoder), te_out(theirs.text_encoder))
    assert (layout == "xlabs") == close(te_out(ours.text_encoder), te_out(base.text_encoder))  # XLabs: no text encoder


def _comfy(sd: dict, model) -> dict:
    """kohya keys -> ComfyUI's ``diffusion_model.<original dotted name>.<param>``."""
    from lora_diffusion.io import dit

    names = dit.source_names(dit.flux_map(model.config)[0], "lora_unet")
    return {f"diffusion_model.{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in sd.items()}


# --- our exports -------------------------------------------------------------------------------------------------
def _trained_pipeline(fixture, exclude=()):
    from .tiny_dit import tiny_dit_pipeline

    pipe = tiny_dit_pipeline(fixture)
    ld.add_adapter(pipe.transformer, ld.AdapterSpec(rank=4, alpha=2, targets="dit-full", exclude=list(exclude),
                                                    rank_pattern={"to_k": 2}, alpha_pattern={"proj_out": 6}), "x")
    ld.add_adapter(pipe.text_encoder, ld.AdapterSpec(rank=4, alpha=8, targets="clip-text"), "x")
    t5 = pipe.text_encoder_2 if "Flux" in type(pipe).__name__ else pipe.text_encoder_3
    ld.add_adapter(t5, ld.AdapterSpec(rank=2, targets="t5-text"), "x")
    for m in (pipe.transformer, pipe.text_encoder, t5):
        perturb(m, "x", std=0.2)
    return pipe


def _outputs(pipe):
    from .tiny_dit import te_out

    return [dit_call(pipe.transformer)] + [te_out(m) for k, m in pipe.components.items() if k.startswith("text_encoder")
                                           and m is not None]


@pytest.mark.parametrize("fixture", [FLUX, SD35M])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_exports_round_trip(tmp_path, fixture, fmt):
    """Every DiT module, both text encoders' attention, rank/alpha patterns: saved and loaded back exactly."""
    from .tiny_dit import tiny_dit_pipeline

    pipe = _trained_pipeline(fixture)
    path = ld.save_adapter(pipe, tmp_path / f"x.{fmt}.safetensors", "x", format=fmt)
    tensors, meta = read_safetensors(path)
    if fmt == "kohya":  # the original module names (fused qkv) and sd-scripts' text-encoder prefixes
        family = "flux" if fixture == FLUX else "sd3"
        assert meta["ss_base_model_version"] == ("flux1" if family == "flux" else "sd3")
        blocks = ("double_blocks_", "single_blocks_") if family == "flux" else ("joint_blocks_",)
        assert any(f"lora_unet_{blocks[0]}0_" in k for k in tensors)
        assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te3_")) for k in tensors), sorted(tensors)[:3]
        assert not any(k.startswith("lora_unet_") and "transformer_blocks" in k for k in tensors)
    again = tiny_dit_pipeline(fixture)
    ld.load_adapter(again, path, name="y")
    for a, b in zip(_outputs(again), _outputs(pipe)):
        assert close(a, b)


@pytest.mark.parametrize("fixture", [FLUX, SD35M, SD35L])
def test_diffusers_export_loads_in_diffusers(tmp_path, fixture):
    from .tiny_dit import te_out, tiny_dit_pipeline

    pipe = _trained_pipeline(fixture)
    path = ld.save_adapter(pipe, tmp_path / "x.safetensors", "x", format="diffusers")
    theirs = tiny_dit_pipeline(fixture)
    tensors = read_safetensors(path)[0]
    theirs.load_lora_weights({k: v for k, v in tensors.items() if k.startswith(("transformer.", "text_encoder."))})
    assert close(dit_call(theirs.transformer), dit_call(pipe.transformer))
    assert close(te_out(theirs.text_encoder), te_out(pipe.text_encoder))


def test_kohya_flux_export_loads_in_diffusers(tmp_path):
    """Our kohya Flux file (fused qkv: A = [s·A_q; s·A_k; s·A_v], B = blockdiag) through diffusers' converter: the
    double blocks on the reduced model (its single-block split assumes Flux.1's real widths, checked below)."""
    from .tiny_dit import te_out, tiny_dit_pipeline

    pipe = _trained_pipeline(FLUX, exclude=[r"re:single_transformer_blocks\..*"])
    path = ld.save_adapter(pipe, tmp_path / "x.safetensors", "x", format="kohya")
    theirs = tiny_dit_pipeline(FLUX)
    theirs.load_lora_weights(str(path))
    assert close(dit_call(theirs.transformer), dit_call(pipe.transformer))
    assert close(te_out(theirs.text_encoder), te_out(pipe.text_encoder))


@pytest.mark.parametrize("fixture", [FLUX, SCHNELL])
def test_kohya_flux_writer_real_shapes_through_diffusers(tmp_path, fixture):
    """Read a real-shaped kohya file, write it back in the original layout, convert both with diffusers: the same
    ΔW·x per module (the writer's fusion, single blocks' linear1 and the final layer's swap included)."""
    from diffusers import FluxPipeline

    from lora_diffusion.io import formats
    from lora_diffusion.io.bundle import model_view

    model = _meta_model(fixture)
    sd = _kohya_flux_file(model, seed=2)
    bundle = _our_bundle(tmp_path, sd, model)
    formats.write_parts(tmp_path / "w.safetensors", bundle.parts, "kohya", {"transformer": model_view(model)}, {},
                        "flux", model.config)
    written = read_safetensors(tmp_path / "w.safetensors")[0]
    assert {k.split(".")[0] for k in written} == {k.split(".")[0] for k in sd}
    first = {k.removeprefix("transformer."): v for k, v in FluxPipeline.lora_state_dict(dict(sd)).items()}
    second = {k.removeprefix("transformer."): v for k, v in FluxPipeline.lora_state_dict(dict(written)).items()}
    assert set(first) == set(second)
    x = torch.randn(21504, dtype=torch.float64)
    for k in [k for k in first if k.endswith(".lora_A.weight")]:
        b = k.replace(".lora_A.", ".lora_B.")
        d1 = first[b].double() @ (first[k].double() @ x[: first[k].shape[1]])
        d2 = second[b].double() @ (second[k].double() @ x[: second[k].shape[1]])
        assert close(d2, d1), k


# --- bad input: one error naming the family found and the one expected; the model unchanged ----------------------
def _refused(tmp_path, pipe, sd, match, name="bad.safetensors"):
    write_safetensors(tmp_path / name, sd, {})
    before = _outputs(pipe)
    with pytest.raises(ld.AdapterFileError, match=match):
        ld.load_adapter(pipe, tmp_path / name)
    assert ld.list_adapters(pipe) == []
    for a, b in zip(_outputs(pipe), before):
        assert torch.equal(a, b)


def _unet_kohya(cross: int) -> dict:
    g = torch.Generator().manual_seed(0)
    flat = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    return {f"{flat}.lora_down.weight": torch.randn(4, cross, generator=g),
            f"{flat}.lora_up.weight": torch.randn(320, 4, generator=g)}


@pytest.mark.parametrize("cross,words", [(768, "SD1.x, a UNet model"), (2048, "SDXL, a UNet model"),
                                         (40, r"a UNet model \(Stable Diffusion 1/2/XL-style\)")])
@pytest.mark.parametrize("fixture,family", [(FLUX, "Flux"), (SD35M, "SD3")])
def test_unet_lora_on_dit_refused(tmp_path, cross, words, fixture, family):
    from .tiny_dit import tiny_dit_pipeline

    _refused(tmp_path, tiny_dit_pipeline(fixture), _unet_kohya(cross),
             rf"bad.safetensors: this LoRA is for {words}; the model is {family}, a transformer model; "
             rf"expected a {family} LoRA")


def test_flux_lora_on_sd3_and_back_refused(tmp_path):
    from .tiny_dit import tiny_dit_pipeline

    flux_file = _kohya_flux_file(tiny_dit(FLUX))
    _refused(tmp_path, tiny_dit_pipeline(SD35M), flux_file,
             "this LoRA is for Flux, a transformer model; the model is SD3, a transformer model; expected a SD3 LoRA")
    sd3_file = {k.replace("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn_qkv"): v
                for k, v in flux_file.items() if "double_blocks_0_img_attn_qkv" in k}
    _refused(tmp_path, tiny_dit_pipeline(FLUX), sd3_file,
             "this LoRA is for SD3, a transformer model; the model is Flux, a transformer model; expected a Flux LoRA")
    peft_flux = _random_lora(tiny_dit(FLUX), "dit-attn")  # diffusers layout: single_transformer_blocks say Flux
    _refused(tmp_path, tiny_dit_pipeline(SD35L), peft_flux, "this LoRA is for Flux, a transformer model; the model is SD3")


def test_blocks_the_model_does_not_have_refused(tmp_path):
    from .tiny_dit import tiny_dit_pipeline

    deeper = _kohya_flux_file(tiny_dit(FLUX, num_layers=3))
    _refused(tmp_path, tiny_dit_pipeline(FLUX), {k: v for k, v in deeper.items() if "double_blocks_2_" in k},
             r"key 'lora_unet_double_blocks_2_.*': this LoRA is for Flux and adapts double_blocks.2; the model is Flux "
             "with 2 double-stream and 2 single-stream blocks, which has no such block")
    deeper_sd3 = _random_lora(tiny_dit(SD35L, num_layers=4), "dit-attn")
    _refused(tmp_path, tiny_dit_pipeline(SD35L), {k: v for k, v in deeper_sd3.items() if "blocks.3." in k},
             r"key 'transformer.transformer_blocks.3.attn.*': this LoRA is for SD3 and adapts transformer_blocks.3; "
             "the model is SD3 with 3 joint blocks, which has no such block")


def test_mismatched_text_encoder_part_refused(tmp_path):
    from .test_formats_helpers import text_encoder
    from .tiny_dit import tiny_dit_pipeline

    clip_g_as_te2 = _te_lora("lora_te2", text_encoder(hidden=48, projection=True))  # SDXL/SD3's CLIP-G names
    _refused(tmp_path, tiny_dit_pipeline(FLUX), _double_only(_kohya_flux_file(tiny_dit(FLUX))) | clip_g_as_te2,
             r"key 'lora_te2_text_model_.*': the file's text-encoder part 'lora_te2_…' is for a CLIP encoder; the Flux "
             "pipeline's text_encoder_2 is a T5 encoder")
    pipe = tiny_dit_pipeline(SD35M)
    t5_as_te2 = _te_lora("lora_te2", pipe.text_encoder_3, t5=True)
    _refused(tmp_path, pipe, {"lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight": torch.randn(4, 32),
                              "lora_unet_joint_blocks_0_x_block_attn_proj.lora_up.weight": torch.randn(32, 4)} | t5_as_te2,
             "is for a T5 encoder; the SD3 pipeline's text_encoder_2 is a CLIP encoder")


def _with_delta(model, targets: list[str], delta: torch.Tensor):
    """A copy of ``model`` whose fused module (the rows of ``targets`` stacked) got ``delta`` added."""
    ref = copy.deepcopy(model)
    row = 0
    with torch.no_grad():
        for t in targets:
            w = ref.get_submodule(t).weight
            w += delta[row:row + w.shape[0]]
            row += w.shape[0]
    return ref


def test_loha_lokr_on_fused_modules(tmp_path):
    """LyCORIS LoHa / LoKr on a fused original module split exactly: LoHa's rows are those of w1_a and w2_a; LoKr's
    (W1 ⊗ W2) those of W1 when the parts' boundaries are multiples of W2's height, else each part keeps the W1 rows
    over its own and a row offset; only swapped halves that W2 does not align with are refused."""
    from .tiny_dit import tiny_dit_pipeline

    model = tiny_dit(FLUX)
    g = torch.Generator().manual_seed(3)
    qkv = [f"transformer_blocks.0.attn.to_{c}" for c in "qkv"]
    lin1 = [f"single_transformer_blocks.1.attn.to_{c}" for c in "qkv"] + ["single_transformer_blocks.1.proj_mlp"]
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w1a, w1b, w2a, w2b = rnd(224, 2), rnd(2, 32), rnd(224, 2), rnd(2, 32)  # linear1: 3 x 32 + 128 rows
    k1, k2 = rnd(3, 2), rnd(32, 16)  # qkv: 96 = 3 x 32 rows
    loha, lokr = "lora_unet_single_blocks_1_linear1", "lora_unet_double_blocks_0_img_attn_qkv"
    sd = {f"{loha}.hada_w1_a": w1a, f"{loha}.hada_w1_b": w1b, f"{loha}.hada_w2_a": w2a, f"{loha}.hada_w2_b": w2b,
          f"{loha}.alpha": torch.tensor(1.0, dtype=torch.float64), f"{lokr}.lokr_w1": k1, f"{lokr}.lokr_w2": k2}
    write_safetensors(tmp_path / "ly.safetensors", sd, {})
    ours = copy.deepcopy(model)
    ld.load_adapter(ours, tmp_path / "ly.safetensors")
    ref = _with_delta(_with_delta(model, lin1, 0.5 * (w1a @ w1b) * (w2a @ w2b)), qkv, torch.kron(k1, k2))
    assert close(dit_call(ours), dit_call(ref))
    # W2 of height 48 does not divide the 32-row parts: each keeps W1's rows over its own and a row offset (BFL LoKr)
    k1, k2 = rnd(2, 2), rnd(48, 16)
    write_safetensors(tmp_path / "mis.safetensors", {f"{lokr}.lokr_w1": k1, f"{lokr}.lokr_w2": k2}, {})
    ours = copy.deepcopy(model)
    ld.load_adapter(ours, tmp_path / "mis.safetensors")
    assert close(dit_call(ours), dit_call(_with_delta(model, qkv, torch.kron(k1, k2))))
    # the final layer's swapped halves (32 rows each) with W2 of height 64: no exact split
    mod = "lora_unet_final_layer_adaLN_modulation_1"
    _refused(tmp_path, tiny_dit_pipeline(FLUX), {f"{mod}.lokr_w1": torch.randn(1, 2), f"{mod}.lokr_w2": torch.randn(64, 16)},
             rf"key '{mod}.lokr_w1': this module stands for 1 diffusers modules .*splits exactly only at multiples of 64")


class _Checkpoint(dict):
    """An original (BFL / Stability) checkpoint holding only the Linear weights of our map; every other key
    diffusers' converter pops (biases, norms, pos_embed) is a placeholder."""

    rows: dict = {}

    def pop(self, key, *default):
        if key in self:
            return super().pop(key)
        return torch.zeros(self.rows.get(key.rsplit(".", 1)[0], 6))  # a bias as long as its weight's rows


@pytest.mark.parametrize("fixture", [FLUX, SCHNELL, SD35M, SD35L])
def test_original_names_match_diffusers_single_file_converter(fixture):
    """The original-layout map (module names, row order of fused qkv / linear1, the swapped final-layer and SD3
    last-block modulation halves) equals diffusers' own checkpoint converters
    (``convert_{flux,sd3}_transformer_checkpoint_to_diffusers``), on the real shapes: each original weight is a
    column of row ids, so the converter's output says which rows went where. The SD3 kohya layout (sd-scripts
    ``lora_unet_joint_blocks_…``), which diffusers' LoRA loader does not read, is checked this way."""
    check_against_single_file_converter(fixture, "flux" if fixture in (FLUX, SCHNELL) else "sd3")


def check_against_single_file_converter(fixture: str, family: str) -> None:
    from diffusers.loaders import single_file_utils as sfu

    from lora_diffusion.io import dit

    model = _meta_model(fixture)
    targets, swapped = dit.family_map(family, model.config)
    ckpt, expected = _Checkpoint(), {}
    ckpt.rows = {}
    for dotted, paths in targets.items():
        paths = [p for p in paths if _has(model, p)]
        if not paths:
            continue
        rows = sum(model.get_submodule(p).weight.shape[0] for p in paths)
        ids = torch.arange(rows, dtype=torch.float64)[:, None] + 1e6 * len(ckpt)
        w = model.get_submodule(paths[0]).weight
        ckpt[f"{dotted}.weight"] = ids if w.dim() == 2 else ids[:, :, None, None]
        ckpt.rows[dotted] = rows
        start = 0
        for p in paths:
            n = model.get_submodule(p).weight.shape[0]
            part = ckpt[f"{dotted}.weight"][start:start + n]
            expected[p] = torch.cat([part[n // 2:], part[: n // 2]]) if dotted in swapped else part
            start += n
    if family == "sd3":
        ckpt["pos_embed"] = torch.zeros(1)
        ckpt |= {f"joint_blocks.{i}.x_block.attn.ln_q.weight": torch.zeros(1) for i in range(model.config.num_layers)}
        convert = sfu.convert_sd3_transformer_checkpoint_to_diffusers
    else:
        convert = getattr(sfu, f"convert_{family}_transformer_checkpoint_to_diffusers")
    converted = convert(ckpt)
    for p, w in expected.items():
        assert torch.equal(converted[f"{p}.weight"], w), p
    assert len(expected) == len({n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}) + (
        1 if family == "sd3" else 0)  # every Linear of the model (and SD3's patch-embedding conv)


# --- DoRA (OneTrainer, LyCORIS): dora_scale per output row -----------------------------------------------------
def _dora_file(model, paths, rank=2, seed=7, layout="onetrainer") -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for p in paths:
        w = model.get_submodule(p).weight
        flat = "lora_transformer_" + p.replace(".", "_")
        sd[f"{flat}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g, dtype=torch.float64) * 0.3
        sd[f"{flat}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g, dtype=torch.float64) * 0.3
        sd[f"{flat}.alpha"] = torch.tensor(1.0, dtype=torch.float64)
        sd[f"{flat}.dora_scale"] = (w.norm(dim=1, keepdim=True) * (1 + 0.2 * torch.rand(w.shape[0], 1, generator=g))).detach()
    return sd


def _dora_reference(model, sd: dict):
    """W' = m ⊙ (W + s·BA) / ‖W + s·BA‖ (row norms), written into a copy of the model."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for key in [k for k in sd if k.endswith(".dora_scale")]:
            flat = key.removesuffix(".dora_scale")
            path = next(n for n, _ in ref.named_modules() if "lora_transformer_" + n.replace(".", "_") == flat)
            lin = ref.get_submodule(path)
            down, up = sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"]
            merged = lin.weight + float(sd[f"{flat}.alpha"]) / down.shape[0] * up @ down
            lin.weight.copy_(sd[key] * merged / merged.norm(dim=1, keepdim=True))
    return ref


def test_onetrainer_dora_and_fused_dora(tmp_path):
    """OneTrainer DoRA (diffusers drops dora_scale with a warning): the DoRA formula on each module; the same
    adapter in the original layout (fused qkv, magnitudes concatenated) loads identically, and our kohya export
    of it (fused again) reloads exactly."""
    model = tiny_dit(FLUX)
    qkv = [f"transformer_blocks.0.attn.to_{c}" for c in "qkv"]
    sd = _dora_file(model, qkv + ["single_transformer_blocks.1.proj_mlp", "transformer_blocks.1.ff.net.2"])
    write_safetensors(tmp_path / "ot.safetensors", sd, {})
    ours = copy.deepcopy(model)
    ld.load_adapter(ours, tmp_path / "ot.safetensors", name="d")
    assert close(dit_call(ours), dit_call(_dora_reference(model, sd)))
    # proj_mlp is a quarter of single_blocks.1.linear1: its DoRA has no exact fused form without the others'
    with pytest.raises(ld.AdapterFileError, match="a DoRA on part of the fused module 'single_blocks.1.linear1'"):
        ld.save_adapter(ours, tmp_path / "k.safetensors", "d", format="kohya")
    assert not (tmp_path / "k.safetensors").exists()
    ld.remove_adapters(ours)
    sd = {k: v for k, v in sd.items() if "proj_mlp" not in k}
    write_safetensors(tmp_path / "ot.safetensors", sd, {})
    ld.load_adapter(ours, tmp_path / "ot.safetensors", name="d")
    path = ld.save_adapter(ours, tmp_path / "k.safetensors", "d", format="kohya")
    written = read_safetensors(path)[0]
    assert written["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"].shape == (96, 1)
    again = copy.deepcopy(model)
    ld.load_adapter(again, path, name="e")
    assert close(dit_call(again), dit_call(ours))


@pytest.mark.parametrize("fixture", [FLUX, SD35L])
def test_convert_cli_without_a_model(tmp_path, fixture):
    """``python -m lora_diffusion.convert`` maps a real-shaped original-layout file through a meta-device Flux.1-dev /
    SD3.5 pipeline (SD3.5 large told from its 2432 width): the diffusers file has the same ΔW per module (Flux:
    against diffusers' own conversion), and converting it back to kohya restores the original names."""
    from diffusers import FluxPipeline

    from lora_diffusion.convert import main
    from lora_diffusion.io import dit

    model = _meta_model(fixture)
    if fixture == FLUX:
        sd = _kohya_flux_file(model, seed=4)
    else:
        g = torch.Generator().manual_seed(4)
        targets, _ = dit.sd3_map(model.config)
        sd = {}
        for dotted in ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.37.context_block.adaLN_modulation.1"):
            mods = [model.get_submodule(p) for p in targets[dotted]]
            flat = dit.flat("lora_unet", dotted)
            sd[f"{flat}.lora_down.weight"] = torch.randn(4, mods[0].in_features, generator=g)
            sd[f"{flat}.lora_up.weight"] = torch.randn(sum(m.out_features for m in mods), 4, generator=g)
    write_safetensors(tmp_path / "k.safetensors", sd, {})
    assert main([str(tmp_path / "k.safetensors"), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    ours = read_safetensors(tmp_path / "d.safetensors")[0]
    if fixture == FLUX:
        theirs = FluxPipeline.lora_state_dict(dict(sd))
        theirs = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in theirs.items()}
        assert set(ours) == set(theirs)
        x = torch.randn(21504, dtype=torch.float64)
        for k in [k for k in ours if k.endswith("lora_A.weight")]:
            b = k.replace("lora_A", "lora_B")
            probe = [t[b].double() @ (t[k].double() @ x[: t[k].shape[1]]) for t in (ours, theirs)]
            assert close(*probe, tol=1e-5), k
    else:
        assert {k.rsplit(".lora_", 1)[0] for k in ours} == {
            *(f"transformer.transformer_blocks.0.attn.to_{c}" for c in "qkv"),
            "transformer.transformer_blocks.37.norm1_context.linear"}
        up = sd["lora_unet_joint_blocks_37_context_block_adaLN_modulation_1.lora_up.weight"]
        assert torch.equal(ours["transformer.transformer_blocks.37.norm1_context.linear.lora_B.weight"],
                           torch.cat([up[2432:], up[:2432]]))  # (shift, scale) -> (scale, shift)
    assert main([str(tmp_path / "d.safetensors"), str(tmp_path / "k2.safetensors"), "--to", "kohya"]) == 0
    assert {k.split(".")[0] for k in read_safetensors(tmp_path / "k2.safetensors")[0]} == {k.split(".")[0] for k in sd}


@pytest.mark.parametrize("fixture", [FLUX, SD35M])
def test_peft_folders_both_ways(tmp_path, fixture):
    """A bare transformer with PEFT: our PEFT folder loads in ``PeftModel`` and theirs (LoRA and DoRA) loads here,
    same outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model


    base = tiny_dit(fixture)
    ours = copy.deepcopy(base)
    ld.add_adapter(ours, ld.AdapterSpec(rank=4, alpha=8, targets="dit-attn-mlp", rank_pattern={"to_v": 2}), "p")
    perturb(ours, "p", std=0.2)
    folder = ld.save_adapter(ours, tmp_path / "ours", "p", format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    assert close(dit_call(theirs.get_base_model()), dit_call(ours))
    for dora in (False, True):
        cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "add_k_proj", "ff.net.2", "norm1.linear"],
                         use_dora=dora, init_lora_weights=False)
        peft_model = get_peft_model(copy.deepcopy(base), cfg).eval()
        peft_model.save_pretrained(str(tmp_path / f"theirs{dora}"))
        again = copy.deepcopy(base)
        ld.load_adapter(again, tmp_path / f"theirs{dora}", name="t")
        assert close(dit_call(again), dit_call(peft_model.get_base_model()))


def _pair(flat: str, out: int, inp: int, a: str = ".lora_down.weight", b: str = ".lora_up.weight") -> dict:
    return {flat + a: torch.zeros(4, inp), flat + b: torch.zeros(out, 4)}


@pytest.mark.parametrize("sd,fmt,family", [
    (_pair("lora_transformer_single_transformer_blocks_0_attn_to_q", 3072, 3072), "kohya", "flux"),  # OneTrainer
    (_pair("lora_transformer_transformer_blocks_0_attn_to_q", 3072, 3072), "kohya", "flux"),  # by width
    (_pair("lora_transformer_transformer_blocks_0_attn_to_q", 1536, 1536), "kohya", "sd3"),
    (_pair("transformer.transformer_blocks.0.attn.to_q", 2432, 2432, ".lora_A.weight", ".lora_B.weight"), "diffusers", "sd3"),
    (_pair("transformer.transformer_blocks.0.attn.to_q", 32, 32, ".lora_A.weight", ".lora_B.weight"), "diffusers", "dit"),
    (_pair("transformer.transformer_blocks.0.attn2.to_q", 32, 32, ".lora_A.weight", ".lora_B.weight"), "diffusers", "sd3"),
    (_pair("double_blocks.0.processor.qkv_lora1", 9216, 3072, ".down.weight", ".up.weight"), "xlabs", "flux"),
    (_pair("diffusion_model.double_blocks.0.img_attn.qkv", 9216, 3072, ".lora_A.weight", ".lora_B.weight"), "comfy-dit",
     "flux"),
    (_pair("lora_unet_joint_blocks_0_x_block_attn_qkv", 4608, 1536), "kohya", "sd3"),
    # a Flux file's text encoders alone (CLIP-L as lora_te1, T5 as lora_te3 or lora_te2): never SDXL
    (_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
     | _pair("lora_te3_encoder_block_0_layer_0_SelfAttention_q", 4096, 4096), "kohya", None),
    (_pair("lora_te2_encoder_block_0_layer_0_SelfAttention_q", 4096, 4096), "kohya", None),
], ids=["onetrainer-single", "onetrainer-flux-width", "onetrainer-sd3-width", "diffusers-sd35-large",
        "diffusers-ambiguous", "diffusers-attn2", "xlabs", "comfyui", "kohya-sd3", "flux-te-only", "flux-t5-only"])
def test_detect_dit_layouts(sd, fmt, family):
    from lora_diffusion.io.detect import detect_format, family_from_keys

    assert detect_format(list(sd), {}) == fmt
    assert family_from_keys({k: tuple(v.shape) for k, v in sd.items()}) == family


DOUBLE_BLOCKS = [r"re:transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)",
                 r"re:transformer_blocks\.\d+\.ff(_context)?\.net\.(0\.proj|2)"]


@pytest.mark.parametrize("targets", [DOUBLE_BLOCKS, "dit-full"], ids=["double-blocks", "dit-full"])
def test_flux_bfl_export_loads_in_diffusers(tmp_path, targets):
    """``format="bfl"`` on Flux.1 (ComfyUI's ``diffusion_model.<original name>.lora_down/up`` + alpha; q/k/v and
    single-block linear1 fused exactly) reads back in ours, and in diffusers' Flux loader with our outputs (double
    blocks: its converter splits linear1 at Flux.1's real widths, see above)."""
    base = tiny_dit(FLUX)
    model = copy.deepcopy(base)
    ld.add_adapter(model, ld.AdapterSpec(rank=4, alpha=2, targets=targets))
    perturb(model, std=0.3)
    out = ld.save_adapter(model, tmp_path / "b.safetensors", format="bfl")
    sd = read_safetensors(out)[0]
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in sd
    again = copy.deepcopy(base)
    ld.load_adapter(again, out)
    assert close(dit_call(again), dit_call(model))
    if targets != "dit-full":
        assert close(dit_call(diffusers_load(copy.deepcopy(base), sd)), dit_call(model))
