"""Gate training on diffusion transformers (tiny Flux.1 and SD3 pipelines, CPU, 32 px): the rectified-flow objective
of the T-LoRA trainer through the transformer, a finite loss, ``gates.safetensors`` with the LoRAs' sha256, a
resumed run that retraces the uninterrupted one exactly, the gate's φ(t) fed t = 1000·σ (the scale the timestep hook
hands it at sampling), and ``blend(method="gated", gates=...)`` loading the trained file on the same pipeline."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.blend import blend
from lora_diffusion.core.errors import AdapterFileError
from lora_diffusion.demo import world
from lora_diffusion.generate import load_pipeline
from lora_diffusion.io.files import read_header
from lora_diffusion.io.library import sha256
from training.config import parse_args
from training.train_gates import GateConfig, train

from .tiny_dit import flux_model, sd3_model, write_ring_dotted_loras  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red dotted ring on a blue background"
KW = dict(steps=2, height=32, width=32, seed=0)


@pytest.fixture(scope="module", params=["flux", "sd3"])
def dit(request, tmp_path_factory) -> dict:
    """The tiny model folder, two LoRAs on its transformer (``ring`` a concept, ``dotted`` a style) and their
    captioned images in ``data/<name>/``."""
    folder = request.getfixturevalue(f"{request.param}_model")
    d = tmp_path_factory.mktemp(f"{request.param}-gates")
    write_ring_dotted_loras(folder, d)
    scenes = {"ring": [world.Scene("ring", "red", "blue"), world.Scene("ring", "green", "white")],
              "dotted": [world.Scene("star", "blue", "yellow", "dotted")]}
    for name in ("ring", "dotted"):
        (d / "data" / name).mkdir(parents=True)
        for k, s in enumerate(scenes[name]):
            world.render(s).save(d / "data" / name / f"{k}.png")
            (d / "data" / name / f"{k}.txt").write_text(s.caption())
    return {"family": request.param, "folder": folder, "dir": d}


def _cfg(dit, out, steps, *extra):
    d = dit["dir"]
    args = ["--model", str(dit["folder"]), "--loras", f"{d / 'ring.safetensors'},{d / 'dotted.safetensors'}",
            "--output_dir", str(out), "--max_train_steps", str(steps), "--train_batch_size", "2", "--resolution", "32",
            "--report_to", "none", "--no-progress", "--lr", "0.05", *extra]
    return parse_args(GateConfig, args)[0]


def _pipe(dit):
    pipe = load_pipeline(str(dit["folder"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_gates_train_on_the_transformer_and_resume_exactly(dit, tmp_path):
    full = train(_cfg(dit, tmp_path / "a", 4, "--checkpointing_steps", "2"))
    assert len(full.losses) == 4 and all(math.isfinite(v) for v in full.losses)
    files = {n: dit["dir"] / f"{n}.safetensors" for n in ("ring", "dotted")}
    header, meta = read_header(full.gates)
    assert json.loads(meta["loras"]) == {n: sha256(f) for n, f in files.items()}
    assert {k.split(".", 1)[0] for k in header if k != "__metadata__"} == {"transformer"}
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-2", tmp_path / "b" / "checkpoints" / "checkpoint-2")
    resumed = train(_cfg(dit, tmp_path / "b", 4, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"))
    assert resumed.first_step == 3 and resumed.losses == full.losses[2:]
    a, b = ld.io.files.read_safetensors(full.gates)[0], ld.io.files.read_safetensors(resumed.gates)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    untrained = blend(_pipe(dit), PROMPT, list(files.values()), method="gated", **KW)
    res = blend(_pipe(dit), PROMPT, list(files.values()), method="gated", gates=full.gates, **KW)
    assert not any("without a gates file" in n for n in res.notes), res.notes
    assert not np.array_equal(res.gate_stats.strength, untrained.gate_stats.strength)
    assert untrained.gate_stats.summary()["mean"] == {"ring": 1.0, "dotted": 1.0}


def test_the_gate_sees_t_on_the_0_1000_scale_in_training_as_in_sampling(dit, tmp_path, monkeypatch):
    """φ(t) is a function of p = 1 - t/T: training must hand the gate t = 1000·σ with T = 1000, as the timestep
    hook does at sampling (Flux's transformer gets σ, the hook multiplies back); a σ in [0, 1] read as t would
    leave p ≈ 1 at every step."""
    import lora_diffusion.fusion.gated as gated

    seen: list[tuple[torch.Tensor, int]] = []
    real = gated.time_features

    def spy(ctx, n):
        seen.append((torch.as_tensor(ctx.timestep).detach().float().flatten().clone(), ctx.num_train_timesteps))
        return real(ctx, n)

    monkeypatch.setattr(gated, "time_features", spy)
    train(_cfg(dit, tmp_path / "a", 2, "--checkpointing_steps", "0"))
    trained = torch.cat([t for t, _ in seen])
    assert {T for _, T in seen} == {1000} and trained.max() > 1 and trained.max() <= 1000 and trained.min() >= 0
    seen.clear()
    pipe = _pipe(dit)
    d = dit["dir"]
    blend(pipe, PROMPT, [d / "ring.safetensors", d / "dotted.safetensors"], method="gated", **KW)
    sampled = sorted({round(float(t), 3) for t, _ in seen for t in t})
    assert {T for _, T in seen} == {1000}
    assert sampled == sorted(round(float(t), 3) for t in pipe.scheduler.timesteps) and max(sampled) > 1


def test_transformer_gates_are_refused_on_a_unet_and_unet_gates_on_the_transformer(dit, tmp_path):
    from lora_diffusion.demo.model import load_demo_pipeline
    from lora_diffusion.fusion import fuse, save_gates

    res = train(_cfg(dit, tmp_path / "a", 1, "--checkpointing_steps", "0"))
    unet_pipe = load_demo_pipeline()
    unet_pipe.set_progress_bar_config(disable=True)
    for i, n in enumerate(("ring", "dotted")):
        ld.add_adapter(unet_pipe.unet, ld.AdapterSpec(rank=2, targets="unet-attn", seed=i), n)
        ld.save_adapter(unet_pipe, tmp_path / f"u_{n}.safetensors", n)
    unet_files = [tmp_path / f"u_{n}.safetensors" for n in ("ring", "dotted")]
    with pytest.raises(AdapterFileError, match=r"gates trained on a model whose denoiser is \['transformer'\].*"
                                               r"pipeline has \['unet'\]"):
        blend(load_demo_pipeline(), PROMPT, unet_files, method="gated", gates=res.gates, allow_unseen=True, steps=1)
    hashes = {n: sha256(dit["dir"] / f"{n}.safetensors") for n in ("ring", "dotted")}
    unet_gates = save_gates(fuse(unet_pipe.unet, ["ring", "dotted"], method="gated"), tmp_path / "u.safetensors",
                            hashes)
    with pytest.raises(AdapterFileError, match=r"denoiser is \['unet'\].*pipeline has \['transformer'\]"):
        blend(_pipe(dit), PROMPT, [dit["dir"] / f"{n}.safetensors" for n in ("ring", "dotted")], method="gated",
              gates=unet_gates, **KW)


def test_composition_objective_on_the_transformer(dit, tmp_path):
    pairs = tmp_path / "pairs" / "ring+dotted"
    pairs.mkdir(parents=True)
    for k, s in enumerate([world.Scene("ring", "red", "blue", "dotted")]):
        world.render(s).save(pairs / f"{k}.png")
        (pairs / f"{k}.txt").write_text(s.caption())
    res = train(_cfg(dit, tmp_path / "a", 2, "--objective", "composition", "--pair_data", str(tmp_path / "pairs"),
                     "--paper_weight", "0.5", "--checkpointing_steps", "0"))
    assert all(math.isfinite(v) for v in res.losses)
    meta = read_header(res.gates)[1]
    assert meta["objective"] == "composition" and meta["texture_loss"] == "highpass x 3.0"  # the default, on


@pytest.mark.parametrize("kind", ["highpass", "spectrum"])
def test_texture_term_on_the_transformer_reaches_only_the_gates(dit, tmp_path, kind):
    """The flow texture term (x̂0 = x_σ - σ v̂ decoded by the pipeline's VAE, weight 1 - σ): 0 when v̂ is the true
    velocity (x̂0 = x0), finite and logged in the objective, its gradient reaching the gates and nothing else."""
    from lora_diffusion.families import denoiser
    from training.loop import make_accelerator
    from training.texture_loss import flow_texture_loss
    from training.train_gates import _build, _objective, find_data

    cfg = _cfg(dit, tmp_path / "a", 1, "--texture_loss", kind, "--texture_weight", "5")
    data = find_data(cfg)
    pipe, fusion, conds, pair_conds = _build(cfg, data, [], make_accelerator("no", True))
    objective, sampler = _objective(cfg, pipe, denoiser(pipe), data, [], conds, pair_conds)
    g = torch.Generator().manual_seed(0)
    x0 = torch.cat([conds[0].posterior(conds[0].sets[False].draw(g), torch.device("cpu"))[0] for _ in range(2)])
    eps, sigma = torch.randn(x0.shape), torch.tensor([0.3, 0.8])
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    assert float(flow_texture_loss(kind, pipe.vae, x_t, sigma, eps - x0, x0)) < 1e-6
    assert float(flow_texture_loss(kind, pipe.vae, x_t, sigma, torch.zeros_like(x0), x0)) > 0.01
    objective(sampler.next_batch()).backward()
    assert math.isfinite(objective.last["texture"]) and objective.last["texture"] > 0
    gates = {id(p) for p in fusion.parameters()}
    with_grad = [p for comp in ld.components(pipe).values() for p in comp.parameters() if p.grad is not None]
    assert with_grad and all(id(p) in gates for p in with_grad)
    assert any(float(p.grad.abs().sum()) > 0 for p in fusion.parameters())


def test_bf16_transformer_trains_fp32_gates(dit, tmp_path):
    """The GPU setting (bf16 frozen transformer and text encoders; Flux/SD3 overflow fp16), run on the CPU: the
    losses are finite, the gates learn (the validation loss moves) and are saved in fp32."""
    res = train(_cfg(dit, tmp_path / "a", 2, "--mixed_precision", "bf16", "--checkpointing_steps", "0"))
    assert all(math.isfinite(v) for v in res.losses) and res.validation[0] != res.validation[1]
    tensors = ld.io.files.read_safetensors(res.gates)[0]
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}


def test_mole_gates_train_on_the_transformer_and_load_with_their_loras(dit, tmp_path):
    from lora_diffusion.fusion import FUSION_ATTR
    from lora_diffusion.generate import generate

    res = train(_cfg(dit, tmp_path / "a", 2, "--method", "mole", "--checkpointing_steps", "0"))
    assert res.gates.name == "mole.safetensors" and all(math.isfinite(v) for v in res.losses)
    base = np.asarray(generate(_pipe(dit), [PROMPT], 2, 7.0, 0, 1, 32, 32)[0]).astype(int)
    pipe = _pipe(dit)
    ld.load_adapter(pipe, res.gates)
    assert pipe.transformer.__dict__[FUSION_ATTR].method.name == "mole"
    assert np.abs(np.asarray(generate(pipe, [PROMPT], 2, 7.0, 0, 1, 32, 32)[0]).astype(int) - base).max() > 0


def test_a_pipeline_the_trainers_do_not_support_is_refused_naming_what_is(dit, tmp_path):
    """FLUX.2 (the loader refuses it too) or any other pipeline: one error naming the model and the families; a
    local folder before the output folder is made."""
    from training.config import ConfigError
    from training.train_gates import check_gate_model
    from training.train_gates import main as train_gates

    folder = tmp_path / "flux2"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    d, out = dit["dir"], tmp_path / "gates-out"
    with pytest.raises(SystemExit, match=rf"error: --pretrained_model_name_or_path {folder}: a Flux2Pipeline; gate "
                                         r"training runs on SD1.x/2.x, SDXL, the demo model"):
        train_gates(["--model", str(folder), "--loras", f"{d / 'ring.safetensors'},{d / 'dotted.safetensors'}",
                     "--output_dir", str(out)])
    assert not out.exists()
    assert check_gate_model(str(dit["folder"])) == dit["family"]

    class Flux2Pipeline:  # the class name is what the family is told by
        pass

    with pytest.raises(ConfigError, match=r"--pretrained_model_name_or_path black-forest-labs/FLUX.2-dev: a "
                                          r"Flux2Pipeline.*gate training runs on SD1.x/2.x, SDXL, the demo model "
                                          r"\(DDPM objective\), Flux.1 and SD3/3.5 \(rectified flow\)"):
        check_gate_model("black-forest-labs/FLUX.2-dev", Flux2Pipeline())
