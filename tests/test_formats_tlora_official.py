"""Official T-LoRA checkpoints (github.com/ControlGenAI/T-LoRA): files laid out as its SDXL trainer saves them
(``save_attn_procs`` of its processors: ``<block>.attn1.processor.to_q_lora.{q_layer,p_layer,base_q,base_p}.weight``,
``lambda_layer``, ``base_lambda``; vanilla ``down/up.weight``), with the run's ``logs/hparams.yml`` two levels up,
load with their rank schedule; the reference is the official forward written from its documented formula,
ΔW_t = P diag(λ ⊙ m_t) Q − P0 diag(λ0 ⊙ m_t) Q0, m_t = first ⌊((T − t)/T)^α (r − r_min)⌋ + r_min ranks, scale 1.
Our T-LoRA exported in that layout and read back gives the same outputs at several timesteps."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lora_diffusion as ld
from lora_diffusion.io.files import read_safetensors, write_safetensors

from .conftest import perturb
from .test_formats_helpers import adaptable_weights, close, max_rel_diff, sdxl_pipeline, unet_call

pytestmark = pytest.mark.usefixtures("one_thread")

PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
TIMESTEPS = (0, 300, 999)


def r_t(t: int, r: int, r_min: int, alpha: float = 1.0) -> int:
    return int(((1000 - t) / 1000) ** alpha * (r - r_min)) + r_min


def official_run(tmp_path, pipe, r=8, r_min=3, alpha=1.5, ortho=True, seed=0):
    """An official run folder: checkpoint-100/pytorch_lora_weights.safetensors + logs/hparams.yml; returns the file and
    {module: (P, λ, Q, P0, λ0, Q0) or (up, down)}."""
    g = torch.Generator().manual_seed(seed)
    w = adaptable_weights(pipe.unet)
    blocks = sorted({m.rsplit(".", 1)[0] for m in w if m.endswith((".attn1.to_q", ".attn2.to_q"))})
    sd, factors = {}, {}
    for block in blocks:
        for old, new in PROJ.items():
            out, inp = w[f"{block}.{new}"].shape
            pre = f"{block}.processor.{old}_lora."
            if ortho:
                q, p, lam = (torch.randn(r, inp, generator=g) * 0.2, torch.randn(out, r, generator=g) * 0.2,
                             torch.rand(1, r, generator=g))
                q0, p0, lam0 = (torch.randn(r, inp, generator=g) * 0.2, torch.randn(out, r, generator=g) * 0.2,
                                torch.rand(1, r, generator=g))
                sd |= {pre + "q_layer.weight": q, pre + "p_layer.weight": p, pre + "lambda_layer": lam,
                       pre + "base_q.weight": q0, pre + "base_p.weight": p0, pre + "base_lambda": lam0}
                factors[f"{block}.{new}"] = (p, lam[0], q, p0, lam0[0], q0)
            else:
                down, up = torch.randn(r, inp, generator=g) * 0.2, torch.randn(out, r, generator=g) * 0.2
                sd |= {pre + "down.weight": down, pre + "up.weight": up}
                factors[f"{block}.{new}"] = (up, down)
    run = tmp_path / "00000-ab12-dog_tortho_lora8"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "hparams.yml").write_text(
        f"trainer_class: sdxl_tlora\ntrainer_type: {'ortho_lora' if ortho else 'lora'}\nlora_rank: {r}\n"
        f"min_rank: {r_min}\nalpha_rank_scale: {alpha}\nsig_type: last\n")
    path = run / "checkpoint-100" / "pytorch_lora_weights.safetensors"
    write_safetensors(path, sd, {})
    return path, sd, factors


def reference_weights(pipe, factors, t, r, r_min, alpha):
    w = adaptable_weights(pipe.unet)
    m = torch.zeros(r)
    m[: r_t(t, r, r_min, alpha)] = 1
    for mod, f in factors.items():
        if len(f) == 6:
            p, lam, q, p0, lam0, q0 = f
            w[mod] = w[mod] + p @ torch.diag(lam * m) @ q - p0 @ torch.diag(lam0 * m) @ q0
        else:
            up, down = f
            w[mod] = w[mod] + up @ torch.diag(m) @ down
    return w


@pytest.mark.parametrize("ortho", [True, False])
def test_official_checkpoint_loads_with_its_schedule(tmp_path, ortho):
    pipe = sdxl_pipeline()
    path, sd, factors = official_run(tmp_path, pipe, ortho=ortho)
    from lora_diffusion.io.library import describe

    info = describe(path)
    assert info["format"] == ("tlora-official" if ortho else "old-diffusers") and info["rank"] == 8
    ours = copy.deepcopy(pipe)
    ld.load_adapter(ours, path, name="t")
    spec = ld.get_spec(ours.unet, "t")
    assert spec.variant == "tlora" and spec.options["min_rank"] == 3 and spec.options["rank_exponent"] == 1.5
    assert spec.options["ortho"] is ortho
    assert len(ld.adapter_state_dict(ours.unet, "t")) == len(sd)  # every key consumed (frozen copies included)
    for t in TIMESTEPS:
        with ld.timestep(ours, t):
            merged = copy.deepcopy(ours)
            ld.merge_adapters(merged)
        assert max_rel_diff(adaptable_weights(merged.unet), reference_weights(pipe, factors, t, 8, 3, 1.5)) < 1e-5, t


def test_official_checkpoint_without_hparams_says_what_it_assumes(tmp_path, caplog):
    pipe = sdxl_pipeline()
    path, sd, _ = official_run(tmp_path, pipe)
    alone = tmp_path / "alone.safetensors"
    write_safetensors(alone, sd, {})
    ld.load_adapter(pipe, alone, name="t")
    assert ld.get_spec(pipe.unet, "t").options["min_rank"] == 4 and "no T-LoRA schedule" in caplog.text


@pytest.mark.parametrize("ortho", [True, False])
def test_our_tlora_official_export_round_trip(tmp_path, ortho):
    pipe = sdxl_pipeline()
    spec = ld.AdapterSpec("tlora", rank=6, alpha=3, targets="unet-attn", seed=2,
                          options={"min_rank": 2, "rank_exponent": 0.7, "ortho": ortho})
    ld.add_adapter(pipe.unet, spec, "t")
    perturb(pipe.unet, "t", std=0.05)
    weights = ld.save_adapter(pipe, tmp_path / "run", "t", format="tlora-official")
    assert weights == tmp_path / "run" / "checkpoint-0" / "pytorch_lora_weights.safetensors"
    hp = json.loads((tmp_path / "run" / "logs" / "hparams.yml").read_text())  # JSON is YAML
    assert (hp["lora_rank"], hp["min_rank"], hp["alpha_rank_scale"]) == (6, 2, 0.7)
    assert hp["output_dir"] == str((tmp_path / "run").resolve()) and hp["trainer_type"] == ("ortho_lora" if ortho else "lora")
    keys = set(read_safetensors(weights)[0])
    assert any(k.endswith("attn2.processor.to_out_lora." + ("base_p.weight" if ortho else "up.weight")) for k in keys)
    again = sdxl_pipeline()
    ld.load_adapter(again, weights, name="t")
    for t in TIMESTEPS:
        with ld.timestep(pipe, t), ld.timestep(again, t):
            assert close(unet_call(again.unet, sdxl=True), unet_call(pipe.unet, sdxl=True), 1e-5), t
    ld.save_adapter(again, tmp_path / "again.safetensors", "t")  # canonical keeps the stored frozen copies
    third = sdxl_pipeline()
    ld.load_adapter(third, tmp_path / "again.safetensors", name="t")
    with ld.timestep(pipe, 500), ld.timestep(third, 500):
        assert close(unet_call(third.unet, sdxl=True), unet_call(pipe.unet, sdxl=True), 1e-5)


def test_official_export_refuses_other_targets(tmp_path):
    pipe = sdxl_pipeline()
    ld.add_adapter(pipe.unet, ld.AdapterSpec("tlora", rank=2, targets=["to_q", "ff.net.2"]), "t")
    with pytest.raises(ld.AdapterFileError, match=r"module '.*ff.net.2': the official T-LoRA format adapts only "
                                                  r"attention to_q/to_k/to_v/to_out.0"):
        ld.save_adapter(pipe, tmp_path / "x.safetensors", "t", format="tlora-official")
    assert not (tmp_path / "x.safetensors").exists()


def test_lycoris_tlora_conv_module_is_named(tmp_path):
    """LyCORIS tlora files load (tests/test_formats_lycoris.py) except on convs, whose LyCORIS form drops the kernel."""
    pipe = sdxl_pipeline()
    flat = "lora_unet_input_blocks_1_0_in_layers_2"  # SGM name of down_blocks.0.resnets.0.conv1 (3x3)
    sd = {f"{flat}.q_layer.weight": torch.zeros(4, 16, 1, 1), f"{flat}.p_layer.weight": torch.zeros(16, 4, 1, 1),
          f"{flat}.lambda_layer": torch.ones(1, 4), f"{flat}.alpha": torch.tensor(4.0)}
    write_safetensors(tmp_path / "ly_tlora.safetensors", sd, {"ss_network_module": "lycoris.kohya"})
    with pytest.raises(ld.AdapterFileError, match=rf"ly_tlora.safetensors: key '{flat}.q_layer.weight': a LyCORIS T-LoRA "
                                                  r"module on a conv2d \(16, 16, 3, 3\); expected a Linear layer"):
        ld.load_adapter(pipe, tmp_path / "ly_tlora.safetensors")
    assert ld.list_adapters(pipe) == []
