"""blend(): what was chosen and why, on the embedded demo model. Bad input: another family's LoRA skipped with a
note, a damaged file reported and skipped, nothing usable -> the base model (and it says so), gates trained for
other LoRAs refused naming them."""

from __future__ import annotations

import numpy as np
import pytest

import lora_diffusion as ld
from lora_diffusion.blend import blend, plot_gate_stats
from lora_diffusion.core.errors import AdapterFileError
from lora_diffusion.demo.model import load_demo_pipeline
from lora_diffusion.fusion import fuse, save_gates
from lora_diffusion.io.library import sha256
from training.build_demo_library import write_other_family

from .conftest import perturb

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red dotted ring on a blue background"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    pipe = load_demo_pipeline()
    for i, name in enumerate(("ring", "dotted", "other")):
        # unet-full as the demo trainer writes them: a conv proj_in must not make them "SD1" files
        ld.add_adapter(pipe.unet, ld.AdapterSpec(rank=2, targets="unet-full" if i == 0 else "unet-attn", seed=i), name)
        perturb(pipe.unet, name, std=0.2, seed=i)
        ld.save_adapter(pipe.unet, d / f"{name}.safetensors", name, metadata={"lora_kind": "concept" if i == 0 else "style"})
    (d / "broken.safetensors").write_bytes((d / "ring.safetensors").read_bytes()[:3000])
    return {"dir": d, "xl": write_other_family(d), **{n: d / f"{n}.safetensors" for n in ("ring", "dotted", "other", "broken")}}


def load_demo_pipeline_with(files, names):
    pipe = load_demo_pipeline()
    for n in names:
        ld.load_adapter(pipe, files[n], name=n)
    return pipe


def _run(files, names, **kw):
    pipe = load_demo_pipeline()
    return pipe, blend(pipe, PROMPT, [files[n] for n in names], steps=2, **kw)


def test_other_family_and_damaged_files_are_skipped_with_a_note(files):
    _, res = _run(files, ["ring", "broken", "xl", "dotted"], method="klora")
    assert [c.name for c in res.chosen] == ["ring", "dotted"]
    assert [c.role for c in res.chosen] == ["subject", "style"]  # from the files' lora_kind
    assert any("broken.safetensors" in n and "truncated" in n for n in res.notes)
    assert any("sdxl-watercolor.safetensors" in n and "SDXL" in n for n in res.notes)
    st = res.gate_stats
    assert st.names == ["ring", "dotted"] and len(st.timesteps) == 2 and np.isfinite(st.strength).all()


def test_no_usable_lora_generates_with_the_base_model_and_says_so(files):
    pipe, res = _run(files, ["broken", "xl"], method="gated")
    assert res.method == "base" and res.chosen == [] and res.gate_stats is None
    assert any("generated with the base model" in n for n in res.notes)
    ref = ld.generate.generate(load_demo_pipeline(), [PROMPT], steps=2, guidance_scale=4.0, seed=0)
    assert np.array_equal(np.asarray(res.images[0]), np.asarray(ref[0]))


def test_gates_for_other_loras_are_refused_naming_them(files, tmp_path):
    pipe = load_demo_pipeline()
    for n in ("ring", "dotted"):
        ld.load_adapter(pipe, files[n], name=n)
    f = fuse(pipe, ["ring", "dotted"], method="gated")
    gates = save_gates(f, tmp_path / "gates.safetensors", {"ring": sha256(files["ring"]), "dotted": "0" * 64})
    with pytest.raises(AdapterFileError, match=r"'dotted' differs from the file the gates were trained with"):
        _run(files, ["ring", "dotted"], method="gated", gates=gates)
    with pytest.raises(AdapterFileError, match=r"not trained with \['other"):
        _run(files, ["ring", "other"], method="gated", gates=gates)
    _, res = _run(files, ["ring", "other"], method="gated", gates=gates, allow_unseen=True)
    assert res.gate_stats.strength.shape[2] == 2
    unseen = [n for n in res.notes if "not trained with" in n]
    assert len(unseen) == 1 and "['other" in unseen[0], res.notes  # the user is told, not only the log
    assert not [n for n in res.notes if "never trained the role" in n], res.notes  # 'other' (style role) was trained
    # gates that never trained a role: a LoRA of that role gets only the shared terms, and the user is told so
    both_subjects = fuse(load_demo_pipeline_with(files, ["ring", "dotted"]), ["ring", "dotted"], method="gated",
                         roles={"ring": "subject", "dotted": "subject"})
    hashes = {n: sha256(files[n]) for n in ("ring", "dotted")}
    subj = save_gates(both_subjects, tmp_path / "subjects.safetensors", hashes)
    _, res = _run(files, ["ring", "dotted"], method="gated", gates=subj)
    assert [n for n in res.notes if "never trained the role of {'dotted': 'style'}" in n], res.notes
    assert not [n for n in res.notes if "not trained with" in n], res.notes
    out = plot_gate_stats(res.gate_stats, tmp_path / "g.png", "t")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_library_blend_finds_the_gates_trained_with_the_chosen_loras(files, tmp_path):
    import shutil

    import torch

    from lora_diffusion.retrieval import LoraLibrary

    lib = tmp_path / "lib"
    (lib / "gates").mkdir(parents=True)
    for n in ("ring", "dotted", "other"):
        shutil.copy(files[n], lib / f"{n}.safetensors")
    pipe = load_demo_pipeline()
    for n in ("ring", "dotted"):
        ld.load_adapter(pipe, files[n], name=n)
    f = fuse(pipe, ["ring", "dotted"], method="gated")
    with torch.no_grad():
        for c in f.combiners.values():
            c.b.fill_(-1e4)  # gates closed: strength 0, where an untrained gate gives 1
    hashes = {n: sha256(files[n]) for n in ("ring", "dotted")}
    save_gates(f, lib / "gates" / "trained.safetensors", hashes)
    save_gates(f, lib / "gates" / "stale.safetensors", {**hashes, "ring": "0" * 64})
    _, res = _run(files, [], library=lib, method="gated", top_k=2)
    assert sorted(c.name for c in res.chosen) == ["dotted", "ring"]
    assert any(n == f"gates from the library: {lib / 'gates' / 'trained.safetensors'}" for n in res.notes), res.notes
    assert any("stale.safetensors not used: trained with a different file for ['ring']" in n for n in res.notes)
    assert max(res.gate_stats.summary()["mean"].values()) == 0.0
    assert [e.file for e in LoraLibrary(lib).entries if "gates" in e.file] == []  # gates files are not LoRAs
    (lib / "gates" / "trained.safetensors").unlink()
    _, res = _run(files, [], library=lib, method="gated", top_k=2)
    assert any(n.startswith("no gates file in") for n in res.notes), res.notes
    assert res.gate_stats.summary()["mean"]["ring"] == 1.0  # the untrained gate: the static sum


def test_blending_several_pivotal_loras_loads_each_ones_token(tmp_path):
    """Each LoRA's trained word row (pivotal tuning) comes with it when several are blended, and stays its own."""
    import torch

    from lora_diffusion.embeddings import TokenEmbeddings, apply_embeddings, init_vectors, loaded_embeddings

    src = load_demo_pipeline()
    rows = {}
    for i, word in enumerate(("ring", "dotted")):
        ld.add_adapter(src.unet, ld.AdapterSpec(rank=2, targets="unet-attn", seed=i), word)
        perturb(src.unet, word, std=0.2, seed=i)
        rows[word] = init_vectors(src, word, 1)["text_encoder"] + (i + 1)
        apply_embeddings(src, word, [TokenEmbeddings(word, {"text_encoder": rows[word]})])
        ld.save_adapter(src, tmp_path / f"{word}.safetensors", word)
    pipe = load_demo_pipeline()
    res = blend(pipe, PROMPT, [tmp_path / "ring.safetensors", tmp_path / "dotted.safetensors"], method="static", steps=2)
    assert [c.name for c in res.chosen] == ["ring", "dotted"] and sorted(loaded_embeddings(pipe)) == ["dotted", "ring"]
    table = pipe.text_encoder.get_input_embeddings().weight
    for word, row in rows.items():
        assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids(word)], row[0])
