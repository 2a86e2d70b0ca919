"""blend() on diffusion transformers (tiny Flux.1 and SD3 pipelines, CPU, 2 steps, 32 px): every fusion method that
applies to diffusion runs on the transformer and returns what it chose and its per-layer, per-step statistics; one
LoRA at weight 1 is the plain LoRA (``load_adapter``), weights 0 are the base model, fused static is unfused static;
K-LoRA's s(t) reads the scheduler's t on 0..1000 (Flux hands its transformer σ = t/1000); gates files trained on
another denoiser or for other LoRAs are refused; the LLM-only methods are refused naming the method and family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.blend import blend, main
from lora_diffusion.core.errors import AdapterError, AdapterFileError
from lora_diffusion.families import denoiser
from lora_diffusion.fusion import FUSION_ATTR, FUSION_METHODS, fuse, save_gates
from lora_diffusion.generate import generate, load_pipeline
from lora_diffusion.io.library import sha256

from .tiny_dit import flux_model, sd3_model, write_ring_dotted_loras  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red dotted ring on a blue background"
DIFFUSION = [m for m, c in FUSION_METHODS.items() if "diffusion" in c.models]
LLM_ONLY = [m for m, c in FUSION_METHODS.items() if "diffusion" not in c.models]
KW = dict(steps=2, height=32, width=32, seed=0)
LABEL = {"flux": "Flux", "sd3": "SD3"}
NEEDS_TWO = {"klora": "K-LoRA fuses one subject and one style LoRA", "mole": "mole: mixes at least 2 adapters"}


@pytest.fixture(scope="module", params=["flux", "sd3"])
def dit(request, tmp_path_factory) -> dict:
    """The tiny model folder and two LoRAs on its transformer: ``ring`` (a concept) and ``dotted`` (a style)."""
    folder = request.getfixturevalue(f"{request.param}_model")
    files = write_ring_dotted_loras(folder, tmp_path_factory.mktemp(f"{request.param}-loras"))
    return {"family": request.param, "folder": folder, **files}


def _pipe(dit: dict):
    pipe = load_pipeline(str(dit["folder"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _px(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(int)


def _base(dit: dict, *loras: str) -> np.ndarray:
    """The stock pipeline's image with ``loras`` loaded by ``api.load_adapter`` (none: the base model)."""
    pipe = _pipe(dit)
    for n in loras:
        ld.api.load_adapter(pipe, dit[n], name=n)
    return _px(generate(pipe, [PROMPT], KW["steps"], 3.5 if dit["family"] == "flux" else 7.0, 0, 1, 32, 32))


@pytest.mark.parametrize("method", DIFFUSION)
def test_every_diffusion_method_blends_on_the_transformer(dit, method):
    pipe = _pipe(dit)
    res = blend(pipe, PROMPT, [dit["ring"], dit["dotted"]], method=method, **KW)
    assert [(c.name, c.role) for c in res.chosen] == [("ring", "subject"), ("dotted", "style")]
    assert [c.sha256 for c in res.chosen] == [sha256(dit["ring"]), sha256(dit["dotted"])]
    assert res.method == method and res.images[0].size == (32, 32)
    assert _px(res.images).std() > 0
    if method == "static":  # the layers' own sum: no per-layer weights to record
        assert res.gate_stats is None
        return
    st = res.gate_stats
    sched_t = [round(float(t), 3) for t in pipe.scheduler.timesteps]
    assert st.names == ["ring", "dotted"] and st.timesteps == sched_t and max(sched_t) > 1  # t on 0..1000, not σ
    assert st.layers and all(k.startswith("transformer.") for k in st.layers) and np.isfinite(st.strength).all()
    if method == "gated":
        assert any("without a gates file" in n and "python -m training.train_gates" in n for n in res.notes), res.notes
        assert st.summary()["mean"] == {"ring": 1.0, "dotted": 1.0}  # the untrained gate: the static sum
    if method == "mole":
        assert any("MoLE gates trained by train_gates --method mole" in n for n in res.notes), res.notes
    if method == "klora":  # one of the two per layer and step
        assert set(np.unique(st.strength)) <= {0.0, 1.0} and (st.strength.sum(-1) == 1).all()


def test_klora_time_scale_comes_from_the_schedulers_t(dit):
    """Per layer and step the kept LoRA is the subject iff S_c/(γ S_s) > s(t) = α(1 - t/1000) + β with t the
    scheduler's timestep (Flux: the transformer gets σ = t/1000; the timestep hook hands the fusion t)."""
    pipe = _pipe(dit)
    res = blend(pipe, PROMPT, [dit["ring"], dit["dotted"]], method="klora", **{**KW, "steps": 4})
    fusion = denoiser(pipe).__dict__[FUSION_ATTR]
    st, o = res.gate_stats, fusion.method.options
    ts = np.array([float(t) for t in pipe.scheduler.timesteps])
    assert np.allclose(st.timesteps, ts, atol=1e-3) and ts.max() > 1
    ratio = np.array([float(fusion.combiners[k].ratio) for k in st.layers])  # (layers,)
    expect = (ratio[:, None] > o.alpha * (1 - ts[None, :] / 1000) + o.beta).astype(float)  # (layers, steps)
    assert np.array_equal(st.strength[:, :, 0], expect)
    assert expect[:, 0].all() and not expect[:, -1].any()  # these LoRAs: the subject at t = 1000, the style at the end


@pytest.mark.parametrize("method", DIFFUSION)
def test_one_lora_at_weight_one_is_the_plain_lora(dit, method):
    pipe = _pipe(dit)
    if method in NEEDS_TWO:
        with pytest.raises(AdapterError, match=NEEDS_TWO[method]):
            blend(pipe, PROMPT, [dit["ring"]], method=method, roles={"ring": "other"}, **KW)
        return
    res = blend(pipe, PROMPT, [dit["ring"]], method=method, weights=[1.0], roles={"ring": "other"}, **KW)
    assert np.abs(_px(res.images) - _base(dit, "ring")).max() <= 1


@pytest.mark.parametrize("method", DIFFUSION)
def test_weights_zero_give_the_base_model(dit, method):
    res = blend(_pipe(dit), PROMPT, [dit["ring"], dit["dotted"]], method=method, weights=[0.0, 0.0], **KW)
    assert [c.weight for c in res.chosen] == [0.0, 0.0]
    assert np.abs(_px(res.images) - _base(dit)).max() <= 1


def test_fused_static_equals_unfused_and_unfuses_exactly(dit):
    pipe = _pipe(dit)
    files, w = [dit["ring"], dit["dotted"]], [0.7, 0.5]
    unfused = _px(blend(pipe, PROMPT, files, method="static", weights=w, **KW).images)
    fused = _px(blend(pipe, PROMPT, files, method="static", weights=w, options={"fuse": True}, **KW).images)
    assert np.abs(fused - unfused).max() <= 1 and np.abs(unfused - _base(dit)).mean() > 1
    again = _px(blend(pipe, PROMPT, files, method="static", weights=w, **KW).images)
    assert np.array_equal(again, unfused)  # the fused weights came back out exactly


@pytest.mark.parametrize("method", LLM_ONLY)
def test_llm_only_methods_are_refused_naming_method_and_family(dit, method):
    with pytest.raises(AdapterError, match=rf"fusion method '{method}' applies to language models only .* not to "
                                           rf"diffusion pipelines \(this one: {LABEL[dit['family']]}\); for diffusion "
                                           r"use one of \['static', 'gated'"):
        blend(_pipe(dit), PROMPT, [dit["ring"], dit["dotted"]], method=method, **KW)


def test_gates_trained_on_a_unet_or_for_other_loras_are_refused(dit, tmp_path):
    from lora_diffusion.demo.model import load_demo_pipeline

    unet_pipe = load_demo_pipeline()
    for i, n in enumerate(("ring", "dotted")):
        ld.add_adapter(unet_pipe.unet, ld.AdapterSpec(rank=2, targets="unet-attn", seed=i), n)
    hashes = {n: sha256(dit[n]) for n in ("ring", "dotted")}  # even naming these very files
    unet_gates = save_gates(fuse(unet_pipe.unet, ["ring", "dotted"], method="gated"), tmp_path / "unet.safetensors",
                            hashes)
    for unseen in (False, True):
        with pytest.raises(AdapterFileError, match=rf"gates trained on a model whose denoiser is \['unet'\].*this "
                                                   rf"{LABEL[dit['family']]} pipeline has \['transformer'\].*train "
                                                   r"gates on this model"):
            blend(_pipe(dit), PROMPT, [dit["ring"], dit["dotted"]], method="gated", gates=unet_gates,
                  allow_unseen=unseen, **KW)
    pipe = _pipe(dit)
    for n in ("ring", "dotted"):
        ld.load_adapter(pipe, dit[n], name=n)
    f = fuse(pipe, ["ring", "dotted"], method="gated")
    with torch.no_grad():
        for c in f.combiners.values():
            c.b.fill_(-1e4)  # closed: strength 0 where the untrained gate gives 1
    stale = save_gates(f, tmp_path / "stale.safetensors", {**hashes, "dotted": "0" * 64})
    with pytest.raises(AdapterFileError, match=r"'dotted' differs from the file the gates were trained with"):
        blend(_pipe(dit), PROMPT, [dit["ring"], dit["dotted"]], method="gated", gates=stale, **KW)
    good = save_gates(f, tmp_path / "good.safetensors", hashes)
    res = blend(_pipe(dit), PROMPT, [dit["ring"], dit["dotted"]], method="gated", gates=good, **KW)
    assert res.gate_stats.summary()["mean"] == {"ring": 0.0, "dotted": 0.0}
    assert np.abs(_px(res.images) - _base(dit)).max() <= 1  # closed gates: the base model


def test_library_blend_on_the_transformer_skips_unet_files(dit, tmp_path):
    import shutil

    from training.build_demo_library import write_other_family

    lib = tmp_path / "lib"
    lib.mkdir()
    for n in ("ring", "dotted"):
        shutil.copy(dit[n], lib / f"{n}.safetensors")
    write_other_family(lib)  # an SDXL file: never retrieved for a transformer
    res = blend(_pipe(dit), PROMPT, library=lib, method="scheduled", top_k=3, **KW)
    assert sorted(c.name for c in res.chosen) == ["dotted", "ring"] and all(c.score is not None for c in res.chosen)
    assert res.gate_stats.names == [c.name for c in res.chosen]


def test_cli_blends_and_writes_the_gate_plot(dit, tmp_path):
    out = tmp_path / "out"
    main(["--model", str(dit["folder"]), "--prompt", PROMPT, "--lora", str(dit["ring"]), "--lora", str(dit["dotted"]),
          "--method", "klora", "--steps", "2", "--height", "32", "--width", "32", "--output", str(out)])
    import json

    summary = json.loads((out / "blend.json").read_text())
    assert [c["name"] for c in summary["chosen"]] == ["ring", "dotted"] and summary["method"] == "klora"
    assert (out / "gates.png").read_bytes()[:4] == b"\x89PNG" and len(list(out.glob("*.png"))) == 2


def test_a_transformer_file_of_unknown_family_is_retrievable_for_flux_and_sd3():
    """A "dit" file (Flux or SD3: its widths do not tell, no metadata) may be retrieved for either; loading checks."""
    from lora_diffusion.retrieval.library import LibraryEntry

    e = LibraryEntry("x.safetensors", Path("x.safetensors"), "x", family="dit")
    assert e.incompatibility("flux") is None and e.incompatibility("sd3") is None
    assert e.incompatibility("sdxl") == "made for a diffusion transformer (Flux or SD3), not SDXL"


@pytest.mark.parametrize("fixture", ["flux1-dev-transformer.json", "sd35-medium-transformer.json"])
def test_static_fusion_equals_diffusers_set_adapters_on_the_transformer(tmp_path, fixture):
    """The same two diffusers-layout files at weights (0.7, 0.4): our static fusion (unfused, fused, unfused again)
    = diffusers' ``load_lora_weights`` + ``set_adapters`` on the reduced real Flux.1 / SD3.5 configs (float64)."""
    import copy

    from lora_diffusion.io.files import write_safetensors

    from .test_formats_dit import _random_lora
    from .test_formats_helpers import close
    from .tiny_dit import dit_call, tiny_dit_pipeline

    base = tiny_dit_pipeline(fixture)
    for i in range(2):
        write_safetensors(tmp_path / f"l{i}.safetensors", _random_lora(base.transformer, "dit-attn", seed=i), {})
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    for i in range(2):
        ref.load_lora_weights(str(tmp_path / f"l{i}.safetensors"), adapter_name=f"l{i}")
        ld.load_adapter(ours, tmp_path / f"l{i}.safetensors", name=f"l{i}")
    ref.set_adapters(["l0", "l1"], [0.7, 0.4])
    expected = dit_call(ref.transformer)
    assert not close(expected, dit_call(base.transformer))
    fuse(ours, ["l0", "l1"], method="static", weights=[0.7, 0.4])
    assert close(dit_call(ours.transformer), expected)
    fused = fuse(ours, ["l0", "l1"], method="static", weights=[0.7, 0.4], fuse=True)
    assert close(dit_call(ours.transformer), expected)
    fused.remove()
    fuse(ours, ["l0", "l1"], method="static", weights=[0.7, 0.4])
    assert close(dit_call(ours.transformer), expected)


@pytest.mark.parametrize("method", LLM_ONLY)
def test_llm_only_methods_are_refused_on_the_unet_demo_model_too(method, tmp_path):
    from lora_diffusion.demo.model import load_demo_pipeline

    with pytest.raises(AdapterError, match=rf"fusion method '{method}' applies to language models only .* not to "
                                           r"diffusion pipelines \(this one: the embedded demo model\)"):
        blend(load_demo_pipeline(), PROMPT, [tmp_path / "none.safetensors"], method=method, steps=1)


@pytest.mark.parametrize("method", DIFFUSION)
def test_bf16_transformer_blends_in_its_dtype(dit, method):
    """The GPU setting (bf16 weights; Flux/SD3 overflow fp16), run on the CPU: with every method the transformer's
    output stays bf16 (the adapters keep their files' fp32) and the image is not blank."""
    pipe = load_pipeline(str(dit["folder"]), torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    dtypes: list[torch.dtype] = []
    pipe.transformer.register_forward_hook(lambda m, args, out: dtypes.append((out[0] if isinstance(out, tuple)
                                                                               else out.sample).dtype))
    res = blend(pipe, PROMPT, [dit["ring"], dit["dotted"]], method=method, **KW)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert _px(res.images).std() > 0 and (res.gate_stats is None or np.isfinite(res.gate_stats.strength).all())
