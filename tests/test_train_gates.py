"""Gate training on the demo model: the objective falls (paper and composition objectives), a resumed run retraces
the uninterrupted one exactly, the gates refuse LoRA files that changed since (naming them), and a LoRA's
pivotal-tuning token loads with it."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.core.errors import AdapterFileError
from lora_diffusion.demo import world
from lora_diffusion.demo.model import load_demo_pipeline
from lora_diffusion.embeddings import TokenEmbeddings, apply_embeddings, init_vectors, loaded_embeddings
from lora_diffusion.fusion import fuse, load_gates
from lora_diffusion.io.library import sha256
from training.config import ConfigError, parse_args
from training.loop import make_accelerator
from training.train_gates import GateConfig, _build, find_data, find_pairs, train

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
        if name == "ring":  # pivotal tuning: the trigger word's own row travels in the file
            vec = init_vectors(pipe, "ring", 1)
            apply_embeddings(pipe, name, [TokenEmbeddings("ring", {r: v + 0.5 for r, v in vec.items()})])
        ld.save_adapter(pipe, d / f"{name}.safetensors", name)
        (d / "data" / name).mkdir(parents=True)
        for k, s in enumerate(scenes):
            world.render(s).save(d / "data" / name / f"{k}.png")
            (d / "data" / name / f"{k}.txt").write_text(s.caption())
    (d / "data" / "pairs" / "ring+dotted").mkdir(parents=True)
    for k, s in enumerate([world.Scene("ring", "red", "blue", "dotted"), world.Scene("ring", "green", "white", "dotted")]):
        world.render(s).save(d / "data" / "pairs" / "ring+dotted" / f"{k}.png")
        (d / "data" / "pairs" / "ring+dotted" / f"{k}.txt").write_text(s.caption())
    (d / "data" / "pairs" / "ring+square").mkdir()  # names a LoRA not given: ignored
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


def test_composition_objective_learns_from_pairs_and_loads_pivotal_tokens(loras, tmp_path):
    res = train(_cfg(loras, tmp_path / "c", 6, "--objective", "composition", "--lr", "0.05", "--checkpointing_steps", "0"))
    before, after = res.validation
    assert after < before, res.validation
    _, meta = ld.io.files.read_safetensors(res.gates)
    assert meta["objective"] == "composition" and meta["pairs"] == "ring+dotted"
    cfg = _cfg(loras, tmp_path / "d", 1, "--objective", "composition", "--paper_weight", "0.5")
    data = find_data(cfg)
    pipe, _, _, pair_conds = _build(cfg, data, find_pairs(cfg, data), make_accelerator("no", True))
    assert list(loaded_embeddings(pipe)) == ["ring"]  # the LoRA's token came with it
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("ring")]
    assert torch.allclose(row, init_vectors(load_demo_pipeline(), "ring", 1)["text_encoder"][0] + 0.5)
    assert [c.sets[False].prompts for c in pair_conds] == [["a red dotted ring on a blue background",
                                                            "a green dotted ring on a white background"]]
    res = train(_cfg(loras, tmp_path / "e", 2, "--objective", "composition", "--paper_weight", "0.5"))
    assert len(res.losses) == 2 and all(math.isfinite(v) for v in res.losses)


def test_composition_objective_needs_pair_folders_naming_two_loras(loras, tmp_path):
    with pytest.raises(ConfigError, match=r"--pair_data: no folder .*<lora a>\+<lora b>"):
        train(_cfg(loras, tmp_path / "a", 2, "--objective", "composition", "--pair_data", str(tmp_path / "none")))
    (tmp_path / "pairs" / "star+dotted").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no <a>\+<b>/ folder names two of the LoRAs \['dotted', 'ring'\]"):
        train(_cfg(loras, tmp_path / "b", 2, "--objective", "composition", "--pair_data", str(tmp_path / "pairs")))


def test_roles_come_from_lora_kind_and_roles_override_them(loras, tmp_path):
    """Per-role gates need each LoRA's role: the file's lora_kind (as blend reads it), else --roles; the trained
    file records them, and bad --roles entries are named."""
    import json

    from lora_diffusion.io.files import read_header, read_safetensors, write_safetensors

    lib = tmp_path / "lib"
    shutil.copytree(loras, lib)
    t, meta = read_safetensors(lib / "dotted.safetensors")
    write_safetensors(lib / "dotted.safetensors", t, {**meta, "lora_kind": "style"})
    assert {d.name: d.role for d in find_data(_cfg(lib, tmp_path / "a", 1))} == {"ring": "other", "dotted": "style"}
    cfg = _cfg(lib, tmp_path / "b", 1, "--roles", "ring=subject")
    assert {d.name: d.role for d in find_data(cfg)} == {"ring": "subject", "dotted": "style"}
    res = train(cfg)
    assert json.loads(read_header(res.gates)[1]["roles"]) == {"ring": "subject", "dotted": "style"}
    for bad in ("ring=hero", "zz=style", "ring"):
        with pytest.raises(ConfigError, match="--roles"):
            find_data(_cfg(lib, tmp_path / "c", 1, "--roles", bad))


@pytest.mark.parametrize("kind", ["highpass", "spectrum"])
def test_texture_term_trains_only_the_gates(loras, tmp_path, kind):
    """--texture_loss adds a detail term on the decoded prediction: it is logged, recorded in the gates file, and
    its gradient reaches the gates and nothing else (base model, LoRAs, VAE, text encoder stay frozen)."""
    from diffusers import DDPMScheduler

    from training.train_gates import GateObjective, PairSampler

    extra = ("--objective", "composition", "--texture_loss", kind, "--texture_weight", "5")
    cfg = _cfg(loras, tmp_path / "a", 1, *extra)
    data = find_data(cfg)
    pairs = find_pairs(cfg, data)
    pipe, fusion, conds, pair_conds = _build(cfg, data, pairs, make_accelerator("no", True))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    objective = GateObjective(pipe.unet, pipe.unet, sched, conds, [d.name for d in data], cfg.gates, 0, pair_conds,
                              pipe.vae)
    sampler = PairSampler([c.sets[False] for c in conds], 2, 0.0, 0, [(p.a, p.b, c.sets[False])
                                                                      for p, c in zip(pairs, pair_conds)], False)
    objective(sampler.next_batch()).backward()
    assert objective.last["texture"] > 0
    gates = {id(p) for p in fusion.parameters()}
    with_grad = [p for comp in ld.components(pipe).values() for p in comp.parameters() if p.grad is not None]
    assert with_grad and all(id(p) in gates for p in with_grad)
    assert any(float(p.grad.abs().sum()) > 0 for p in fusion.parameters())
    cfg.gates.texture_weight = 0.0  # off: the plain composition loss, no texture term
    objective(sampler.next_batch())
    assert "texture" not in objective.last and "composition" in objective.last
    res = train(_cfg(loras, tmp_path / "b", 2, *extra))
    assert all(math.isfinite(v) for v in res.losses)
    _, meta = ld.io.files.read_safetensors(res.gates)
    assert meta["texture_loss"] == f"{kind} x 5.0"
