"""Flux.1 / SD3.5 LoRA layouts: read and written, with parity against diffusers (its Flux/SD3 LoRA loaders and
converters) on reduced models built from the real configs, and on the real-shaped (meta) models for coverage."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.io.files import read_safetensors, write_safetensors

from .dit_models import dit_call, tiny_dit
from .test_formats_helpers import close

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
    from .dit_models import te_out, tiny_dit_pipeline

    base = tiny_dit_pipeline()
    sd = _double_only(_kohya_flux_file(base.transformer)) | _te_lora("lora_te1", base.text_encoder)
    t5 = _te_lora("lora_te3", base.text_encoder_2, t5=True)  # sd-scripts' T5 prefix (lora_te2 in its first release)
    write_safetensors(tmp_path / "k.safetensors", sd | t5, {"ss_base_model_version": "flux1"})
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    ld.load_adapter(ours, tmp_path / "k.safetensors", name="k")
    theirs.load_lora_weights(dict(sd | t5))
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
    from .dit_models import te_out, tiny_dit_pipeline

    base = tiny_dit_pipeline()
    if layout == "xlabs":
        sd = _xlabs_file(base.transformer)
    elif layout == "comfyui":
        sd = _comfy(_double_only(_kohya_flux_file(base.transformer)), base.transformer)
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


def _comfy(sd: dict, model) -> dict:
    """kohya keys -> ComfyUI's ``diffusion_model.<original dotted name>.<param>``."""
    from lora_diffusion.io import dit

    names = dit.source_names(dit.flux_map(model.config)[0], "lora_unet")
    return {f"diffusion_model.{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in sd.items()}


# --- our exports -------------------------------------------------------------------------------------------------
def _trained_pipeline(fixture, exclude=()):
    from .conftest import perturb
    from .dit_models import tiny_dit_pipeline

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
    from .dit_models import te_out

    return [dit_call(pipe.transformer)] + [te_out(m) for k, m in pipe.components.items() if k.startswith("text_encoder")
                                           and m is not None]


@pytest.mark.parametrize("fixture", [FLUX, SD35M])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_exports_round_trip(tmp_path, fixture, fmt):
    """Every DiT module, both text encoders' attention, rank/alpha patterns: saved and loaded back exactly."""
    from .dit_models import tiny_dit_pipeline

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
    from .dit_models import te_out, tiny_dit_pipeline

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
    from .dit_models import te_out, tiny_dit_pipeline

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
