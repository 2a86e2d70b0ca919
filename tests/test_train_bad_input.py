"""Bad input to the trainer: a clear error, raised before the first training step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import lora_diffusion as ld
import training.loop
from training.checkpoint import CheckpointError
from training.config import ConfigError
from training.data import DataError
from training.train_tlora import main, train

from .tiny_sd import _one_thread, sd_model, subject, tiny_config, write_images  # noqa: F401


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a training step starts."""
    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(training.loop, "train_step", boom)


def test_empty_folder(sd_model, tmp_path, no_training):  # noqa: F811
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in .*empty"):
        train(tiny_config(sd_model, tmp_path / "empty", tmp_path / "out"))


def test_folder_without_images(sd_model, tmp_path, no_training):  # noqa: F811
    d = tmp_path / "notes"
    d.mkdir()
    (d / "caption.txt").write_text("a dog")
    with pytest.raises(DataError, match=r"no images .*found caption\.txt"):
        train(tiny_config(sd_model, d, tmp_path / "out"))


def test_corrupt_image(sd_model, tmp_path, no_training):  # noqa: F811
    d = write_images(tmp_path / "imgs")
    (d / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        train(tiny_config(sd_model, d, tmp_path / "out"))


def test_missing_folder(sd_model, tmp_path, no_training):  # noqa: F811
    with pytest.raises(DataError, match="is not a folder"):
        train(tiny_config(sd_model, tmp_path / "nope", tmp_path / "out"))


def test_image_smaller_than_resolution(sd_model, subject, tmp_path, no_training):  # noqa: F811
    with pytest.raises(DataError, match=r"40x40 pixels is smaller than the training resolution 64"):
        train(tiny_config(sd_model, subject, tmp_path / "out", resolution=64))


def test_unknown_variant(sd_model, subject, tmp_path, no_training):  # noqa: F811
    with pytest.raises(ConfigError, match=r"unknown variant 'lorax'; registered variants: \[.*'tlora'"):
        train(tiny_config(sd_model, subject, tmp_path / "out", variant="lorax"))


def test_rank_above_layer_size(sd_model, subject, tmp_path, no_training):  # noqa: F811
    with pytest.raises(ld.TargetError, match=r"rank 64 is larger than the layer allows"):
        train(tiny_config(sd_model, subject, tmp_path / "out", lora_rank=64, min_rank=32))


def test_placeholder_split_by_tokenizer(sd_model, subject, tmp_path, no_training):  # noqa: F811
    with pytest.raises(DataError, match=r"'xyzzy': the tokenizer splits it into \['x', 'y', 'z', 'z', 'y</w>'\]"):
        train(tiny_config(sd_model, subject, tmp_path / "out", placeholder_token="xyzzy"))


def test_unwritable_output(sd_model, subject, tmp_path, no_training):  # noqa: F811
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder should go: unwritable even for root
    with pytest.raises(ConfigError, match="--output_dir .*not writable"):
        train(tiny_config(sd_model, subject, blocker / "out"))
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"):
            train(tiny_config(sd_model, subject, ro))


@pytest.mark.parametrize("change", [{"variant": "lora"}, {"lora_rank": 8, "min_rank": 4}, {"class_name": "cat"}])
def test_checkpoint_from_another_run_or_variant(change, sd_model, subject, tmp_path, monkeypatch):  # noqa: F811
    train(tiny_config(sd_model, subject, tmp_path, max_train_steps=1, checkpointing_steps=1))
    monkeypatch.setattr(training.loop, "train_step", lambda *a, **k: pytest.fail("training started"))
    key = next(iter(change))
    with pytest.raises(CheckpointError, match=f"written by another run; it differs in: .*{key}="):
        train(tiny_config(sd_model, subject, tmp_path, resume_from_checkpoint="latest", **change))


def test_resume_from_a_folder_that_is_not_a_checkpoint(sd_model, subject, tmp_path, no_training):  # noqa: F811
    with pytest.raises(CheckpointError, match="is not a checkpoint of this trainer"):
        train(tiny_config(sd_model, subject, tmp_path / "out", resume_from_checkpoint=str(subject)))


def test_hub_id_offline_is_one_clear_line(subject, tmp_path, no_training):  # noqa: F811
    with pytest.raises(ld.AdapterError, match=r"could not load the base model 'no-such-org/no-such-model': not a local "
                                              r"folder or file, not in the Hugging Face cache"):
        train(tiny_config("no-such-org/no-such-model", subject, tmp_path / "out"))


def test_no_model_and_no_demo_model(subject, tmp_path, no_training, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LORA_DIFFUSION_DEMO_MODEL", str(tmp_path / "assets" / "demo-sd"))
    cfg = tiny_config(Path("x"), subject, tmp_path / "out")
    cfg.model.pretrained_model_name_or_path = None
    with pytest.raises(ld.AdapterError, match=r"no base model given, and the embedded demo model at .* is missing.*"
                                              r"python -m training.pretrain_demo.*pass one with --pretrained_model_name_or_path"):
        train(cfg)


def test_pickled_single_file_refused(subject, tmp_path, no_training):  # noqa: F811
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ld.AdapterError, match="pickled checkpoints are refused"):
        train(tiny_config(tmp_path / "model.ckpt", subject, tmp_path / "out"))


def test_single_file_dispatch(subject, tmp_path, monkeypatch, no_training):  # noqa: F811
    """A .safetensors base goes through from_single_file (SD or SDXL picked from its keys)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    f = tmp_path / "model.safetensors"
    save_file({"conditioner.embedders.1.model.x": torch.zeros(1)}, str(f))
    seen = {}

    def fake(cls, path, **kw):
        seen.update(cls=cls, path=path, **kw)
        raise OSError("config not available offline")

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(fake))
    with pytest.raises(ld.AdapterError, match="could not load the base model .*model.safetensors.*config not available"):
        train(tiny_config(f, subject, tmp_path / "out", single_file_config="cfg-folder"))
    assert seen["cls"] is StableDiffusionXLPipeline and seen["config"] == "cfg-folder"


def test_cli_exits_with_message_not_traceback(subject, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit, match=r"^error: --variant: unknown variant 'nope'"):
        main(["--variant", "nope", "--instance_data_dir", str(subject), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"error: --lora_rank: expected int, found 'big'"):
        main(["--lora_rank", "big"])
