"""``train_tlora --init_adapter`` with an exported file: its embeddings and text-encoder part come back too.

A pivotal-tuning run with a text-encoder LoRA exports canonical and kohya files (``bundle_emb.*``); a new run
started from either draws what the file draws before its first step, its placeholder starts at the file's rows,
and a file that does not fit the run is one error with nothing of it left on the pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import lora_diffusion as ld
from lora_diffusion import embeddings as E
from lora_diffusion.generate import load_pipeline
from lora_diffusion.io.files import read_safetensors, write_safetensors
from training.config import ConfigError
from training.init_adapter import load_init_adapter
from training.train_tlora import build, train

from .tiny_dit import flux_model, sd3_model  # noqa: F401
from .tiny_sd import _one_thread, sd_model, sdxl_model, subject, tiny_config  # noqa: F401

TE = "clip-text"
KEY = "bundle_emb.<sks>.string_to_param.*"


@pytest.fixture(scope="module")
def exported(sd_model, subject, tmp_path_factory):  # noqa: F811
    """Pivotal tuning (2 vectors) with a text-encoder LoRA, 2 steps: its canonical and kohya files."""
    cfg = tiny_config(sd_model, subject, tmp_path_factory.mktemp("pivotal"), variant="lora", max_train_steps=2,
                      learning_rate=1e-2, train_embedding=True, num_vectors=2, embedding_lr=0.05,
                      text_encoder_targets=TE, prompt_template="a photo of {0}")
    return train(cfg).outputs


def _pipe(model: Path):
    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _draw(pipe) -> np.ndarray:
    return pipe("a photo of <sks> dog", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("form", ["canonical", "kohya"])
def test_resume_from_export_draws_as_the_file_and_starts_at_its_rows(form, exported, sd_model, subject,  # noqa: F811
                                                                     tmp_path):
    src = exported[form]
    run = build(tiny_config(sd_model, subject, tmp_path / "run", init_adapter=str(src), train_embedding=True,
                            text_encoder_targets=TE))
    ref = _pipe(sd_model)
    ld.load_adapter(ref, src)
    file_rows = read_safetensors(src)[0][KEY]  # (2, 32)
    assert file_rows.shape == (2, 32) and file_rows.abs().sum() > 0
    assert torch.equal(run.tokens.vectors["text_encoder"], file_rows)  # step 0: the file's rows, trainable
    assert run.tokens.trainable and run.text_encoders == [run.pipe.text_encoder]
    assert any(p.requires_grad for _, p in ld.api.adapter_parameters(run.pipe.text_encoder, "default"))
    np.testing.assert_allclose(_draw(run.pipe), _draw(ref), atol=1e-5)
    bare = _pipe(sd_model)  # and the file does change the drawing (the check above is not vacuous)
    bare.tokenizer.add_tokens(["<sks>", "<sks>_1"])
    bare.text_encoder.resize_token_embeddings(len(bare.tokenizer))
    assert np.abs(_draw(bare) - _draw(ref)).max() > 1e-3


def test_without_embedding_or_text_training_the_file_parts_are_kept_fixed(exported, sd_model, subject,  # noqa: F811
                                                                           tmp_path, caplog):
    """No --placeholder_token: the file's token; no --train_embedding: its rows fixed; no --text_encoder_targets:
    its text-encoder part frozen (a warning names it); the result holds all three."""
    src = exported["canonical"]
    with caplog.at_level(logging.WARNING, logger="training.init_adapter"):
        out = train(tiny_config(sd_model, subject, tmp_path / "run", init_adapter=str(src), max_train_steps=2,
                                learning_rate=1e-2)).outputs
    assert "text-encoder adapter (text_encoder" in caplog.text and "--text_encoder_targets" in caplog.text
    want, got = read_safetensors(src)[0], read_safetensors(out["canonical"])[0]
    assert torch.equal(got[KEY], want[KEY])
    te = [k for k in want if k.startswith("text_encoder.")]
    assert te and all(torch.equal(got[k], want[k]) for k in te)
    unet = [k for k in want if k.startswith("unet.") and "lora_B" in k]
    assert not all(torch.equal(got[k], want[k]) for k in unet)  # the UNet part trained on
    assert out["a1111"].is_file()


def _file_with(src: Path, dst: Path, **tensors: torch.Tensor) -> Path:
    t, meta = read_safetensors(src)
    write_safetensors(dst, {**t, **tensors}, meta)
    return dst


def _nothing_left(pipe, vocab: int) -> None:
    assert ld.list_adapters(pipe) == [] and len(pipe.tokenizer) == vocab


def test_embedding_width_of_another_model_is_refused(exported, sd_model, subject, tmp_path):  # noqa: F811
    bad = _file_with(exported["canonical"], tmp_path / "wide.safetensors", **{KEY: torch.randn(2, 48)})
    pipe = _pipe(sd_model)
    vocab = len(pipe.tokenizer)
    cfg = tiny_config(sd_model, subject, tmp_path / "run", init_adapter=str(bad), train_embedding=True)
    with pytest.raises(E.EmbeddingError, match=r"wide.safetensors: token '<sks>' embedding has shape \(2, 48\); this "
                                               r"model's text encoder text_encoder expects \(2, 32\) \(width 32"):
        load_init_adapter(pipe, cfg)
    _nothing_left(pipe, vocab)
    with pytest.raises(E.EmbeddingError, match="wide.safetensors: token '<sks>'"):
        build(cfg)


def test_embeddings_for_another_token_are_refused(exported, sd_model, subject, tmp_path):  # noqa: F811
    pipe = _pipe(sd_model)
    vocab = len(pipe.tokenizer)
    cfg = tiny_config(sd_model, subject, tmp_path / "run", init_adapter=str(exported["kohya"]),
                      placeholder_token="<cat>", train_embedding=True)
    from training.config import resolve_defaults

    resolve_defaults(cfg, ld.variant_names())
    with pytest.raises(ConfigError, match=r"kohya.safetensors: bundles embeddings for \['<sks>'\], not for this run's "
                                          r"placeholder '<cat>'; expected --placeholder_token '<sks>'"):
        load_init_adapter(pipe, cfg)
    _nothing_left(pipe, vocab)


def test_a_file_without_the_denoiser_part_is_refused(exported, sd_model, subject, tmp_path):  # noqa: F811
    t, meta = read_safetensors(exported["kohya"])
    only_te = tmp_path / "te_only.safetensors"
    write_safetensors(only_te, {k: v for k, v in t.items() if not k.startswith("lora_unet_")}, meta)
    pipe = _pipe(sd_model)
    vocab = len(pipe.tokenizer)
    cfg = tiny_config(sd_model, subject, tmp_path / "run", init_adapter=str(only_te))
    from training.config import resolve_defaults

    resolve_defaults(cfg, ld.variant_names())
    with pytest.raises(ConfigError, match="te_only.safetensors: holds no adapter for the UNet2DConditionModel"):
        load_init_adapter(pipe, cfg)
    _nothing_left(pipe, vocab)


def test_file_tokens_are_bundled_names(exported):
    from training.init_adapter import bundled_tokens

    assert bundled_tokens(exported["canonical"]) == bundled_tokens(exported["kohya"]) == ["<sks>"]
    assert bundled_tokens(exported["a1111"]) == []  # a standalone embedding file is not a bundle


@pytest.mark.parametrize("fixture", ["flux_model", "sd3_model"])
def test_dit_runs_continue_their_exported_transformer_adapter(fixture, request, subject, tmp_path):  # noqa: F811
    """Flux/SD3: the pipeline-level load finds the transformer for canonical and kohya exports alike."""
    src = request.getfixturevalue(fixture)
    out = train(tiny_config(src, subject, tmp_path / "a", max_train_steps=2, learning_rate=1e-2)).outputs
    for form in ("canonical", "kohya"):
        run = build(tiny_config(src, subject, tmp_path / form, init_adapter=str(out[form])))
        ref = load_pipeline(str(src))
        ld.load_adapter(ref, out[form], name="default")
        got, want = ld.adapter_state_dict(run.unet, "default"), ld.adapter_state_dict(ref.transformer, "default")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), form
        assert any(want[k].abs().max() > 0 for k in want if "lora_B" in k)
        assert run.text_encoders == [] and all(p.requires_grad for _, p in ld.adapter_parameters(run.unet, "default"))


def test_sdxl_export_continues_both_encoders_tokens_and_text_adapters(sdxl_model, subject, tmp_path):  # noqa: F811
    cfg = tiny_config(sdxl_model, subject, tmp_path / "a", variant="lora", max_train_steps=2, learning_rate=1e-2,
                      train_embedding=True, embedding_lr=0.05, text_encoder_targets=TE)
    src = train(cfg).outputs["kohya"]
    run = build(tiny_config(sdxl_model, subject, tmp_path / "b", init_adapter=str(src), train_embedding=True,
                            text_encoder_targets=TE))
    rows = read_safetensors(src)[0]
    assert torch.equal(run.tokens.vectors["text_encoder"], rows["bundle_emb.<sks>.clip_l"])
    assert torch.equal(run.tokens.vectors["text_encoder_2"], rows["bundle_emb.<sks>.clip_g"])
    assert run.text_encoders == [run.pipe.text_encoder, run.pipe.text_encoder_2]
    ref = _pipe(sdxl_model)
    ld.load_adapter(ref, src)
    np.testing.assert_allclose(_draw(run.pipe), _draw(ref), atol=1e-5)


def test_text_encoder_adapter_trains_in_fp32_under_mixed_precision(sd_model, subject, tmp_path):  # noqa: F811
    """bf16: the frozen text-encoder weights are cast, its LoRA (--text_encoder_targets) stays fp32 like the UNet's."""
    run = build(tiny_config(sd_model, subject, tmp_path / "run", variant="lora", mixed_precision="bf16",
                            train_embedding=True, text_encoder_targets=TE))
    te = run.text_encoders[0]
    trainable = [p for p in te.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert te.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in run.unet.parameters() if p.requires_grad)
