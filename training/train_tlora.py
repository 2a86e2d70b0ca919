"""One-image personalization: train a T-LoRA (or any registered variant) on a diffusers SD/SDXL/Flux.1/SD3 model.

    python -m training.train_tlora --instance_data_dir photos/ --placeholder_token sks --class_name dog \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --output_dir out/dog
    accelerate launch -m training.train_tlora --config dog.yaml        # several processes: data parallel

Flags follow the official T-LoRA ``train.py`` (``--lora_rank 64 --min_rank 32 --alpha_rank_scale``,
``--validation_prompts "a {0} swimming#..."``); ``--variant lora|dora|loha|lokr|vera|...`` trains
another adapter with its own defaults; Flux.1 and SD3/3.5 folders train the transformer with the rectified-flow
objective (``--weighting_scheme``, ``--flow_shift``, ``--train_guidance_scale``, ``--drop_t5``; docs/dit.md);
``--config`` reads YAML/TOML; ``--print-config`` shows the result.
``--train_embedding`` (pivotal tuning; ``--variant none``: textual inversion alone) also trains the placeholder's
embedding (``--num_vectors``, ``--initializer_token``, ``--embedding_lr``, ``--embedding_steps``); the vectors are
saved in the adapter files and as A1111 / diffusers embedding files (docs/train_tlora.md).
Writes ``<variant>.safetensors`` (canonical, keeps the T-LoRA schedule), kohya/diffusers copies when the
library has those writers, ``checkpoints/checkpoint-<step>/``, ``samples/`` and TensorBoard ``logs/``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lora_diffusion as ld
from lora_diffusion.families import FAMILIES

from . import diffusion as dif
from .checkpoint import CheckpointError, CheckpointManager, GlobalRNG, TrainableParams
from .config import ConfigError, TLoRAConfig, parse_args, resolve_defaults, to_yaml
from .data import DataError, files_digest
from .init_adapter import load_init_adapter
from .loop import (
    EXIT_STOPPED,
    JsonlProgress,
    LoopConfig,
    NonFiniteLossError,
    Reporter,
    StopSignals,
    TrainingStopped,
    fit,
    make_accelerator,
)
from .objectives import DiffusionObjective, FlowMatchingObjective, FlowSampling, pipeline_shift

log = logging.getLogger("train_tlora")


class TrainingError(RuntimeError):
    """The run stopped (non-finite loss); the message names the last good checkpoint."""


@dataclass
class TrainResult:
    losses: list[float]  # one per optimizer step run by this call
    first_step: int
    last_step: int
    outputs: dict[str, Path] = field(default_factory=dict)
    checkpoints: list[Path] = field(default_factory=list)


@dataclass
class Run:
    """What one training run holds between its build and its end."""
    cfg: TLoRAConfig
    acc: Any
    out: Path
    pipe: Any
    res: int
    tokens: Any  # the placeholder embeddings under pivotal tuning, or None
    text_encoders: list[Any]
    unet: Any
    model: Any  # the prepared UNet
    sampler: Any
    cond: Any
    opt: Any
    sched: Any
    objective: DiffusionObjective
    ckpt: CheckpointManager
    shared: dict[str, Any]
    local: dict[str, Any]


def build(cfg: TLoRAConfig) -> Run:
    """Check everything and build the run: base model, placeholder tokens, adapters, data, optimizer, checkpoints.
    Errors on bad input come from here, before the first step."""
    from diffusers import DDPMScheduler

    resolve_defaults(cfg, ld.variant_names())
    images = dif.preflight(cfg)
    acc = make_accelerator(cfg.model.mixed_precision, cfg.run.cpu)
    torch.manual_seed(cfg.run.seed)
    pipe = dif.load_base(cfg)
    res = cfg.data.resolution or dif.default_resolution(pipe)
    if acc.is_main_process:
        dif.make_class_images(pipe, cfg, res, acc.device)  # before anything is added to the base model
    acc.wait_for_everyone()
    load_init_adapter(pipe, cfg)  # --init_adapter: the file's denoiser, text-encoder and embedding parts, checked
    tokens = dif.add_placeholder(pipe, cfg)  # pivotal tuning: the new token(s), before the prompts are checked
    text_encoders = dif.add_text_adapter(pipe, cfg)
    unet = dif.add_adapter(pipe, cfg, acc.device)
    sampler, cond = dif.build_data(cfg, pipe, images, res, acc.process_index, acc.device)
    if cfg.adapter.variant == "loradrop" and not cfg.adapter.init_adapter:  # importance stage on this data first
        dif.add_loradrop(pipe, cfg, cond, res, acc, bool(cfg.checkpoint.resume_from_checkpoint))
    opt, sched = dif.make_optimizer(unet, cfg, tokens, text_encoders)
    model, opt = acc.prepare(unet, opt)
    seed = cfg.run.seed * 1000 + acc.process_index + 1
    if FAMILIES[cfg.model.model_family].flow:
        objective: DiffusionObjective = flow_objective(cfg, pipe, model, unet, cond, seed, res)
    else:
        objective = DiffusionObjective(model, unet, DDPMScheduler.from_config(pipe.scheduler.config), cond, seed,
                                       cfg.data.prior_loss_weight, res, cfg.optim.timestep_bias)
    out = Path(cfg.checkpoint.output_dir)
    ckpt = CheckpointManager(out / "checkpoints", dif.identity(cfg, files_digest(images), res),
                             cfg.checkpoint.checkpoints_total_limit, acc.process_index, acc.num_processes,
                             acc.wait_for_everyone)
    shared = {"params": TrainableParams(unet), "optimizer": opt, "lr_scheduler": sched,
              **({"embeddings": tokens} if tokens is not None else {}),
              **{f"text_params_{i}": TrainableParams(te) for i, te in enumerate(text_encoders)},
              **({"grad_scaler": acc.scaler} if acc.scaler is not None else {})}
    local = {"rng": GlobalRNG(), "data": sampler, "objective": objective}
    return Run(cfg, acc, out, pipe, res, tokens, text_encoders, unet, model, sampler, cond, opt, sched, objective,
               ckpt, shared, local)


def flow_objective(cfg: TLoRAConfig, pipe: Any, model: Any, transformer: Any, cond: Any, seed: int,
                   res: int) -> FlowMatchingObjective:
    """Flux/SD3: the rectified-flow loss with σ drawn as --weighting_scheme says, shifted by --flow_shift (None: the
    stock pipeline's shift at this resolution)."""
    f = cfg.flow
    flux = cfg.model.model_family == "flux"  # Flux's image tokens: 2x2 patches of the latent
    tokens = (res // (int(getattr(pipe, "vae_scale_factor", 8)) * 2)) ** 2 if flux else 0
    shift = f.flow_shift if f.flow_shift is not None else pipeline_shift(pipe.scheduler.config, tokens)
    sampling = FlowSampling(f.weighting_scheme, f.logit_mean, f.logit_std, f.mode_scale, shift)
    log.info("rectified flow: σ %s, shift %.3g%s", f.weighting_scheme, shift,
             f", guidance input {f.train_guidance_scale}" if getattr(transformer.config, "guidance_embeds", False) else "")
    return FlowMatchingObjective(model, transformer, cond, seed, sampling, cfg.data.prior_loss_weight, res,
                                 f.train_guidance_scale, int(pipe.scheduler.config.num_train_timesteps))


def train(cfg: TLoRAConfig) -> TrainResult:
    """Check everything, build, (resume,) train, save. Errors on bad input come before the first step."""
    r = build(cfg)
    acc, tokens = r.acc, r.tokens
    start = r.ckpt.resume(cfg.checkpoint.resume_from_checkpoint, r.shared, r.local)
    stop_embedding = cfg.embedding.embedding_steps

    def freeze_embedding(step: int) -> None:
        if tokens is not None and stop_embedding is not None and step >= stop_embedding and tokens.trainable:
            tokens.set_trainable(False)
            r.cond.live_text = bool(r.text_encoders)
            log.info("step %d: placeholder vectors frozen (--embedding_steps %d)", step, stop_embedding)

    freeze_embedding(start)
    target = dif.save_target(r.pipe, cfg)
    reporter = Reporter(r.out / cfg.run.logging_dir, cfg.run.report_to == "tensorboard" and acc.is_main_process)
    sampled: set[int] = set()

    def save_checkpoint(step: int, once: bool = False) -> Path:
        meta = dif.adapter_metadata(cfg, step, r.res)
        save = r.ckpt.save_once if once else r.ckpt.save
        return save(step, r.shared, r.local, lambda d: ld.save_adapter(target, d / "adapter.safetensors", metadata=meta))

    def on_step(step: int, logs: dict[str, float]) -> None:
        reporter.scalars(step, logs)
        freeze_embedding(step)
        if tokens is not None:
            tokens.commit()  # the embedding rows hold the trained vectors (saving and sampling read them)
        every, val_every = cfg.checkpoint.checkpointing_steps, cfg.validation.validation_steps
        if every and step % every == 0:
            save_checkpoint(step)
        if acc.is_main_process and (step % val_every == 0 if val_every else bool(every) and step % every == 0):
            reporter.images(step, dif.sample(r.pipe, cfg, step, r.res))
            sampled.add(step)

    try:
        result = run_loop(r, start, on_step, save_checkpoint)
    except TrainingStopped:  # a checkpoint of the stop step is written; no final outputs (training did not finish)
        reporter.close()
        acc.end_training()
        raise
    outputs = finish(r, result.last_step, start, reporter, sampled)
    return TrainResult(result.losses, result.first_step, result.last_step, outputs, r.ckpt.checkpoints())


def run_loop(r: Run, start: int, on_step: Any, save_checkpoint: Any) -> Any:
    """The shared training loop over this run (progress file, stop handling, the variants' step hooks)."""
    cfg = r.cfg
    loop = LoopConfig(cfg.optim.max_train_steps, cfg.optim.gradient_accumulation_steps, cfg.optim.max_grad_norm,
                      f"train {cfg.adapter.variant}", cfg.run.progress)
    hooks = [on_step] + ([JsonlProgress(cfg.run.progress_file, loop.max_steps)]
                         if cfg.run.progress_file and r.acc.is_main_process else [])
    try:
        return fit(r.acc, r.model, r.opt, r.sched, r.sampler, r.objective, loop, start, hooks,
                   on_stop=lambda step: save_checkpoint(step, once=True),
                   adapters=ld.TrainingHooks(r.model, *r.text_encoders))
    except NonFiniteLossError as e:
        last = r.ckpt.checkpoints()
        raise TrainingError(f"{e}: training stopped, nothing of this step was applied; last good checkpoint: "
                            f"{last[-1] if last else 'none'} (try a lower --learning_rate, bf16 instead of fp16, "
                            f"or the fp16-fix VAE)") from None


def finish(r: Run, last_step: int, start: int, reporter: Reporter, sampled: set[int]) -> dict[str, Path]:
    """The final outputs (Stop-safe) and a last sample grid when the last step has none yet."""
    outputs: dict[str, Path] = {}
    with StopSignals("training is complete: writing the final outputs first"):  # a Stop now loses nothing either
        r.acc.wait_for_everyone()
        if r.acc.is_main_process:
            if r.tokens is not None:
                r.tokens.commit()
            outputs = dif.save_outputs(r.pipe, r.cfg, r.out, last_step, r.res)
            if last_step > start and last_step not in sampled:
                reporter.images(last_step, dif.sample(r.pipe, r.cfg, last_step, r.res))
    reporter.close()
    r.acc.wait_for_everyone()
    r.acc.end_training()
    return outputs


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg, print_config, _ = parse_args(TLoRAConfig, argv, __doc__.split("\n\n")[0])
        if print_config:
            sys.stdout.write(to_yaml(resolve_defaults(cfg, ld.variant_names())))
            return
        result = train(cfg)
    except (ConfigError, DataError, CheckpointError, ld.AdapterError, TrainingError) as e:
        raise SystemExit(f"error: {e}") from None
    except TrainingStopped:  # SIGTERM/SIGINT: the checkpoint is saved and the line logged by fit
        raise SystemExit(EXIT_STOPPED) from None
    if result.outputs:
        log.info("done: steps %d-%d; wrote %s", result.first_step, result.last_step,
                 ", ".join(str(p) for p in result.outputs.values()))


if __name__ == "__main__":
    main()
