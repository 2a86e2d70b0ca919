"""Gate training on the demo model: the objective falls, a resumed run retraces the uninterrupted one exactly,
and the gates refuse LoRA files that changed since (naming them)."""

from __future__ import annotations

import shutil

import pytest

import lora_diffusion as ld
from lora_diffusion import world
from lora_diffusion.core.errors import AdapterFileError
from lora_diffusion.demo_model import load_demo_pipeline
from lora_diffusion.fusion import fuse, load_gates
from lora_diffusion.io.library import sha256
from training.config import ConfigError, parse_args
from training.train_gates import GateConfig, train

from .conftest import perturb

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("lib")
    pipe = load_demo_pipeline()
    for i, (name, scenes) in enumerate((("ring", [world.Scene("ring", "red", "blue"), world.Scene("ring", "green", "white")]),
                                        ("dotted", [world.Scene("star", "blue", "yellow", "dotted")]))):
        ld.add_adapter(pipe.unet, ld.AdapterSpec(rank=2, targets="unet-attn", seed=i), name)
        perturb(pipe.unet, name, std=0.3, seed=i)
        ld.save_adapter(pipe.unet, d / f"{name}.safetensors", name)
        (d / "data" / name).mkdir(parents=True)
        for k, s in enumerate(scenes):
            world.render(s).save(d / "data" / name / f"{k}.png")
            (d / "data" / name / f"{k}.txt").write_text(s.caption())
    return d


def _cfg(loras, out, steps, *extra):
    args = ["--loras", f"{loras / 'ring.safetensors'},{loras / 'dotted.safetensors'}", "--output_dir", str(out),
            "--max_train_steps", str(steps), "--train_batch_size", "2", "--report_to", "none", "--no-progress", *extra]
    return parse_args(GateConfig, args)[0]


def test_gates_learn_resume_exactly_and_refuse_changed_loras(loras, tmp_path):
    full = train(_cfg(loras, tmp_path / "a", 6, "--checkpointing_steps", "3", "--lr", "0.05"))
    before, after = full.validation
    assert after < before, full.validation
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-3", tmp_path / "b" / "checkpoints" / "checkpoint-3")
    resumed = train(_cfg(loras, tmp_path / "b", 6, "--checkpointing_steps", "3", "--lr", "0.05",
                         "--resume_from_checkpoint", "latest"))
    assert resumed.first_step == 4 and resumed.losses == full.losses[3:]
    pipe = load_demo_pipeline()
    for n in ("ring", "dotted"):
        ld.load_adapter(pipe, loras / f"{n}.safetensors", name=n)
    f = fuse(pipe, ["ring", "dotted"], method="gated")
    load_gates(f, full.gates, {n: sha256(loras / f"{n}.safetensors") for n in ("ring", "dotted")})
    with pytest.raises(AdapterFileError, match=r"'ring' differs from the file the gates were trained with"):
        load_gates(f, full.gates, {"ring": "f" * 64, "dotted": sha256(loras / "dotted.safetensors")})


def test_gate_training_needs_two_loras_with_captioned_images(loras, tmp_path):
    with pytest.raises(ConfigError, match="at least 2"):
        train(parse_args(GateConfig, ["--loras", str(loras / "ring.safetensors"), "--output_dir", str(tmp_path)])[0])
    (tmp_path / "data" / "x").mkdir(parents=True)
    shutil.copy(loras / "ring.safetensors", tmp_path / "x.safetensors")
    shutil.copy(loras / "data" / "ring" / "0.png", tmp_path / "data" / "x" / "0.png")
    with pytest.raises(Exception, match=r"needs each image's caption"):
        train(parse_args(GateConfig, ["--loras", f"{tmp_path / 'x.safetensors'},{loras / 'ring.safetensors'}",
                                      "--output_dir", str(tmp_path / "o")])[0])


def test_sigterm_saves_a_checkpoint_of_the_step_and_no_final_gates(loras, tmp_path, monkeypatch):
    import os
    import signal

    import training.train_gates as tg
    from training.loop import TrainingStopped

    real = tg.fit

    def fit(*a, **kw):  # train() calls fit(acc, model, opt, sched, data, objective, loop, start, hooks, on_stop=...)
        return real(*a[:8], [*a[8], lambda s, logs: s == 2 and os.kill(os.getpid(), signal.SIGTERM)], **kw)

    monkeypatch.setattr(tg, "fit", fit)
    with pytest.raises(TrainingStopped, match="stopped at step 2/6"):
        train(_cfg(loras, tmp_path, 6, "--checkpointing_steps", "0"))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "gates.safetensors").is_file()
    assert not (tmp_path / "gates.safetensors").exists()
