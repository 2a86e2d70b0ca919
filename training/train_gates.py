"""Train AutoLoRA gates: the base model and the LoRAs stay frozen, only the per-layer gates learn.

    python -m training.train_gates --loras outputs/demo_library/ring.safetensors,outputs/demo_library/dotted.safetensors \\
        --output_dir outputs/gates            # each LoRA's images + .txt captions in <lora dir>/data/<lora name>/

Each step draws two LoRAs i != j (both applied through the gate), B/2 images of each with their own captions,
and the AutoLoRA losses (arXiv 2508.02107, as in its training script):

    L = MSE(ε̂(x_t; caption_i), target)  +  λ · max(0, m - MSE(ε̂(x_t; caption_j), target))

(the denoising loss on LoRA i's image with its caption, captions dropped to "" with p = 0.3, plus a hinge that
keeps the loss under the OTHER LoRA's caption from falling below m), and the same with i and j swapped.
``--method mole`` trains MoLE gates instead (lora_diffusion/fusion/mole.py; the same objective plus α·L_balance,
added by the loop through ``TrainingHooks``) and writes ``mole.safetensors``.
Writes ``gates.safetensors`` (the gates and the sha256 of every LoRA; ``blend --gates`` refuses other LoRAs),
``checkpoints/checkpoint-<step>/`` (resume with ``--resume_from_checkpoint latest``), progress with ETA.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lora_diffusion as ld
from lora_diffusion.fusion import fuse, save_gates, save_mixture
from lora_diffusion.io.library import sha256

from . import diffusion as dif
from .checkpoint import CheckpointError, CheckpointManager, GlobalRNG, TrainableParams
from .config import CheckpointArgs, ConfigError, RunArgs, opt, parse_args, to_yaml
from .data import DataError, ImageSet, files_digest, find_images, read_captions
from .loop import EXIT_STOPPED, LoopConfig, NonFiniteLossError, Reporter, TrainingStopped, fit, make_accelerator
from .objectives import Conditioner

log = logging.getLogger("train_gates")


@dataclass
class GateModelArgs:
    pretrained_model_name_or_path: str | None = opt(None, "base model (None: the embedded demo model)", "--model")
    mixed_precision: str = opt("no", "no | fp16 | bf16 for the frozen model (gates stay fp32)", choices=["no", "fp16", "bf16"])


@dataclass
class GateDataArgs:
    loras: str | None = opt(None, "comma-separated LoRA files (at least 2)")
    data_root: str | None = opt(None, "folder holding <lora name>/ with its images and .txt captions "
                                "(None: <folder of each LoRA>/data)")
    caption_dropout: float = opt(0.3, "probability of an empty caption for the denoising loss (CFG)")
    train_batch_size: int = opt(8, "images per step (half from each of the two LoRAs)")


@dataclass
class GateArgs:
    method: str = opt("gated", "gated (AutoLoRA gates per layer, channel and step) | mole (MoLE: softmax gate per "
                               "block, balancing loss; writes mole.safetensors, loadable with ld.load_adapter)",
                      choices=["gated", "mole"])
    balance_weight: float = opt(0.5, "mole: alpha of the balancing loss -sum_i log q_i")
    time_features: int = opt(3, "Fourier features of the timestep in the gate")
    margin: float = opt(0.3, "hinge margin m on the loss under the other LoRA's caption")
    hinge_weight: float = opt(1.0, "lambda")


@dataclass
class GateOptimArgs:
    learning_rate: float = opt(3e-3, "AdamW learning rate of the gates", "--lr")
    max_train_steps: int = opt(300, "optimizer steps")
    adam_weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float | None = opt(1.0, "clip the gradient norm")


@dataclass
class GateCheckpointArgs(CheckpointArgs):
    output_dir: str = opt("outputs/gates", "where gates.safetensors and checkpoints go")
    checkpointing_steps: int | None = opt(100, "write a checkpoint every N steps (None or 0: never)")


@dataclass
class GateConfig:
    model: GateModelArgs = field(default_factory=GateModelArgs)
    data: GateDataArgs = field(default_factory=GateDataArgs)
    gates: GateArgs = field(default_factory=GateArgs)
    optim: GateOptimArgs = field(default_factory=GateOptimArgs)
    checkpoint: GateCheckpointArgs = field(default_factory=GateCheckpointArgs)
    run: RunArgs = field(default_factory=RunArgs)


@dataclass
class LoraData:
    name: str
    path: Path
    sha256: str
    images: list[Path]
    captions: list[str]


def find_data(cfg: GateConfig) -> list[LoraData]:
    """Every LoRA file with its images and captions; errors name the file or folder."""
    files = [Path(p.strip()) for p in (cfg.data.loras or "").split(",") if p.strip()]
    if len(files) < 2:
        raise ConfigError(f"--loras: gates learn to combine LoRAs; give at least 2 files, got {len(files)}")
    out = []
    for f in files:
        if not f.is_file():
            raise ConfigError(f"--loras: no such file: {f}")
        folder = Path(cfg.data.data_root or f.parent / "data") / f.stem
        images = find_images(folder, what=f"images of LoRA '{f.stem}'")
        caps = read_captions(images, f.stem)
        if caps is None:
            raise DataError(f"{folder}: gate training needs each image's caption (<image>.txt); none found")
        out.append(LoraData(f.stem, f, sha256(f), images, caps))
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--loras: two files share a name: {names}")
    return out


class PairSampler:
    """Draws (i, j, examples of i, examples of j, caption indices of the other LoRA, dropout flags)."""

    def __init__(self, sets: list[ImageSet], batch_size: int, caption_dropout: float, seed: int) -> None:
        self.sets, self.half, self.p_drop = sets, max(1, batch_size // 2), caption_dropout
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self) -> dict[str, Any]:
        i, j = torch.randperm(len(self.sets), generator=self.gen)[:2].tolist()
        side = {}
        for a, b in ((i, j), (j, i)):
            exs = [self.sets[a].draw(self.gen) for _ in range(self.half)]
            other = torch.randint(len(self.sets[b].prompts), (self.half,), generator=self.gen).tolist()
            drop = (torch.rand(self.half, generator=self.gen) < self.p_drop).tolist()
            side[a] = (exs, other, drop)
        return {"pair": (i, j), "side": side}

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


class GateObjective:
    """Denoising loss with each image's caption + hinge on the loss under the other LoRA's caption."""

    def __init__(self, model: Any, unet: Any, scheduler: Any, conds: list[Conditioner], names: list[str],
                 cfg: GateArgs, seed: int) -> None:
        self.model, self.unet, self.sched, self.conds, self.names, self.cfg = model, unet, scheduler, conds, names, cfg
        self.gen = torch.Generator().manual_seed(seed)
        self.T = int(scheduler.config.num_train_timesteps)
        self.last: dict[str, float] = {}

    def _text(self, a: int, prompts: list[str], device: torch.device) -> torch.Tensor:
        return torch.cat([self.conds[a].text(p, device)[0] for p in prompts])

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        device = next(self.unet.parameters()).device
        i, j = batch["pair"]
        ld.set_adapters(self.unet, [self.names[i], self.names[j]])
        dtype = next(p for p in self.unet.parameters() if not p.requires_grad).dtype
        total, parts = 0.0, {"denoise": 0.0, "hinge": 0.0, "other_caption": 0.0}
        for a, (exs, other, drop) in batch["side"].items():
            b = j if a == i else i
            stats = [self.conds[a].posterior(ex, device) for ex in exs]
            mean, std = torch.cat([m for m, _ in stats]), torch.cat([s for _, s in stats])
            x0 = mean + std * torch.randn(mean.shape, generator=self.gen).to(device)
            noise = torch.randn(mean.shape, generator=self.gen).to(device)
            t = torch.randint(0, self.T, (len(exs),), generator=self.gen).to(device)
            noisy = self.sched.add_noise(x0, noise, t)
            target = self.sched.get_velocity(x0, noise, t) if self.sched.config.prediction_type == "v_prediction" else noise
            own = ["" if d else self.conds[a].sets[False].prompts[ex.prompt] for ex, d in zip(exs, drop)]
            wrong = [self.conds[b].sets[False].prompts[k] for k in other]
            ld.set_timestep(self.unet, t, self.T)
            l_own = F.mse_loss(self.model(noisy.to(dtype), t, self._text(a, own, device).to(dtype)).sample.float(), target)
            l_wrong = F.mse_loss(self.model(noisy.to(dtype), t, self._text(b, wrong, device).to(dtype)).sample.float(), target)
            hinge = F.relu(self.cfg.margin - l_wrong)
            total = total + (l_own + self.cfg.hinge_weight * hinge) / 2
            for k, v in (("denoise", l_own), ("hinge", hinge), ("other_caption", l_wrong)):
                parts[k] += float(v.detach()) / 2
        self.last = parts
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


@dataclass
class GateResult:
    losses: list[float]
    first_step: int
    last_step: int
    gates: Path | None
    checkpoints: list[Path]
    validation: tuple[float, float]  # the objective on fixed batches before and after this run


@torch.no_grad()
def validation_loss(objective: GateObjective, sampler: PairSampler, batches: int = 4, seed: int = 1234) -> float:
    """The objective on ``batches`` fixed batches (fixed pairs, images, noise, timesteps); generators restored."""
    saved = objective.gen.get_state(), sampler.gen.get_state(), dict(objective.last)
    objective.gen.manual_seed(seed)
    sampler.gen.manual_seed(seed)
    total = sum(float(objective(sampler.next_batch())) for _ in range(batches)) / batches
    objective.gen.set_state(saved[0])
    sampler.gen.set_state(saved[1])
    objective.last = saved[2]
    return total


def _build(cfg: GateConfig, data: list[LoraData], acc: Any) -> tuple[Any, Any, list[Conditioner]]:
    from lora_diffusion.generate import load_pipeline

    pipe = load_pipeline(cfg.model.pretrained_model_name_or_path, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for comp in ld.components(pipe).values():
        comp.requires_grad_(False)
    unet = pipe.unet
    for d in data:
        ld.load_adapter(unet, d.path, name=d.name)
    opts = ({"time_features": cfg.gates.time_features} if cfg.gates.method == "gated"
            else {"balance_weight": cfg.gates.balance_weight})
    fusion = fuse(unet, [d.name for d in data], method=cfg.gates.method, **opts)
    for p in fusion.parameters():
        p.requires_grad_(True)
    dtype = dif.DTYPES[cfg.model.mixed_precision]
    dif.cast_frozen(unet, dtype)
    for p in fusion.parameters():
        p.data = p.data.float()
    pipe.text_encoder.to(acc.device, dtype)
    pipe.vae.to(acc.device, torch.float32)
    unet.to(acc.device)
    res = int(unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    conds = []
    for d in data:
        s = ImageSet(d.images, res, d.captions, per_image=True)
        c = Conditioner(pipe, s, None, None, True, True)
        c.warm(acc.device)
        conds.append(c)
    c0 = conds[0]
    c0.text("", acc.device)
    for c in conds[1:]:  # share the empty caption's encoding
        c._text[""] = c0._text[""]
    return pipe, fusion, conds


def identity(cfg: GateConfig, data: list[LoraData]) -> dict[str, Any]:
    return {"loras": {d.name: d.sha256 for d in data}, "data": files_digest([p for d in data for p in d.images]),
            "base_model": cfg.model.pretrained_model_name_or_path, "time_features": cfg.gates.time_features,
            "margin": cfg.gates.margin, "hinge_weight": cfg.gates.hinge_weight, "batch": cfg.data.train_batch_size,
            "caption_dropout": cfg.data.caption_dropout, "seed": cfg.run.seed,
            **({"method": "mole", "balance_weight": cfg.gates.balance_weight} if cfg.gates.method == "mole" else {})}


def save_learned(fusion: Any, unet: Any, folder: Path, hashes: dict[str, str], meta: dict[str, str] | None = None) -> Path:
    """gated: ``gates.safetensors`` (the gates + LoRA hashes); mole: ``mole.safetensors`` (a mixture file: the
    LoRAs and their gates, ``ld.load_adapter(pipe, path)`` restores both)."""
    if fusion.method.name == "mole":
        return save_mixture(unet, fusion, folder / "mole.safetensors", metadata={**(meta or {}), "loras": str(hashes)})
    return save_gates(fusion, folder / "gates.safetensors", hashes, meta)


def train(cfg: GateConfig) -> GateResult:
    """Check the inputs, build, (resume,) train the gates, save them."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    out = dif.check_output_dir(cfg.checkpoint.output_dir)
    data = find_data(cfg)
    acc = make_accelerator(cfg.model.mixed_precision, cfg.run.cpu)
    torch.manual_seed(cfg.run.seed)
    pipe, fusion, conds = _build(cfg, data, acc)
    o = cfg.optim
    opt_ = torch.optim.AdamW(fusion.parameters(), lr=o.learning_rate, weight_decay=o.adam_weight_decay)
    sched = get_scheduler("cosine", opt_, num_warmup_steps=min(20, o.max_train_steps // 10), num_training_steps=o.max_train_steps)
    model, opt_ = acc.prepare(pipe.unet, opt_)
    names = [d.name for d in data]
    objective = GateObjective(model, pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), conds, names, cfg.gates,
                              cfg.run.seed * 1000 + 1)
    sampler = PairSampler([c.sets[False] for c in conds], cfg.data.train_batch_size, cfg.data.caption_dropout, cfg.run.seed)
    ckpt = CheckpointManager(out / "checkpoints", identity(cfg, data), cfg.checkpoint.checkpoints_total_limit)
    shared = {"params": TrainableParams(pipe.unet), "optimizer": opt_, "lr_scheduler": sched}
    local = {"rng": GlobalRNG(), "data": sampler, "objective": objective}
    start = 0
    if cfg.checkpoint.resume_from_checkpoint:
        path = ckpt.find(cfg.checkpoint.resume_from_checkpoint)
        start = ckpt.load(path, shared, local) if path else 0
    reporter = Reporter(out / cfg.run.logging_dir, cfg.run.report_to == "tensorboard")
    hashes = {d.name: d.sha256 for d in data}

    def on_step(step: int, logs: dict[str, float]) -> None:
        reporter.scalars(step, {**logs, **objective.last})
        if step % max(1, o.max_train_steps // 10) == 0:
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in objective.last.items()))
        every = cfg.checkpoint.checkpointing_steps
        if every and step % every == 0:
            ckpt.save(step, shared, local, lambda d: save_learned(fusion, pipe.unet, d, hashes))

    loop = LoopConfig(o.max_train_steps, 1, o.max_grad_norm, "train gates", cfg.run.progress)
    before = validation_loss(objective, sampler)
    try:
        result = fit(acc, model, opt_, sched, sampler, objective, loop, start, [on_step],
                     on_stop=lambda step: ckpt.save_once(step, shared, local,
                                                         lambda d: save_learned(fusion, pipe.unet, d, hashes)))
    except TrainingStopped:  # SIGTERM/SIGINT: a checkpoint of the stop step is written, no final gates
        reporter.close()
        raise
    except NonFiniteLossError as e:
        last = ckpt.checkpoints()
        raise ConfigError(f"{e}: stopped; last good checkpoint: {last[-1] if last else 'none'}") from None
    reporter.close()
    after = validation_loss(objective, sampler)
    log.info("validation loss (fixed batches): %.4f before this run, %.4f after", before, after)
    meta = {"base_model": str(cfg.model.pretrained_model_name_or_path or "demo-sd"), "steps": str(result.last_step),
            "trainer": "training.train_gates"}
    gates = save_learned(fusion, pipe.unet, out, hashes, meta)
    log.info("gates of %d layers for %s -> %s", len(fusion.combiners), names, gates)
    return GateResult(result.losses, result.first_step, result.last_step, gates, ckpt.checkpoints(), (before, after))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg, print_config, _ = parse_args(GateConfig, argv, __doc__.split("\n\n")[0])
        if print_config:
            sys.stdout.write(to_yaml(cfg))
            return
        train(cfg)
    except (ConfigError, DataError, CheckpointError, ld.AdapterError) as e:
        raise SystemExit(f"error: {e}") from None
    except TrainingStopped:  # the checkpoint is saved and the line logged by fit
        raise SystemExit(EXIT_STOPPED) from None


if __name__ == "__main__":
    main()
