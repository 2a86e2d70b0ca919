"""One-image personalization: train a T-LoRA (or any registered variant) on a diffusers SD/SDXL model.

    python -m training.train_tlora --instance_data_dir photos/ --placeholder_token sks --class_name dog \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --output_dir out/dog
    accelerate launch -m training.train_tlora --config dog.yaml        # several processes: data parallel

Flags follow the official T-LoRA ``train.py`` (``--lora_rank 64 --min_rank 32 --alpha_rank_scale``,
``--validation_prompts "a {0} swimming#..."``); ``--variant lora|dora|loha|lokr|vera|...`` trains
another adapter with its own defaults; ``--config`` reads YAML/TOML; ``--print-config`` shows the result.
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

import torch

import lora_diffusion as ld

from . import diffusion as dif
from .checkpoint import CheckpointError, CheckpointManager, GlobalRNG, TrainableParams
from .config import ConfigError, TLoRAConfig, parse_args, resolve_defaults, to_yaml
from .data import DataError, files_digest
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
from .objectives import DiffusionObjective

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


def train(cfg: TLoRAConfig) -> TrainResult:
    """Check everything, build, (resume,) train, save. Errors on bad input come before the first step."""
    from diffusers import DDPMScheduler

    resolve_defaults(cfg, ld.variant_names())
    images = dif.preflight(cfg)
    out = Path(cfg.checkpoint.output_dir)
    acc = make_accelerator(cfg.model.mixed_precision, cfg.run.cpu)
    torch.manual_seed(cfg.run.seed)
    pipe = dif.load_base(cfg)
    res = cfg.data.resolution or dif.default_resolution(pipe)
    if acc.is_main_process:
        dif.make_class_images(pipe, cfg, res, acc.device)  # before anything is added to the base model
    acc.wait_for_everyone()
    tokens = dif.add_placeholder(pipe, cfg)  # pivotal tuning: the new token(s), before the prompts are checked
    text_encoders = dif.add_text_adapter(pipe, cfg)
    unet = dif.add_adapter(pipe, cfg, acc.device)
    sampler, cond = dif.build_data(cfg, pipe, images, res, acc.process_index, acc.device)
    if cfg.adapter.variant == "loradrop" and not cfg.adapter.init_adapter:  # importance stage on this data first
        dif.add_loradrop(pipe, cfg, cond, res, acc, bool(cfg.checkpoint.resume_from_checkpoint))
    opt, sched = dif.make_optimizer(unet, cfg, tokens, text_encoders)
    model, opt = acc.prepare(unet, opt)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    objective = DiffusionObjective(model, unet, noise_sched, cond, cfg.run.seed * 1000 + acc.process_index + 1,
                                   cfg.data.prior_loss_weight, res, cfg.optim.timestep_bias)
    ckpt = CheckpointManager(out / "checkpoints", dif.identity(cfg, files_digest(images), res),
                             cfg.checkpoint.checkpoints_total_limit, acc.process_index, acc.num_processes,
                             acc.wait_for_everyone)
    shared = {"params": TrainableParams(unet), "optimizer": opt, "lr_scheduler": sched}
    if tokens is not None:
        shared["embeddings"] = tokens
    for i, te in enumerate(text_encoders):
        shared[f"text_params_{i}"] = TrainableParams(te)
    if acc.scaler is not None:
        shared["grad_scaler"] = acc.scaler
    local = {"rng": GlobalRNG(), "data": sampler, "objective": objective}
    start = 0
    if cfg.checkpoint.resume_from_checkpoint:
        path = ckpt.find(cfg.checkpoint.resume_from_checkpoint)
        start = ckpt.load(path, shared, local) if path else 0
        if path is None:
            log.info("no checkpoint in %s yet: starting from step 0", ckpt.root)
    stop_embedding = cfg.embedding.embedding_steps

    def freeze_embedding(step: int) -> None:
        if tokens is not None and stop_embedding is not None and step >= stop_embedding and tokens.trainable:
            tokens.set_trainable(False)
            cond.live_text = bool(text_encoders)
            log.info("step %d: placeholder vectors frozen (--embedding_steps %d)", step, stop_embedding)

    freeze_embedding(start)
    target = dif.save_target(pipe, cfg)
    reporter = Reporter(out / cfg.run.logging_dir, cfg.run.report_to == "tensorboard" and acc.is_main_process)

    sampled: set[int] = set()

    def save_checkpoint(step: int, once: bool = False) -> Path:
        meta = dif.adapter_metadata(cfg, step, res)
        save = ckpt.save_once if once else ckpt.save
        return save(step, shared, local, lambda d: ld.save_adapter(target, d / "adapter.safetensors", metadata=meta))

    def on_step(step: int, logs: dict[str, float]) -> None:
        reporter.scalars(step, logs)
        freeze_embedding(step)
        if tokens is not None:
            tokens.commit()  # the embedding rows hold the trained vectors (saving and sampling read them)
        every, val_every = cfg.checkpoint.checkpointing_steps, cfg.validation.validation_steps
        if every and step % every == 0:
            save_checkpoint(step)
        if acc.is_main_process and (step % val_every == 0 if val_every else bool(every) and step % every == 0):
            reporter.images(step, dif.sample(pipe, cfg, step, res))
            sampled.add(step)

    loop = LoopConfig(cfg.optim.max_train_steps, cfg.optim.gradient_accumulation_steps, cfg.optim.max_grad_norm,
                      f"train {cfg.adapter.variant}", cfg.run.progress)
    try:
        hooks = [on_step] + ([JsonlProgress(cfg.run.progress_file, loop.max_steps)]
                             if cfg.run.progress_file and acc.is_main_process else [])
        result = fit(acc, model, opt, sched, sampler, objective, loop, start, hooks,
                     on_stop=lambda step: save_checkpoint(step, once=True),
                     adapters=ld.TrainingHooks(model, *text_encoders))
    except TrainingStopped:  # a checkpoint of the stop step is written; no final outputs (training did not finish)
        reporter.close()
        acc.end_training()
        raise
    except NonFiniteLossError as e:
        last = ckpt.checkpoints()
        raise TrainingError(f"{e}: training stopped, nothing of this step was applied; last good checkpoint: "
                            f"{last[-1] if last else 'none'} (try a lower --learning_rate, bf16 instead of fp16, "
                            f"or the fp16-fix VAE)") from None
    outputs = {}
    with StopSignals("training is complete: writing the final outputs first"):  # a Stop now loses nothing either
        acc.wait_for_everyone()
        if acc.is_main_process:
            if tokens is not None:
                tokens.commit()
            outputs = dif.save_outputs(pipe, cfg, out, result.last_step, res)
            if result.last_step > start and result.last_step not in sampled:
                reporter.images(result.last_step, dif.sample(pipe, cfg, result.last_step, res))
    reporter.close()
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(result.losses, result.first_step, result.last_step, outputs, ckpt.checkpoints())


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
