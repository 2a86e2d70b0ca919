"""The app's generated adapters without Gradio: Text-to-LoRA and Doc-to-LoRA hypernetworks in the server's folder
make a LoRA from a description / a pasted document into the library, equal to what the command-line tools write,
and the LLM tab's chat uses it; no hypernetwork, an empty description or another base's LLM get one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lora_diffusion as ld
from app.services import AppError, AppServices, Settings
from lora_diffusion import llm
from lora_diffusion.hyper import T2L, T2LConfig
from lora_diffusion.hyper.d2l import D2L, D2LConfig
from lora_diffusion.hyper.generate_cli import generate_lora
from lora_diffusion.hyper.internalize_cli import internalize_file
from lora_diffusion.io.files import read_safetensors

from .test_internalize_cli import DOC
from .test_internalize_cli import make_folder as make_llm_folder
from .test_t2l import perturb

pytestmark = pytest.mark.usefixtures("one_thread")
TASK = "Return only the last word."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server with a tiny LLM and one trained-looking T2L and D2L hypernetwork for it in its folder."""
    root = tmp_path_factory.mktemp("hyper")
    folder = make_llm_folder(root / "llm")
    s = AppServices(Settings(library=root / "lib", output=root / "out", device="cpu",
                             llm_models={"tiny": str(folder), "other": str(make_llm_folder(root / "llm3", layers=3))}))
    model, _ = llm.load_causal_lm(str(folder))
    t2l = T2L.for_model(model, T2LConfig(rank=4, alpha=8, task_dim=16, pos_dim=8, hidden=32, head_in=16))
    perturb(t2l)  # B != 0, as after training
    (s.settings.hyper_dir / "t2l").mkdir()
    t2l.save(s.settings.hyper_dir / "t2l" / "t2l.safetensors", base_model=llm.base_name(model))
    d2l = D2L.for_model(model, D2LConfig(rank=4, alpha=8.0, latent_dim=16, n_heads=2, targets=["v_proj"],
                                         chunk_tokens=64))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in d2l.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    d2l.save(s.settings.hyper_dir / "facts.safetensors", base_model="tiny")
    (s.settings.hyper_dir / "notes.safetensors").write_bytes(b"not a checkpoint")  # ignored, not listed
    return s, folder, root


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = read_safetensors(a)[0], read_safetensors(b)[0]
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_text_to_lora_into_the_library_then_chat(served, tmp_path) -> None:
    s, folder, _ = served
    found = s.hyper.list("t2l")
    assert [h.name for h in found] == ["t2l/t2l.safetensors"] and "LLM" in found[0].label and "rank 4" in found[0].label
    name = s.hyper.text_to_lora("t2l/t2l.safetensors", TASK, "tiny")
    entry = s.library.entry(name)
    assert entry["llm_base"] and entry["training"]["t2l_task"] == TASK and entry["variant"] == "lora"
    cli = generate_lora(s.settings.hyper_dir / "t2l" / "t2l.safetensors", TASK, tmp_path / "cli.safetensors",
                        model=str(folder))["adapter"]
    assert same_tensors(s.library.path(name), Path(cli))  # what python -m lora_diffusion.generate_lora writes
    from app.ui import UI

    ui = UI(s)
    assert name in [c[1] for c in ui.chat_adapters(name)["choices"]] and name not in ui.library_choices(diffusion=True)
    base, adapted, cleared, status = ui.llm_chat("", "abc", 8, [], [], name, "tiny")
    assert cleared == status == "" and base[-1]["role"] == adapted[-1]["role"] == "assistant"
    model, _ = s.llm._models["tiny"]
    assert any(n.startswith("a") for n in ld.list_adapters(model))  # the library file, loaded for the chat


def test_doc_to_lora_from_pasted_text(served, tmp_path) -> None:
    s, folder, _ = served
    assert [h.name for h in s.hyper.list("d2l")] == ["facts.safetensors"]
    name = s.hyper.doc_to_lora("facts.safetensors", DOC, "tiny", "zorblat")
    assert name == "zorblat" and s.library.entry(name)["llm_base"]
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    cli = internalize_file(s.settings.hyper_dir / "facts.safetensors", doc, tmp_path / "cli.safetensors", str(folder))
    assert same_tensors(s.library.path(name), cli)


def test_missing_hypernetworks_and_bad_input_are_named(served, tmp_path) -> None:
    s, _, root = served
    empty = AppServices(Settings(library=tmp_path / "lib", output=tmp_path / "out", device="cpu"))
    assert empty.hyper.list("t2l") == []
    with pytest.raises(AppError, match=r"Text-to-LoRA: No Text-to-LoRA hypernetwork in .*hypernetworks\. Train one "
                                       r"with `python -m training.train_t2l --mode sft --out .*/t2l`"):
        empty.hyper.text_to_lora(None, TASK, "smollm2")
    before = {e["name"] for e in s.library.entries()}
    with pytest.raises(AppError, match="task description: empty"):
        s.hyper.text_to_lora("t2l/t2l.safetensors", "  ", "tiny")
    with pytest.raises(AppError, match=r"hypernetwork: expected one of \['t2l/t2l.safetensors'\], got 'x'"):
        s.hyper.text_to_lora("x", TASK, "tiny")
    with pytest.raises(AppError, match="Text-to-LoRA with t2l/t2l.safetensors: .*layer"):  # made for a 2-layer base
        s.hyper.text_to_lora("t2l/t2l.safetensors", TASK, "other")
    with pytest.raises(AppError, match="document: empty"):
        s.hyper.doc_to_lora("facts.safetensors", "", "tiny")
    with pytest.raises(AppError, match="LLM: 'nope' is not one of the models"):
        s.hyper.doc_to_lora("facts.safetensors", DOC, "nope")
    assert {e["name"] for e in s.library.entries()} == before  # nothing half-written
    assert not list((s.settings.output / "tmp").glob("*/*"))  # work folders removed


def test_text_to_lora_for_a_diffusion_unet_goes_to_the_generate_tab(tmp_path) -> None:
    """A T2L hypernetwork on a pipeline's UNet (train_t2l --component unet) writes a diffusion LoRA for the served
    model: a library entry for the Generate tab (not the chat), which changes the images."""
    import numpy as np

    from app.services import GenerateRequest
    from app.services.pipelines import AdapterUse
    from app.ui import UI
    from lora_diffusion.generate import load_pipeline

    from .tiny_sd import build_tiny_sd

    folder = build_tiny_sd(tmp_path / "sd")
    s = AppServices(Settings(library=tmp_path / "lib", output=tmp_path / "out", device="cpu", models={"tiny": str(folder)}))
    unet = load_pipeline(str(folder)).unet
    hyper = T2L.for_model(unet, T2LConfig(rank=4, alpha=4.0, emb_dim=384, task_dim=16, pos_dim=8, hidden=32, head_in=16,
                                          targets=["unet-full"], component="unet"))
    perturb(hyper)
    hyper.save(s.settings.hyper_dir / "t2l-unet.safetensors", base_model=str(folder))
    name = s.hyper.text_to_lora("t2l-unet.safetensors", "a ring shape", "smollm2")
    ui = UI(s)
    assert name in ui.library_choices(diffusion=True) and not s.library.entry(name)["llm_base"]
    assert "Generate & Blend" in ui._generated(name)[1]
    req = GenerateRequest("a ring", steps=2, num_images=1, model="tiny")
    base = np.asarray(s.generator.generate(req)[0]).astype(int)
    use = AdapterUse(str(s.library.path(name)), 4.0, name)
    adapted = np.asarray(s.generator.generate(GenerateRequest("a ring", steps=2, num_images=1, model="tiny",
                                                              adapters=(use,)))[0]).astype(int)
    assert np.abs(adapted - base).mean() > 0
