"""The Sensitivity-LoRA command on a tiny causal LM: ranks, table, plot and spec file; train_llm trains the spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lora_diffusion as ld
from lora_diffusion import llm
from training import rank_sensitivity, train_llm

from .conftest import FIXTURES
from .test_llm_train import make_tiny_folder

TRAIN = FIXTURES / "llm_shout_train.jsonl"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("method", ["fisher", "hutchinson"])
def test_command_writes_spec_and_plot_and_train_llm_uses_it(folder, tmp_path, capsys, method):
    spec_path = tmp_path / "ranks.json"
    out = rank_sensitivity.run(["llm", "--rank_budget", "30", "--output", str(spec_path), "--method", method,
                                "--batches", "3", "--probes", "2", "--keep_alpha_ratio", "2", "--model", str(folder),
                                "--train_file", str(TRAIN), "--targets", "q_proj,v_proj,down_proj", "--cpu"])
    data = json.loads(spec_path.read_text())
    assert sum(data["rank_pattern"].values()) == 30 and len(data["targets"]) == 6  # 3 linears x 2 layers
    assert data["alpha_pattern"] == {k: 2.0 * r for k, r in data["rank_pattern"].items()}
    assert out["plot"].stat().st_size > 10_000 and "total" in capsys.readouterr().out
    train_llm.main(["--model", str(folder), "--train_file", str(TRAIN), "--rank_spec", str(spec_path),
                    "--max_train_steps", "2", "--output_dir", str(tmp_path / "run"), "--report_to", "none",
                    "--no-progress", "--cpu", "--checkpointing_steps", "0"])
    model = llm.load_causal_lm(str(folder))[0]
    llm.load_llm_adapter(model, tmp_path / "run" / "adapter.safetensors", name="s")
    spec = ld.get_spec(model, "s")
    for name, r in data["rank_pattern"].items():
        ad = model.get_submodule(name).adapters["s"]
        assert ad.lora_A.shape[0] == r and ad.scaling == pytest.approx(2.0)
    assert spec.rank_pattern == data["rank_pattern"]
    peft_cfg = json.loads((tmp_path / "run" / "peft" / "adapter_config.json").read_text())
    assert sorted(peft_cfg["rank_pattern"].values()) == sorted(r for r in data["rank_pattern"].values()
                                                             if r != peft_cfg["r"])


def test_budget_below_module_count_is_one_clear_error(folder, tmp_path):
    with pytest.raises(SystemExit, match=r"--rank_budget 5: expected an integer in \[6, \d+\] for 6 modules"):
        rank_sensitivity.main(["llm", "--rank_budget", "5", "--output", str(tmp_path / "r.json"), "--model", str(folder),
                               "--train_file", str(TRAIN), "--targets", "q_proj,v_proj,down_proj", "--cpu"])
    assert not (tmp_path / "r.json").exists()


def test_trainers_refuse_a_bad_rank_spec_before_loading(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "lora-diffusion-rank-spec", "targets": ["x"], "rank_pattern": {}}')
    with pytest.raises(Exception, match=r"--rank_spec: rank spec .*bad.json: rank_pattern has no rank for target"):
        train_llm.build_spec(train_llm.parse_args(train_llm.LLMConfig, ["--train_file", str(TRAIN), "--rank_spec",
                                                                        str(bad)])[0])
    from training.config import TLoRAConfig, parse_args, resolve_defaults
    from training.diffusion import adapter_spec

    cfg = resolve_defaults(parse_args(TLoRAConfig, ["--rank_spec", str(bad), "--variant", "lora"])[0],
                           ld.variant_names())
    with pytest.raises(Exception, match="--rank_spec: rank spec"):
        adapter_spec(cfg)


@pytest.mark.parametrize("method", ["fisher", "hutchinson"])
def test_command_on_the_demo_unet_and_train_tlora_builds_the_spec(tmp_path, method):
    """The trainer's denoising loss on the shipped example image; Hutchinson runs double backward through the UNet."""
    from training.config import TLoRAConfig, parse_args, resolve_defaults
    from training.diffusion import adapter_spec, load_base

    ring = Path(__file__).resolve().parents[1] / "assets" / "examples" / "ring"
    flags = ["--instance_data_dir", str(ring), "--class_name", "ring", "--output_dir", str(tmp_path / "o"), "--cpu"]
    spec_path = tmp_path / "unet.json"
    out = rank_sensitivity.run(["tlora", "--rank_budget", "150", "--output", str(spec_path), "--method", method,
                                "--batches", "1", "--probes", "1", "--no-plot", *flags])
    ranks = out["ranks"]
    assert sum(ranks.values()) == 150 and len(ranks) > 50 and min(ranks.values()) >= 1
    cfg = resolve_defaults(parse_args(TLoRAConfig, [*flags, "--rank_spec", str(spec_path)])[0], ld.variant_names())
    assert cfg.adapter.min_rank is None  # T-LoRA: r // 2 per module
    unet = load_base(cfg).unet
    ld.add_adapter(unet, adapter_spec(cfg))
    got = {n: a.cfg.rank for n, a in ((n, m.adapters["default"]) for n, m in unet.named_modules()
                                      if isinstance(m, ld.AdaptedLayer))}
    assert got == ranks


def test_match_rank_gives_a_uniform_loras_parameter_count_on_the_demo_unet(tmp_path):
    """--match_rank R: the ranks whose Σ r·(fan_in + out) is closest to a rank-R LoRA's on the same modules (the
    demo UNet's modules differ in shape, so that is not Σ r = R·N)."""
    from lora_diffusion.core.layerinfo import layer_info
    from training.config import TLoRAConfig, parse_args, resolve_defaults
    from training.diffusion import load_base

    ring = Path(__file__).resolve().parents[1] / "assets" / "examples" / "ring"
    flags = ["--instance_data_dir", str(ring), "--class_name", "ring", "--output_dir", str(tmp_path / "o"), "--cpu"]
    out = rank_sensitivity.run(["tlora", "--match_rank", "4", "--output", str(tmp_path / "m.json"), "--batches", "1",
                                "--no-plot", *flags])
    ranks = out["ranks"]
    unet = load_base(resolve_defaults(parse_args(TLoRAConfig, flags)[0], ld.variant_names())).unet
    modules = dict(unet.named_modules())
    per = {n: layer_info(modules[n], n).fan_in + layer_info(modules[n], n).out_features for n in ranks}
    got, uniform = sum(r * per[n] for n, r in ranks.items()), 4 * sum(per.values())
    assert abs(got - uniform) <= max(per.values()) and len(set(ranks.values())) > 1  # allocated, not uniform
    with pytest.raises(SystemExit):  # one of --rank_budget / --match_rank
        rank_sensitivity.main(["tlora", "--rank_budget", "100", "--match_rank", "4", "--output", "x.json", *flags])
