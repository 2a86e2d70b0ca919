"""The LoRA library and text retrieval (AutoLoRA's first half) on a seeded demo-world library of 15 files."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from lora_diffusion.retrieval import ClipTextEmbedder, LibraryError, LoraLibrary, default_embedder, pipeline_family
from lora_diffusion.retrieval.search import phrases

from .retrieval_library import build_library, prompts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm():
    return default_embedder()


@pytest.fixture(scope="module")
def library(tmp_path_factory, minilm):
    folder, files = build_library(tmp_path_factory.mktemp("lib"))
    return LoraLibrary(folder, embedder=minilm), files


class CountingEmbedder:
    """Wraps an embedder and records every text it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.id, self.dim, self.seen = inner, inner.id, inner.dim, []

    def embed(self, texts):
        self.seen += list(texts)
        return self.inner.embed(texts)


def test_entries_families_sidecars_and_errors(library):
    lib, files = library
    assert len(lib.entries) == 15 and len(lib.usable("demo")) == 13
    by = {role: lib[f] for role, f in files.items()}
    assert by["ring"].format == "canonical" and by["ring"].family == "demo" and by["ring"].trigger_words == ["sks ring"]
    assert "a red sks ring on a blue background" in by["ring"].description  # our trainer's captions
    assert by["heart"].format == "kohya" and "Heart shape" in by["heart"].description  # modelspec.title
    assert "ohwx heart" in by["heart"].description  # ss_dataset_dirs / tags / trigger
    assert by["watercolor"].description.startswith("Watercolor painting style")  # the .txt sidecar comes first
    assert "cybercity" in by["city"].trigger_words and "futuristic cyberpunk" in by["city"].description  # A1111 .json
    assert "<p>" not in by["face"].description and "anime portrait faces" in by["face"].description  # .civitai.info
    assert by["unnamed"].description == "lora_000123"  # nothing to go on but the file name
    assert by["sdxl"].family == "sdxl" and "made for SDXL" in by["sdxl"].incompatibility("demo")
    assert by["broken"].error and "truncated" in by["broken"].error and lib.errors == [by["broken"]]
    skipped = dict((e.file, why) for e, why in lib.skipped("demo"))
    assert set(skipped) == {files["sdxl"], files["broken"]}
    assert "never applied: made for SDXL" in lib.listing("demo") and "ERROR" in lib.listing("demo")


def test_library_reads_headers_only(tmp_path, monkeypatch, minilm):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("tensors were loaded"))
    monkeypatch.setattr(safetensors.torch, "safe_open", lambda *a, **k: pytest.fail("tensors were opened"))
    folder, files = build_library(tmp_path)
    lib = LoraLibrary(folder, embedder=minilm)
    assert lib.retrieve("a dotted heart", family="demo")[0].entry.file in (files["dotted"], files["heart"])


def test_concept_plus_style_prompts_find_both_loras_in_top3(library):
    """>= 50 fixed prompts naming a concept and a style: both LoRAs in the top 3 (MiniLM)."""
    lib, files = library
    cases = prompts()
    assert len(cases) >= 50

    def rate(**kw) -> tuple[float, list[str]]:
        misses = []
        for prompt, concept, style in cases:
            got = [m.entry.file for m in lib.retrieve(prompt, k=3, family="demo", **kw)]
            if files[concept] not in got or files[style] not in got:
                misses.append(f"{prompt!r} -> {got}")
        return 1 - len(misses) / len(cases), misses

    phrase_rate, misses = rate()
    whole_rate, _ = rate(phrase_words=0)  # one embedding of the whole prompt, for the record
    logging.getLogger(__name__).warning("top-3 rate over %d prompts: phrase-level %.3f, whole prompt only %.3f",
                                        len(cases), phrase_rate, whole_rate)
    assert phrase_rate >= 0.95, f"rate {phrase_rate:.3f} (whole prompt: {whole_rate:.3f}); misses: {misses}"


def test_other_family_never_retrieved_even_when_relevant(library):
    lib, files = library
    r = lib.retrieve("a ring", k=3, family="demo")
    assert files["sdxl"] not in [m.entry.file for m in r] and r[0].entry.file == files["ring"]
    assert any(e.file == files["sdxl"] and "SDXL" in why for e, why in r.skipped) and "skipped" in r.message
    r_any = lib.retrieve("a ring", k=3, family=None)  # no family given: nothing filtered but unreadable files
    assert files["sdxl"] in [m.entry.file for m in r_any]
    assert files["broken"] not in [m.entry.file for m in r_any]


def test_threshold_no_relevant_lora_returns_nothing_and_says_so(library):
    lib, files = library
    r = lib.retrieve("a mountain landscape at sunset", k=3, threshold=0.45, family="demo")
    assert len(r) == 0 and list(r) == [] and r.below_threshold
    assert "no LoRA" in r.message and "base model" in r.message and "0.45" in r.message
    r = lib.retrieve("a red ring", k=3, threshold=0.45, family="demo")
    assert [m.entry.file for m in r] == [files["ring"]] and r[0].phrase == "a red ring" and r[0].score >= 0.45


def test_phrases_skip_function_words():
    assert phrases("a red ring on a blue background", 2) == ["red", "ring", "blue", "red ring"]


def test_embedding_cache_on_disk_keyed_by_description(library, tmp_path, minilm):
    lib, files = library
    folder = tmp_path / "lib"
    shutil.copytree(lib.folder, folder, ignore=shutil.ignore_patterns(".lora_embeddings"))
    first = CountingEmbedder(minilm)
    LoraLibrary(folder, embedder=first).retrieve("a dotted heart")
    assert len(first.seen) > 13  # descriptions (13 usable) and the prompt's phrases
    again = CountingEmbedder(minilm)
    LoraLibrary(folder, embedder=again).retrieve("a dotted heart")
    assert "a dotted heart" in again.seen and not any(". " in t for t in again.seen)  # no description re-embedded
    (folder / files["cat"]).with_suffix(".txt").write_text("a tabby cat photo")  # a new sidecar: one new description
    edited = CountingEmbedder(minilm)
    LoraLibrary(folder, embedder=edited).retrieve("a cat")
    descriptions = [t for t in edited.seen if t.startswith("a tabby cat photo")]
    assert len(descriptions) == 1 and (folder / ".lora_embeddings" / "all-MiniLM-L6-v2.safetensors").is_file()
    assert all(not e.file.startswith(".") for e in LoraLibrary(folder, embedder=minilm).entries)  # cache not indexed


def test_empty_and_missing_folders(tmp_path, minilm):
    empty = tmp_path / "empty"
    empty.mkdir()
    lib = LoraLibrary(empty, embedder=minilm)
    r = lib.retrieve("a dotted heart")
    assert lib.entries == [] and len(r) == 0 and "no LoRA files" in r.message and "base model" in r.message
    with pytest.raises(LibraryError, match="nope: no such folder"):
        LoraLibrary(tmp_path / "nope")
    (tmp_path / "f.safetensors").write_bytes(b"")
    with pytest.raises(LibraryError, match="not a folder"):
        LoraLibrary(tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="k must be"):
        lib.retrieve("x", k=0)


def test_corrupted_files_reported_and_others_still_read(tmp_path, minilm, caplog):
    folder, files = build_library(tmp_path)
    (folder / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2]}   ")  # JSON, not a header
    (folder / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    with caplog.at_level(logging.WARNING):
        lib = LoraLibrary(folder, embedder=minilm)
    errors = {e.file: e.error for e in lib.errors}
    assert set(errors) == {"junk.safetensors", "pickle.safetensors", files["broken"]}
    assert "pickle" in errors["pickle.safetensors"] and "junk.safetensors" in caplog.text
    assert len(lib.usable("demo")) == 13


def test_clip_text_embedder_of_the_demo_pipeline(library):
    from transformers import CLIPTextModel, CLIPTokenizer

    from lora_diffusion.demo.model import default_model_path

    lib, files = library
    tok = CLIPTokenizer.from_pretrained(default_model_path(), subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(default_model_path(), subfolder="text_encoder")
    clip = ClipTextEmbedder(tokenizer=tok, text_encoder=te)
    r = lib.retrieve("a dotted heart", k=3, family="demo", embedder=clip)
    assert r.embedder == clip.id and r.embedder.startswith("clip-") and len(r) == 3 and clip.dim == 64
    assert json.loads(json.dumps([m.score for m in r]))  # plain floats


def test_pipeline_family_of_the_demo_unet():
    from diffusers import UNet2DConditionModel

    from lora_diffusion.demo.model import default_model_path

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(default_model_path(), subfolder="unet"))
    assert pipeline_family(unet) == "demo"


def test_cli_lists_and_searches(library, capsys, monkeypatch, minilm):
    import lora_diffusion.retrieval.embedders as emb
    from lora_diffusion.retrieval.__main__ import main

    lib, files = library
    monkeypatch.setattr(emb, "default_embedder", lambda device="cpu": minilm)
    assert main(["--library", str(lib.folder), "--family", "demo"]) == 0
    out = capsys.readouterr().out
    assert files["broken"] in out and "truncated" in out and "never applied: made for SDXL" in out
    assert main(["--library", str(lib.folder), "--family", "demo", "--prompt", "a dotted heart", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert files["dotted"] in out and files["heart"] in out and "text 0." in out
    assert main(["--library", str(lib.folder / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_a_second_copy_of_a_file_is_skipped_not_retrieved_twice(tmp_path):
    """The same LoRA in two places (a download kept in a sub-folder and imported at the top level): retrieved once,
    the copy listed as skipped naming the file it repeats (both would apply one LoRA at twice its weight)."""
    import shutil

    from lora_diffusion.retrieval import LoraLibrary
    from tests.retrieval_library import build_library

    lib, files = build_library(tmp_path)
    shutil.copyfile(lib / files["ring"], lib / "ring.safetensors")
    r = LoraLibrary(lib).retrieve("a red ring on a blue background", k=3)
    picked = [m.entry.file for m in r]
    assert files["ring"] in picked and "ring.safetensors" not in picked
    assert ("ring.safetensors", f"the same file as {files['ring']}") in [(e.file, why) for e, why in r.skipped]
