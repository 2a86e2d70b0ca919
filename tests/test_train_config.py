"""Trainer flags (official T-LoRA names and aliases), config files, precedence, per-variant defaults."""

from __future__ import annotations

import pytest
import yaml

import lora_diffusion as ld
from training.config import ConfigError, TLoRAConfig, parse_args, resolve_defaults
from training.train_tlora import main


def resolved(argv: list[str]) -> TLoRAConfig:
    cfg, _, _ = parse_args(TLoRAConfig, argv)
    return resolve_defaults(cfg, ld.variant_names())


def test_official_flags_and_aliases() -> None:
    cfg = resolved(["--train_data_dir", "dog", "--placeholder_token", "sks", "--class_name", "dog", "--lora_rank", "64",
                    "--min_rank", "32", "--alpha_rank_scale", "2", "--learning_rate", "1e-4", "--resolution", "1024",
                    "--num_train_epochs", "800", "--checkpointing_steps", "100", "--mixed_precision", "bf16",
                    "--seed", "3", "--validation_prompts", "a {0} lying in the bed#a {0} swimming",
                    "--trainer_type", "lora", "--sig_type", "principal", "--one_image", "02.jpg"])
    assert cfg.data.instance_data_dir == "dog" and cfg.optim.max_train_steps == 800
    assert (cfg.adapter.lora_rank, cfg.adapter.min_rank, cfg.adapter.alpha_rank_scale) == (64, 32, 2.0)
    assert cfg.model.mixed_precision == "bf16" and cfg.run.seed == 3 and cfg.data.one_image == "02.jpg"


def test_tlora_defaults_follow_the_paper() -> None:
    cfg = resolved(["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0"])
    assert (cfg.adapter.variant, cfg.adapter.lora_rank, cfg.adapter.min_rank) == ("tlora", 64, 32)
    assert (cfg.optim.learning_rate, cfg.optim.max_train_steps, cfg.optim.adam_weight_decay) == (1e-4, 800, 1e-4)
    assert cfg.adapter.targets == "unet-attn"


@pytest.mark.parametrize("variant", ld.variant_names())
def test_demo_model_defaults(variant: str, tmp_path) -> None:
    """On the embedded demo model (the default, or any folder pretrain_demo made) adapters go on the convolutions
    too, at TRAIN_DEFAULTS' learning-rate scale; linear-only variants keep the attention preset."""
    from lora_diffusion.demo.model import DEMO_FORMAT, TRAIN_DEFAULTS
    from training.config import VARIANT_DEFAULTS

    copy = tmp_path / "my-demo"
    copy.mkdir()
    (copy / "demo_model.json").write_text(f'{{"format": "{DEMO_FORMAT}"}}')
    convs = "conv2d" in ld.get_variant(variant).kinds
    base_lr = VARIANT_DEFAULTS.get(variant, {"learning_rate": 1e-4})["learning_rate"]
    for argv in ([], ["--pretrained_model_name_or_path", str(copy)]):
        cfg = resolved(["--variant", variant, *argv])
        assert cfg.adapter.targets == ("unet-full" if convs else "unet-attn")
        assert cfg.optim.learning_rate == pytest.approx(base_lr * TRAIN_DEFAULTS["lr_scale"])
    explicit = resolved(["--variant", variant, "--targets", "unet-attn-ff", "--learning_rate", "3e-5"])
    assert (explicit.adapter.targets, explicit.optim.learning_rate) == ("unet-attn-ff", 3e-5)
    other = tmp_path / "not-demo"
    other.mkdir()
    (other / "demo_model.json").write_text("{not json")  # damaged metadata: not taken for the demo model
    assert resolved(["--variant", variant, "--model", str(other)]).adapter.targets == "unet-attn"


@pytest.mark.parametrize("variant", ["lora", "dora", "loha", "lokr", "vera"])
def test_other_variants_get_their_defaults(variant: str) -> None:
    cfg = resolved(["--variant", variant])
    assert cfg.adapter.variant == variant and cfg.adapter.lora_rank >= 4 and cfg.optim.learning_rate > 0
    assert cfg.adapter.min_rank is None


def test_yaml_and_toml_files_flat_or_by_section_and_cli_wins(tmp_path) -> None:
    y = tmp_path / "a.yaml"
    y.write_text("adapter:\n  variant: dora\n  lora_rank: 8\ntrain_data_dir: photos\nlearning_rate: 2.0e-4\n")
    cfg = resolved(["--config", str(y), "--lora_rank", "4"])
    assert (cfg.adapter.variant, cfg.adapter.lora_rank, cfg.optim.learning_rate) == ("dora", 4, 2e-4)
    assert cfg.data.instance_data_dir == "photos"
    t = tmp_path / "a.toml"
    t.write_text('variant = "loha"\n[optim]\nmax_train_steps = 12\n')
    cfg = resolved(["--config", str(t)])
    assert (cfg.adapter.variant, cfg.optim.max_train_steps) == ("loha", 12)


def test_unknown_key_in_file(tmp_path) -> None:
    y = tmp_path / "a.yaml"
    y.write_text("lora_rnak: 8\n")
    with pytest.raises(ConfigError, match="unknown option 'lora_rnak'"):
        resolved(["--config", str(y)])


def test_print_config_round_trips(tmp_path, capsys) -> None:
    main(["--variant", "lora", "--lora_rank", "12", "--print-config"])
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert data["adapter"]["lora_rank"] == 12
    # no model named: the embedded demo model's defaults are what gets printed (and used)
    from lora_diffusion.demo.model import TRAIN_DEFAULTS

    assert data["optim"]["learning_rate"] == pytest.approx(1e-4 * TRAIN_DEFAULTS["lr_scale"])
    assert data["adapter"]["targets"] == "unet-full" and data["embedding"]["train_embedding"] is True
    f = tmp_path / "printed.yaml"
    f.write_text(text)
    again = resolved(["--config", str(f)])
    assert again.adapter.variant == "lora" and again.adapter.lora_rank == 12


@pytest.mark.parametrize("argv, msg", [
    (["--min_rank", "80"], "--min_rank: expected 1 <= min_rank <= lora_rank=64"),
    (["--resolution", "30"], "--resolution: expected a multiple of 8"),
    (["--learning_rate", "0"], "--learning_rate: expected > 0"),
    (["--max_train_steps", "0"], "--max_train_steps: expected an integer >= 1"),
])
def test_bad_values(argv: list[str], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        resolved(argv)


def test_recolor_is_a_demo_model_default_only(tmp_path) -> None:
    """--recolor_p: 0.5 on the embedded demo model (TRAIN_DEFAULTS), 0 on any other model, a flag wins."""
    from lora_diffusion.demo.model import TRAIN_DEFAULTS

    other = tmp_path / "not-demo"
    other.mkdir()
    assert resolved([]).data.recolor_p == TRAIN_DEFAULTS["recolor_p"] == 0.5
    assert resolved(["--model", str(other)]).data.recolor_p == 0.0
    assert resolved(["--recolor_p", "0"]).data.recolor_p == 0.0


@pytest.mark.parametrize("where", ["training.config:TLoRAConfig", "training.train_gates:GateConfig",
                                   "training.train_llm:LLMConfig", "training.federated_dylora:FedConfig"])
def test_every_config_cli_prints_its_help(where):
    """argparse %-formats help texts: a literal % in a field's help (e.g. '52% -> 66%') must print, not crash."""
    import importlib

    from training.config import build_parser

    mod, _, name = where.partition(":")
    text = build_parser(getattr(importlib.import_module(mod), name)).format_help()
    assert "--seed" in text and "%%" not in text
    if name == "TLoRAConfig":
        assert "10% of the run's steps" in text
    if name == "GateConfig":
        assert "52% -> 66-69%" in " ".join(text.split())


def test_gate_trainer_help_shows_defaults_and_example() -> None:
    """train_gates' defaults do not depend on the model, so its --help shows them (and its example command, lines
    kept); the T-LoRA trainer's depend on the variant and demo model, so it does not claim any."""
    from training.config import build_parser
    from training.train_gates import GateConfig

    text = " ".join(build_parser(GateConfig, "    python -m training.train_gates --loras a,b", True).format_help().split())
    assert "optimizer steps (default: 300)" in text and "(default: gated)" in text
    assert "base model (None: the embedded demo model) (default" not in text  # a None default is described, not shown
    assert "\n    python -m training.train_gates --loras a,b\n" in build_parser(GateConfig, "    python -m training."
                                                                               "train_gates --loras a,b").format_help()
    assert "(default:" not in build_parser(TLoRAConfig).format_help()
