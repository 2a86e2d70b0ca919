"""Trainer configuration: dataclasses, CLI flags generated from them, YAML/TOML config files.

Precedence: dataclass defaults < per-variant (and demo-model) defaults < config file < command-line flags.
Every leaf field is a flag of the same name (``--lora_rank``); ``aliases`` in a field's metadata
add the official T-LoRA / diffusers spellings (``--train_data_dir``, ``--num_train_epochs``).
A config file may be flat (``lora_rank: 8``) or grouped by section (``adapter: {lora_rank: 8}``).

The generic machinery (``build_parser``, ``load_config_file``, ``merge``, ``to_dict``) serves any
trainer made of section dataclasses; the T-LoRA sections are below it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_diffusion.demo.model import resolve_demo_name, train_defaults
from lora_diffusion.demo.world import PLACEHOLDERS as DEMO_PLACEHOLDERS

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad flag, config file or value, reported before anything is loaded."""


# --- generic machinery ---
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int; ``dict[str, Any]`` -> dict."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return typing.get_origin(tp) or tp


def sections(cfg_cls: type) -> dict[str, type]:
    """Section name -> section dataclass of a config made of section dataclasses."""
    return {f.name: _hints(cfg_cls)[f.name] for f in dataclasses.fields(cfg_cls)}


def leaf_index(cfg_cls: type) -> dict[str, tuple[str, str]]:
    """Every accepted key (field names and aliases) -> (section, field)."""
    out: dict[str, tuple[str, str]] = {}
    for sec, scls in sections(cfg_cls).items():
        for f in dataclasses.fields(scls):
            for key in [f.name, *f.metadata.get("aliases", [])]:
                out[key.lstrip("-").replace("-", "_")] = (sec, f.name)
    return out


def _convert(value: Any, tp: Any, key: str) -> Any:
    base = _base_type(tp)
    if value is None:
        return None
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if base is dict:
            return json.loads(value) if isinstance(value, str) else dict(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return base(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"{key}: expected {getattr(base, '__name__', base)}, found {value!r}") from None
    return value


def build_parser(cfg_cls: type, description: str = "", show_defaults: bool = False) -> argparse.ArgumentParser:
    """One flag per leaf field (defaults suppressed, so only flags given on the command line are set).

    ``show_defaults``: each help ends with the field's default (for trainers whose defaults do not depend on the
    model or variant; argparse cannot show suppressed ones). The description keeps its lines (example commands)."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML or TOML file with any of the options below")
    p.add_argument("--print-config", "--print_config", action="store_true", dest="print_config",
                   help="print the resolved configuration (as YAML, usable with --config) and exit")
    for sec, scls in sections(cfg_cls).items():
        group = p.add_argument_group(sec)
        hints = _hints(scls)
        for f in dataclasses.fields(scls):
            flags = [f"--{f.name}", *f.metadata.get("aliases", [])]
            # argparse %-formats help strings (for %(default)s): a literal % in a field's text must not break --help
            text = f.metadata.get("help", "")
            if show_defaults and f.default not in (None, dataclasses.MISSING):
                text += f" (default: {f.default})"
            kw: dict[str, Any] = {"dest": f"{sec}.{f.name}", "help": text.replace("%", "%%")}
            if _base_type(hints[f.name]) is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["metavar"] = f.name.upper()
                if "choices" in f.metadata:
                    kw["choices"] = f.metadata["choices"]
            group.add_argument(*flags, **kw)
    return p


def load_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        raise ConfigError(f"--config {path}: expected a .yaml, .yml or .toml file")
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of options, found {type(data).__name__}")
    return data


def flatten_file(data: dict[str, Any], cfg_cls: type, source: str) -> dict[tuple[str, str], Any]:
    """File content (flat or by section) -> {(section, field): value}; unknown keys are errors."""
    index, secs, out = leaf_index(cfg_cls), sections(cfg_cls), {}
    items: list[tuple[str, Any]] = []
    for k, v in data.items():
        if k in secs and isinstance(v, dict):
            items.extend(v.items())
        else:
            items.append((k, v))
    for k, v in items:
        key = str(k).replace("-", "_")
        if key not in index:
            raise ConfigError(f"{source}: unknown option '{k}'; valid options: {sorted(index)}")
        out[index[key]] = v
    return out


def merge(cfg_cls: type, *layers: dict[tuple[str, str], Any]) -> Any:
    """Build ``cfg_cls`` from layers of {(section, field): value}, later layers winning."""
    values: dict[str, dict[str, Any]] = {s: {} for s in sections(cfg_cls)}
    for layer in layers:
        for (sec, name), v in layer.items():
            values[sec][name] = v
    built = {}
    for sec, scls in sections(cfg_cls).items():
        hints = _hints(scls)
        built[sec] = scls(**{k: _convert(v, hints[k], f"--{k}") for k, v in values[sec].items()})
    return cfg_cls(**built)


def parse_args(cfg_cls: type, argv: list[str] | None, description: str = "",
               show_defaults: bool = False) -> tuple[Any, bool, set[tuple[str, str]]]:
    """(config, print_config, explicitly set keys) from argv and an optional --config file."""
    ns = vars(build_parser(cfg_cls, description, show_defaults).parse_args(argv))
    file_layer = {}
    if ns.get("config") is not None:
        file_layer = flatten_file(load_config_file(ns["config"]), cfg_cls, str(ns["config"]))
    cli_layer = {tuple(k.split(".", 1)): v for k, v in ns.items() if "." in k}
    cfg = merge(cfg_cls, file_layer, cli_layer)
    return cfg, bool(ns.get("print_config")), set(file_layer) | set(cli_layer)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def opt(default: Any, help: str, *aliases: str, **meta: Any) -> Any:
    """A dataclass field with CLI help text and alias flags."""
    meta = {"help": help, "aliases": list(aliases), **meta}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# --- sections shared by trainers ---
@dataclass
class OptimArgs:
    learning_rate: float | None = opt(None, "AdamW learning rate (None: the variant's default, 1e-4 for T-LoRA)", "--lr")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_weight_decay: float = opt(1e-4, "AdamW weight decay (official T-LoRA: 1e-4)")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = opt(False, "8-bit AdamW from bitsandbytes (CUDA only)")
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: learning-rate multiplier of the B (up) tensors")
    lr_scheduler: str = opt("constant", "learning-rate schedule (diffusers.optimization names)",
                            choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                     "polynomial"])
    lr_warmup_steps: int = opt(0, "warm-up steps of the learning-rate schedule")
    max_grad_norm: float | None = opt(None, "clip the gradient norm (None: no clipping, as the official code)")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    timestep_bias: float = opt(1.0, "timestep sampling t = T (1 - (1 - u)^(1/b)): 1 uniform (the official code), "
                               "< 1 more high-noise steps (where the layout, hence the shape, is decided)")
    max_train_steps: int | None = opt(None, "optimizer steps (None: the variant's default, 800 for T-LoRA)",
                                      "--num_train_epochs")


@dataclass
class CheckpointArgs:
    output_dir: str = opt("outputs/tlora", "where the adapter, checkpoints, samples and logs go")
    checkpointing_steps: int | None = opt(200, "write a checkpoint every N steps (None or 0: never)")
    checkpoints_total_limit: int | None = opt(3, "keep the last K checkpoints (None: all)")
    resume_from_checkpoint: str | None = opt(None, "'latest' or a checkpoint folder to continue from")


@dataclass
class RunArgs:
    seed: int = opt(0, "seeds adapter init, data order, noise and timesteps")
    report_to: str = opt("tensorboard", "'tensorboard' or 'none'", choices=["tensorboard", "none"])
    logging_dir: str = opt("logs", "TensorBoard folder, relative to output_dir")
    cpu: bool = opt(False, "train on the CPU even if a GPU is present")
    progress: bool = opt(True, "show a progress bar")
    progress_file: str | None = opt(None, "append one JSON line per step (step, total, loss, lr, it/s, time) for apps")


@dataclass
class LoRADropArgs:
    """LoRA-drop's importance stage (training/lora_drop.py); used with --variant loradrop only."""

    lora_drop_threshold: float = opt(0.9, "--variant loradrop: keep per-layer LoRAs on the fewest layers whose "
                                          "importance sums to this fraction, in (0, 1]; the others share one")
    lora_drop_steps: int | None = opt(None, "--variant loradrop: steps of the first-stage LoRA on the sample (None: "
                                            "10% of the run's steps, at least 1)")
    lora_drop_samples: int = opt(16, "--variant loradrop: size of the stratified sample (LLM: records by length "
                                     "quartile; diffusion: micro-batches, one timestep stratum each)")
    lora_drop_strict: bool = opt(False, "--variant loradrop: one shared adapter for all dropped layers, as the paper "
                                        "(refused when their shapes differ); default: one per shape")
    lora_drop_plan: str | None = opt(None, "--variant loradrop: the lora_drop.json of an earlier run: its layers, "
                                           "no importance stage")
    lora_drop_match_params: bool = opt(False, "--variant loradrop: keep more layers than the cut and raise the rank so "
                                              "the trainable count is closest to a uniform LoRA at --rank on every "
                                              "target (for comparisons at equal size)")


# --- T-LoRA / diffusion sections ---
@dataclass
class ModelArgs:
    pretrained_model_name_or_path: str | None = opt(
        None, "hub id, local diffusers folder (SD1.x/2.x, SDXL, Flux.1, SD3/3.5) or single .safetensors checkpoint "
        "(SD1.x/2.x, SDXL); None or demo-sd: the embedded demo model in assets/demo-sd/; demo-sd3: the embedded DiT "
        "(SD3-architecture) demo model in assets/demo-sd3/", "--model")
    model_family: str = opt("auto", "auto (from the folder's model_index.json) | sd | sdxl | flux | sd3",
                            choices=["auto", "sd", "sdxl", "flux", "sd3"])
    drop_t5: bool = opt(False, "SD3: do not load the T5 text encoder (the pipeline feeds zeros in its place, as "
                        "StableDiffusion3Pipeline(text_encoder_3=None) does); much less memory")
    max_sequence_length: int | None = opt(None, "Flux/SD3: T5 tokens per prompt (None: the pipeline's default, "
                                          "Flux 512, SD3 256)")
    revision: str | None = opt(None, "hub revision")
    pretrained_vae_model_name_or_path: str | None = opt(None, "another VAE (e.g. madebyollin/sdxl-vae-fp16-fix)")
    single_file_config: str | None = opt(None, "diffusers folder or hub id holding the configs of a single-file model")
    mixed_precision: str = opt("no", "no | fp16 | bf16 (adapter weights stay fp32)", choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    attention: str = opt("auto", "auto (xformers if installed on CUDA, else SDPA) | sdpa | xformers",
                         choices=["auto", "sdpa", "xformers"])
    allow_tf32: bool = opt(True, "TF32 matmuls on Ampere+ GPUs")


@dataclass
class FlowArgs:
    """Flux.1 / SD3 (rectified flow): how σ is drawn, and Flux's guidance input (training/objectives.py)."""

    weighting_scheme: str | None = opt(None, "σ sampling: uniform | logit_normal (SD3 paper) | mode (None: "
                                       "logit_normal for SD3, uniform for Flux as the official T-LoRA Flux trainer)",
                                       choices=["uniform", "logit_normal", "mode"])
    logit_mean: float = opt(0.0, "logit_normal: mean of the normal behind σ = sigmoid(n)")
    logit_std: float = opt(1.0, "logit_normal: std of the normal behind σ = sigmoid(n)")
    mode_scale: float = opt(1.29, "mode: the scale of the mode sampling (SD3 paper)")
    flow_shift: float | None = opt(None, "σ' = sσ/(1 + (s-1)σ) after sampling (None: the shift the stock pipeline "
                                   "samples with at this resolution: SD3 the scheduler's 3.0, Flux exp(μ(image "
                                   "tokens)); 1: no shift)")
    train_guidance_scale: float = opt(1.0, "Flux-dev guidance embedding input during training (official T-LoRA "
                                      "Flux: 1; diffusers' DreamBooth script: 3.5)")


@dataclass
class AdapterArgs:
    variant: str = opt("tlora", "adapter variant (lora_diffusion.variant_names())")
    lora_rank: int | None = opt(None, "rank r (None: the variant's default; T-LoRA 64)", "--rank")
    lora_alpha: float | None = opt(None, "alpha (None: alpha = rank, scale 1, as the official code)")
    min_rank: int | None = opt(None, "T-LoRA r_min (None: 32 at rank 64, i.e. rank // 2)")
    alpha_rank_scale: float = opt(1.0, "T-LoRA schedule exponent of ((T - t)/T)")
    sig_type: str = opt("last", "T-LoRA Ortho-LoRA init components", choices=["last", "principal", "middle"])
    trainer_type: str = opt("ortho_lora", "T-LoRA: ortho_lora (full T-LoRA) | lora (vanilla T-LoRA)",
                            choices=["ortho_lora", "lora"])
    targets: str | None = opt(None, "target preset or comma-separated module patterns (None: unet-attn, Flux/SD3 "
                              "dit-attn; on the embedded demo model unet-full, or unet-attn for linear-only variants "
                              "such as VeRA; on the DiT demo model demo-sd3 dit-attn-mlp)")
    lora_dropout: float = opt(0.0, "dropout on the adapter input")
    adapter_options: dict = opt({}, "extra variant options as JSON, e.g. '{\"decompose_factor\": 4}'")
    rank_spec: str | None = opt(None, "per-module ranks from a rank-spec JSON file (python -m training.rank_sensitivity: "
                                "Sensitivity-LoRA); sets the targets, ranks and alphas (--targets, --lora_rank unused)")
    init_adapter: str | None = opt(None, "start from this adapter file instead of a fresh init (e.g. one made by "
                                   "'python -m lora_diffusion.convert squeeze'): its variant, ranks and weights are "
                                   "used (--variant/--rank are taken from the file); its bundled placeholder embeddings "
                                   "and text-encoder part are continued too (docs/train_tlora.md)")


@dataclass
class DataArgs:
    instance_data_dir: str | None = opt(None, "folder with the subject's image(s)", "--train_data_dir")
    one_image: str | None = opt(None, "train on this one file of the folder (name or suffix, e.g. 02.jpg)")
    placeholder_token: str | None = opt(None, "the token that names the subject (None: 'sks'; with "
                                        "--train_embedding a new token '<sks>')")
    class_name: str = opt("", "the subject's class, e.g. dog")
    prompt_template: str = opt("a photo of {0}", "'#'-separated templates; {0} = '<token> <class>'")
    resolution: int | None = opt(None, "training resolution (None: 1024 for SDXL, the model's size otherwise)")
    center_crop: bool = opt(True, "center crop (else random crop: augmentation, disables latent caching)")
    random_flip: bool = opt(False, "random horizontal flip")
    hue_jitter: float | None = opt(None, "augmentation: rotate the training image's hue by a random angle in [-h, h] degrees "
                            "each step (for subjects whose color is not what matters, with captions that do not "
                            "name colors); disables latent caching. None: 0, on the embedded demo model 180")
    jitter_prompt_template: str | None = opt(None, "'#'-separated templates for hue-jittered views, e.g. the caption "
                                             "without its color word (which the jitter makes wrong); None: "
                                             "--prompt_template")
    jitter_color_words: bool = opt(False, "hue-jittered views: each color word of the caption is renamed to the color "
                                   "the jitter turned it into (the nearest basic color in hue: red, orange, yellow, "
                                   "green, blue, purple; white, black and gray stay), so a caption that names colors "
                                   "stays true under --hue_jitter")
    recolor_p: float | None = opt(None, "augmentation for flat two-color subjects (the demo world): with this "
                                  "probability a view is repainted in other colors (a random color with hue for the "
                                  "subject, another color for the background; not hue-jittered) and its caption's two "
                                  "color words say which ('a blue sks on a white background' -> 'a green sks on a gray "
                                  "background'); captions without both colors: no-op. None: 0, on the embedded demo "
                                  "model 0.5")
    recolor_exclude: str | None = opt(None, "'#'-separated 'color/background' pairs that --recolor_p never paints "
                                      "(e.g. 'green/gray#red/blue': combinations held out, to test that the subject "
                                      "composes with color pairs it was not shown in)")
    invert_p: float = opt(0.0, "augmentation: invert the training image's colors (x -> 255 - x) with this probability "
                          "each step, so a texture's pattern is seen both darker and lighter than its fill (for a "
                          "texture concept in the demo world: a pattern is lighter on dark fills, darker on light "
                          "ones, and inversion maps one to the other); disables latent caching")
    train_batch_size: int = opt(1, "images per micro-batch per process")
    with_prior_preservation: bool = opt(False, "add class images with the class prompt to the loss")
    class_data_dir: str | None = opt(None, "folder of class (prior-preservation) images")
    class_prompt: str | None = opt(None, "prompt of the class images (None: 'a photo of <class>'); with "
                                   "--num_class_images, '#'-separated prompts are cycled through")
    num_class_images: int = opt(0, "prior preservation: draw class images with the base model (before training) "
                                "until --class_data_dir holds this many; each gets its prompt as a .txt caption")
    prior_loss_weight: float = opt(1.0, "weight of the prior-preservation loss")
    cache_latents: bool = opt(True, "encode each image once (per flip) instead of every step")
    cache_text_embeddings: bool = opt(True, "encode each prompt once")


@dataclass
class EmbeddingArgs:
    """Textual inversion / pivotal tuning: new placeholder-token vectors, alone or with the adapter."""

    train_embedding: bool | None = opt(None, "train the placeholder's input embedding (pivotal tuning; with --variant "
                                       "none: textual inversion alone). None: on for the embedded demo model, off "
                                       "otherwise", "--pivotal_tuning", "--train_text_embedding")
    num_vectors: int = opt(1, "vectors (tokens) of the placeholder: <tok>, <tok>_1, ...", "--num_new_tokens_per_abstraction")
    initializer_token: str | None = opt(None, "init the vectors from this one-token word (None: --class_name, else "
                                        "the vocabulary mean)")
    embedding_lr: float | None = opt(None, "learning rate of the vectors (None: 5e-3, as textual inversion at batch 1)")
    embedding_steps: int | None = opt(None, "stop training the vectors after N steps (None: train them throughout)")
    allow_existing_token: bool = opt(False, "train the row of a placeholder that is already a vocabulary word")
    text_encoder_targets: str | None = opt(None, "also put a LoRA (rank --lora_rank) on the text encoder(s): a "
                                           "preset such as clip-text, or module patterns (None: no text adapter)")


@dataclass
class ValidationArgs:
    validation_prompts: str | None = opt(None, "'#'-separated prompts; {0} = '<token> <class>'")
    validation_steps: int | None = opt(None, "sample every N steps (None: at each checkpoint and at the end)")
    num_val_imgs_per_prompt: int = opt(1, "images per validation prompt")
    num_inference_steps: int = opt(25, "denoising steps of validation images")
    guidance_scale: float = opt(5.0, "classifier-free guidance of validation images")
    validation_seed: int = opt(42, "seed of validation images")


@dataclass
class TLoRAConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    data: DataArgs = field(default_factory=DataArgs)
    embedding: EmbeddingArgs = field(default_factory=EmbeddingArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    validation: ValidationArgs = field(default_factory=ValidationArgs)
    run: RunArgs = field(default_factory=RunArgs)
    lora_drop: LoRADropArgs = field(default_factory=LoRADropArgs)
    flow: FlowArgs = field(default_factory=FlowArgs)


# Per-variant defaults (rank, learning rate, steps): T-LoRA follows the paper (r 64, r_min 32, lr 1e-4,
# 800 steps), LoRA-family variants the common SD LoRA recipe; VeRA needs a high shared rank and lr.
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "tlora": {"lora_rank": 64, "learning_rate": 1e-4, "max_train_steps": 800},
    "lora": {"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 500},
    "rslora": {"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 500},
    "dora": {"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 500},
    "loha": {"lora_rank": 8, "learning_rate": 2e-4, "max_train_steps": 500},
    "lokr": {"lora_rank": 8, "learning_rate": 2e-4, "max_train_steps": 500},
    "vera": {"lora_rank": 256, "learning_rate": 1e-3, "max_train_steps": 500},
    "singlora": {"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 500},
    "lorafa": {"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 500},
    "dylora": {"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 500},
    "deltalora": {"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 500},
    "adalora": {"lora_rank": 12, "learning_rate": 1e-3, "max_train_steps": 500},  # PEFT: init_r 12, target_r 8
    "ardlora": {"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 500},  # r₀; ranks shrink from there
    "loradrop": {"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 500},
    "none": {"lora_rank": 1, "learning_rate": 5e-3, "max_train_steps": 500},  # textual inversion alone
}
NO_ADAPTER = "none"
EMBEDDING_LR = 5e-3
FALLBACK_DEFAULTS: dict[str, Any] = {"lora_rank": 16, "learning_rate": 1e-4, "max_train_steps": 500}


def step_option_defaults(variant: str, options: dict[str, Any], max_steps: int) -> dict[str, Any]:
    """Variant options that depend on the run's length, filled where the user left them: SingLoRA's ramp
    (``ramp_steps``) reaches u = 1 after 10% of the steps, so most of training and all of inference run at
    the full update (the library's own default, 1000 steps, would never finish a 500-step run). A longer ramp does
    not help short runs: training must end at u = 1, what inference uses, and the fewer steps A gets at full
    strength, the worse (measured on a 15-step LLM run: docs/benchmarks.md, benchmarks/singlora_ramp.py);
    Delta-LoRA's base weight starts moving (``start_step`` K) after the same 10% warm-up of A and B."""
    out = dict(options)
    if variant == "singlora" and "ramp_steps" not in out:
        out["ramp_steps"] = max(1, max_steps // 10)
    if variant == "deltalora" and "start_step" not in out:
        out["start_step"] = max_steps // 10
    if variant == "adalora" and "total_step" not in out:  # its budget schedule ends with the run
        out["total_step"] = max_steps
    return out


def with_rank_spec(spec: Any, path: str | None) -> Any:
    """--rank_spec: the file's targets, per-module ranks and alphas replace the AdapterSpec's (bad file: ConfigError)."""
    if not path:
        return spec
    import lora_diffusion as ld
    from lora_diffusion.ranks import apply_rank_spec, load_rank_spec

    try:
        return apply_rank_spec(spec, load_rank_spec(path))
    except ld.AdapterError as e:
        raise ConfigError(f"--rank_spec: {e}") from None


# Flux/SD3 default targets: the attention projections of every joint / single-stream block (q/k/v/out and the context
# projections add_q/k/v, to_add_out): the official T-LoRA Flux layout (flux/model/lora.py) plus to_add_out, as
# diffusers' DreamBooth-LoRA Flux script (lora_diffusion/inject/presets.py)
DIT_TARGETS = "dit-attn"


def default_targets(variant: str, demo: dict[str, Any] | None, family: str = "sd") -> str:
    """``unet-attn``, on Flux/SD3 the attention projections (``DIT_TARGETS``); on a demo model its defaults
    (``demo``): the UNet one (which draws shapes with convolutions) ``unet-full`` where the variant adapts Conv2d
    layers, the DiT one the attention and MLP linears."""
    import lora_diffusion as ld

    if demo is not None:
        convs = "conv2d" in ld.get_variant(variant).kinds
        return demo["targets"] if convs else demo["linear_only_targets"]
    return DIT_TARGETS if family in ("flux", "sd3") else "unet-attn"


def resolve_defaults(cfg: TLoRAConfig, variant_names: list[str]) -> TLoRAConfig:
    """Check the variant and fill the fields left to the variant's defaults (in place)."""
    a, o = cfg.adapter, cfg.optim
    if a.init_adapter:
        from .init_adapter import default_placeholder

        _resolve_init_adapter(a)
        default_placeholder(cfg)  # the file's bundled token, when --placeholder_token is not given
    if a.variant not in variant_names and a.variant != NO_ADAPTER:
        raise ConfigError(f"--variant: unknown variant '{a.variant}'; registered variants: {variant_names} (or "
                          f"'{NO_ADAPTER}' with --train_embedding: textual inversion alone)")
    d = VARIANT_DEFAULTS.get(a.variant, FALLBACK_DEFAULTS)
    cfg.model.pretrained_model_name_or_path = resolve_demo_name(cfg.model.pretrained_model_name_or_path)
    demo = train_defaults(cfg.model.pretrained_model_name_or_path)  # None: not an embedded demo model
    a.lora_rank = d["lora_rank"] if a.lora_rank is None else a.lora_rank
    if o.learning_rate is None:
        o.learning_rate = d["learning_rate"] * (demo["lr_scale"] if demo else 1.0)
    resolve_family(cfg)
    if a.targets is None:
        a.targets = "" if a.variant == NO_ADAPTER else default_targets(a.variant, demo, cfg.model.model_family)
    _resolve_embedding(cfg, demo)
    if o.max_train_steps is None:
        o.max_train_steps = demo.get("max_train_steps", d["max_train_steps"]) if demo else d["max_train_steps"]
    a.adapter_options = step_option_defaults(a.variant, a.adapter_options, o.max_train_steps)
    if cfg.data.hue_jitter is None:
        cfg.data.hue_jitter = float(demo.get("hue_jitter", 0.0)) if demo else 0.0
    if cfg.data.recolor_p is None:
        cfg.data.recolor_p = float(demo.get("recolor_p", 0.0)) if demo else 0.0
    if a.variant == "tlora" and a.min_rank is None and not a.rank_spec:  # with --rank_spec: rank // 2 per module
        a.min_rank = max(1, a.lora_rank // 2)
    elif a.variant != "tlora" and a.min_rank is not None:
        log.warning("--min_rank applies to T-LoRA only; ignored for variant '%s'", a.variant)
    _check_ranges(cfg)
    check_lora_drop(cfg.lora_drop, a.variant, o.max_train_steps)
    return cfg


def resolve_family(cfg: TLoRAConfig) -> None:
    """--model_family auto: read from the model folder's (or cached hub repo's) model_index.json; σ-sampling
    defaults of the flow families. The loaded pipeline is checked against it (training/diffusion.py)."""
    m, f = cfg.model, cfg.flow
    if m.model_family == "auto":
        from lora_diffusion.families import detect_family

        src = m.pretrained_model_name_or_path
        m.model_family = detect_family(src) or guess_family(src)
        cfg.model.__dict__[GUESSED] = m.model_family  # checked, and its defaults redone, once the pipeline loads
    if m.drop_t5 and m.model_family != "sd3":
        raise ConfigError(f"--drop_t5: SD3 only (Flux needs its T5 encoder); the model is {m.model_family}")
    if f.weighting_scheme is None:
        f.weighting_scheme = "logit_normal" if m.model_family == "sd3" else "uniform"
    if f.flow_shift is not None and not f.flow_shift > 0:
        raise ConfigError(f"--flow_shift: expected > 0, found {f.flow_shift}")
    if f.logit_std <= 0:
        raise ConfigError(f"--logit_std: expected > 0, found {f.logit_std}")


GUESSED = "_family_auto"  # ModelArgs instance attribute: the family --model_family auto settled on before loading


def guess_family(source: str | None) -> str:
    """Without a readable model_index.json (an uncached hub id, a single file, the demo model): from the name."""
    s = str(source or "").lower()
    return "flux" if "flux" in s else "sd3" if ("stable-diffusion-3" in s or "sd3" in s) else "sd"


def settle_family(cfg: TLoRAConfig, found: str) -> bool:
    """After loading, with --model_family auto: a family told before loading that the pipeline contradicts (a guess
    from the name) is replaced, with the defaults that depend on it (targets, σ sampling) redone; True if changed."""
    m, a = cfg.model, cfg.adapter
    before = m.__dict__.get(GUESSED)
    if before is None or before == found or {before, found} <= {"sd", "sdxl"}:
        return False
    if a.targets == ("" if a.variant == NO_ADAPTER else default_targets(a.variant, None, before)):
        a.targets = "" if a.variant == NO_ADAPTER else default_targets(a.variant, None, found)
    if cfg.flow.weighting_scheme == ("logit_normal" if before == "sd3" else "uniform"):
        cfg.flow.weighting_scheme = None
    m.model_family = found
    resolve_family(cfg)
    log.info("--model_family auto: the model is %s (guessed %s from its name); targets %s", found, before, a.targets)
    return True


def _resolve_init_adapter(a: AdapterArgs) -> None:
    """--init_adapter: the file's variant and rank replace --variant/--rank (checked readable before any model loads)."""
    from lora_diffusion.core.errors import AdapterError
    from lora_diffusion.io.library import describe

    if a.rank_spec:
        raise ConfigError("--init_adapter and --rank_spec: the adapter file fixes the targets and ranks; expected one "
                          "of them")
    try:
        info = describe(a.init_adapter)
    except (AdapterError, OSError) as e:
        raise ConfigError(f"--init_adapter: {e}") from None
    variant, rank = info.get("variant"), info.get("rank")
    if info.get("format") == "unknown" or not variant:
        raise ConfigError(f"--init_adapter {a.init_adapter}: not an adapter file this library reads (format "
                          f"{info.get('format')!r}); expected a lora-diffusion, kohya, diffusers or PEFT adapter")
    if variant != a.variant or (a.lora_rank is not None and rank not in (None, a.lora_rank)):
        log.info("--init_adapter %s: variant %s, rank %s (from the file)", a.init_adapter, variant, rank)
    a.variant = str(variant)
    a.lora_rank = int(rank) if isinstance(rank, int) else a.lora_rank


def check_lora_drop(args: LoRADropArgs, variant: str, max_steps: int | None) -> None:
    """--lora_drop_* errors before anything is loaded; ``lora_drop_steps`` filled (10% of ``max_steps``) when known."""
    if variant != "loradrop":
        return
    from lora_diffusion.variants.loradrop import check_threshold

    try:
        check_threshold(args.lora_drop_threshold, "--lora_drop_threshold")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.lora_drop_steps is None and max_steps:
        args.lora_drop_steps = max(1, max_steps // 10)
    for name, v in (("lora_drop_samples", args.lora_drop_samples), ("lora_drop_steps", args.lora_drop_steps)):
        if v is not None and v < 1:
            raise ConfigError(f"--{name}: expected an integer >= 1 (the first-stage LoRA must train on a sample to "
                              f"give an importance), found {v}")
    if args.lora_drop_plan and not Path(args.lora_drop_plan).is_file():
        raise ConfigError(f"--lora_drop_plan: no such file: {args.lora_drop_plan}")


def _resolve_embedding(cfg: TLoRAConfig, demo: dict[str, Any] | None) -> None:
    e, d = cfg.embedding, cfg.data
    if e.train_embedding is None:
        e.train_embedding = bool(demo and demo.get("train_embedding", False))
    if demo and e.train_embedding and d.placeholder_token in (None, *DEMO_PLACEHOLDERS):
        e.allow_existing_token = True  # the demo vocabulary reserves rows for placeholders (sks, <v1>..<v4>)
    if cfg.adapter.variant == NO_ADAPTER and not e.train_embedding:
        raise ConfigError("--variant none trains nothing without --train_embedding (textual inversion)")
    if d.placeholder_token is None:
        d.placeholder_token = "<sks>" if e.train_embedding and not demo else "sks"
    if e.train_embedding:
        e.embedding_lr = EMBEDDING_LR if e.embedding_lr is None else e.embedding_lr
        if e.num_vectors < 1 or e.embedding_lr <= 0 or (e.embedding_steps is not None and e.embedding_steps < 0):
            raise ConfigError(f"--num_vectors >= 1, --embedding_lr > 0, --embedding_steps >= 0 expected; found "
                              f"{e.num_vectors}, {e.embedding_lr}, {e.embedding_steps}")


def _check_ranges(cfg: TLoRAConfig) -> None:
    checks = [("lora_rank", cfg.adapter.lora_rank, 1), ("max_train_steps", cfg.optim.max_train_steps, 1),
              ("train_batch_size", cfg.data.train_batch_size, 1),
              ("gradient_accumulation_steps", cfg.optim.gradient_accumulation_steps, 1),
              ("num_val_imgs_per_prompt", cfg.validation.num_val_imgs_per_prompt, 1)]
    for name, v, lo in checks:
        if v is None or v < lo:
            raise ConfigError(f"--{name}: expected an integer >= {lo}, found {v!r}")
    if cfg.adapter.variant == "tlora" and not 1 <= (cfg.adapter.min_rank or 0) <= cfg.adapter.lora_rank and not (
            cfg.adapter.rank_spec and cfg.adapter.min_rank is None):
        raise ConfigError(f"--min_rank: expected 1 <= min_rank <= lora_rank={cfg.adapter.lora_rank}, "
                          f"found {cfg.adapter.min_rank}")
    if not (cfg.optim.learning_rate or 0) > 0:
        raise ConfigError(f"--learning_rate: expected > 0, found {cfg.optim.learning_rate}")
    if cfg.data.resolution is not None and (cfg.data.resolution < 8 or cfg.data.resolution % 8):
        raise ConfigError(f"--resolution: expected a multiple of 8, found {cfg.data.resolution}")
    if not 0.0 <= cfg.data.recolor_p <= 1.0:
        raise ConfigError(f"--recolor_p: expected a probability in [0, 1], found {cfg.data.recolor_p}")
    from .data import DataError, parse_color_pairs

    try:
        parse_color_pairs(cfg.data.recolor_exclude)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if not 0.0 <= cfg.data.invert_p <= 1.0:
        raise ConfigError(f"--invert_p: expected a probability in [0, 1], found {cfg.data.invert_p}")
