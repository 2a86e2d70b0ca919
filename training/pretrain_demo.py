"""Pretrain the embedded demo model (a small Stable Diffusion of the shapes world) from scratch.

    python -m training.pretrain_demo                         # full run -> assets/demo-sd (see docs/demo_model.md)
    python -m training.pretrain_demo --resume                # continue a stopped run from its last checkpoint
    python -m training.pretrain_demo --vae-steps 200 --unet-steps 300 --out /tmp/demo --max-minutes 9   # a trial

Stages, in one command: ``vae`` (an AutoencoderKL, x4 down, on renders of every concept), ``encode``
(a bank of latents of pretraining scenes, cached), ``unet`` (UNet + CLIP text encoder trained jointly
with the VAE frozen), ``export`` (a diffusers ``StableDiffusionPipeline`` folder, fp16-rounded fp32 safetensors) and
``measure`` (the evaluator reads samples of seen and held-out attribute combinations).

Choices made for shape binding (see docs/demo_model.md for the trials): large shapes with little
jitter; v-prediction (the loss sees x0 at high noise, where the shape is decided; epsilon-prediction
barely does); timesteps sampled with a bias toward high noise; a pooled-text embedding added to the
UNet's time embedding (``addition_embed_type="text"``, computed inside the UNet from the text states,
so a stock pipeline runs it); captions dropped 10% of the time for classifier-free guidance.

A checkpoint (one file, written to a temp file then renamed) is kept every ``--checkpoint-every``
steps and when ``--max-minutes`` runs out; ``--resume`` continues from it, refusing one made with a
different architecture.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_diffusion.demo import world
from lora_diffusion.demo.model import DEMO_MODEL_DIRNAME, assets_dir
from lora_diffusion.io.files import write_json

log = logging.getLogger("pretrain_demo")
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"


@dataclass
class Arch:
    """Architecture: what a checkpoint depends on (resuming with another one is refused)."""

    resolution: int = 32
    vae_channels: tuple[int, ...] = (32, 64, 64)  # len - 1 downsamplings: x4; 16,32,32 blurs stripes (93% texture)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers: int = 1
    unet_heads: int = 4
    text_time_embedding: bool = True
    text_hidden: int = 64
    text_layers: int = 2
    max_length: int = 20
    prediction_type: str = "v_prediction"

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


@dataclass
class Train:
    vae_steps: int = 3000
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    vae_pool: int = 16000
    bank: int = 40000
    unet_steps: int = 8000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    text_lr: float = 1e-3
    warmup: int = 200
    t_gamma: float = 0.7
    cond_drop: float = 0.1
    caption_variety: float = 0.3
    ema: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    sample_steps: int = 20
    guidance: float = 4.0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- models
def build_tokenizer(max_length: int = 20) -> Any:
    """A word-level tokenizer over the world's vocabulary (``world.vocabulary()``, placeholders included),
    CLIP-style: ``<|startoftext|> words <|endoftext|>``, padded with ``<|endoftext|>``; unknown words -> ``<|unk|>``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([BOS, EOS, UNK, *world.vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"<v\d+>|[a-z0-9]+|[^a-z0-9\s]"), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS,
                                   model_max_length=max_length)


def build_vae(arch: Arch) -> torch.nn.Module:
    """A randomly initialized ``AutoencoderKL`` of ``arch`` (x2 down per extra channel entry)."""
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=arch.latent_channels,
                         block_out_channels=arch.vae_channels, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1,
                         norm_num_groups=min(8, arch.vae_channels[0] // 4), sample_size=arch.resolution)


def build_models(arch: Arch, vocab_size: int) -> dict[str, torch.nn.Module]:
    """Randomly initialized VAE, CLIP text encoder and UNet of ``arch``."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = build_vae(arch)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=arch.text_hidden, intermediate_size=2 * arch.text_hidden,
        num_hidden_layers=arch.text_layers, num_attention_heads=4, max_position_embeddings=arch.max_length,
        projection_dim=arch.text_hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu"))
    m = len(arch.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (m - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (m - 1)
    extra: dict[str, Any] = {}
    if arch.text_time_embedding:
        extra = dict(addition_embed_type="text", addition_embed_type_num_heads=arch.unet_heads)
    unet = UNet2DConditionModel(
        sample_size=arch.latent_size, in_channels=arch.latent_channels, out_channels=arch.latent_channels,
        layers_per_block=arch.unet_layers, block_out_channels=arch.unet_channels, down_block_types=down, up_block_types=up,
        cross_attention_dim=arch.text_hidden, attention_head_dim=arch.unet_heads,
        norm_num_groups=min(32, arch.unet_channels[0] // 4), **extra)
    return {"vae": vae, "text_encoder": text, "unet": unet}


def build_scheduler(arch: Arch) -> Any:
    """Training scheduler (DDPM, SD's scaled-linear betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=arch.prediction_type, clip_sample=False, steps_offset=1)


def save_pipeline(models: dict[str, torch.nn.Module], tokenizer: Any, arch: Arch, folder: Path,
                  info: dict[str, Any] | None = None) -> Path:
    """Write a ``StableDiffusionPipeline`` folder (DPM-Solver++ scheduler) atomically.

    Weights are rounded to fp16 precision and stored as fp32: ``from_pretrained`` with diffusers' default dtype
    (fp32) runs on CPU, and a fp16 load on a GPU is exactly the same model (16.5 MB on disk)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    sched = DPMSolverMultistepScheduler.from_config(build_scheduler(arch).config)
    half = {k: copy.deepcopy(m).to(torch.float16).to(torch.float32).eval() for k, m in models.items()}
    pipe = StableDiffusionPipeline(vae=half["vae"], text_encoder=half["text_encoder"], tokenizer=tokenizer,
                                   unet=half["unet"], scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    meta = {"format": "lora-diffusion-demo-model", "arch": asdict(arch), **world_meta(), **(info or {})}
    return write_pipeline_folder(pipe, Path(folder), meta)


def world_meta() -> dict[str, Any]:
    """The world's vocabulary and concept splits, as recorded in ``demo_model.json``."""
    return {"vocabulary": world.vocabulary(), "pretrain_shapes": world.PRETRAIN_SHAPES,
            "heldout_shapes": world.HELDOUT_SHAPES, "pretrain_textures": world.PRETRAIN_TEXTURES,
            "heldout_textures": world.HELDOUT_TEXTURES, "placeholders": world.PLACEHOLDERS}


def write_pipeline_folder(pipe: Any, folder: Path, meta: dict[str, Any]) -> Path:
    """``pipe.save_pretrained`` plus ``demo_model.json`` into a temp folder, then swapped in for ``folder``."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "demo_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


def build_demo_pipeline(folder: str | Path, arch: Arch | None = None, seed: int = 0) -> Path:
    """A random-weight demo pipeline folder of ``arch`` (tests; the layout of the real one)."""
    arch = arch or Arch()
    torch.manual_seed(seed)
    tok = build_tokenizer(arch.max_length)
    return save_pipeline(build_models(arch, len(tok)), tok, arch, Path(folder), {"trained": False})


# ---------------------------------------------------------------------------------------------------- helpers
def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _atomic_save(obj: Any, file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _lr_lambda(warmup: int, total: int) -> Any:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def rng_state(g: torch.Generator) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "g": g.get_state(), "np": np.random.get_state(), "py": random.getstate()}


def set_rng_state(state: dict[str, Any], g: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    g.set_state(state["g"])
    np.random.set_state(state["np"])
    random.setstate(state["py"])


def check_same_arch(saved: dict[str, Any], mine: dict[str, Any]) -> None:
    """Refuse (SystemExit naming the fields) a checkpoint made with another architecture."""
    diff = [k for k in mine if json.dumps(saved.get(k)) != json.dumps(mine[k])]
    if diff:
        raise SystemExit(f"--resume: the checkpoint was made with another architecture (differs in {diff}); "
                         f"use the same flags or another --out")


class EMA:
    """Exponential moving average of parameters with warm-up (decay min(d, (1+s)/(10+s)))."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.step = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live and averaged weights (call twice to restore)."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "step": self.step, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
        self.step, self.decay = state["step"], state["decay"]


# ---------------------------------------------------------------------------------------------------- trainer
class Pretrainer:
    def __init__(self, arch: Arch, cfg: Train, out: Path, max_minutes: float | None, evaluator: Path | None,
                 device: str = "cpu") -> None:
        self.arch, self.cfg, self.out, self.t0 = arch, cfg, out, time.time()
        self.device = torch.device(device)
        self.max_minutes = max_minutes
        self.ckpt_file = out / "checkpoint.pt"
        self.tokenizer = build_tokenizer(arch.max_length)
        torch.manual_seed(cfg.seed)
        self.models = {k: m.to(self.device) for k, m in build_models(arch, len(self.tokenizer)).items()}
        self.stage, self.step = "vae", 0
        self.metrics: dict[str, Any] = {}
        self.vae_opt = torch.optim.AdamW(self.models["vae"].parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW([
            {"params": self.models["unet"].parameters(), "lr": cfg.unet_lr},
            {"params": self.models["text_encoder"].parameters(), "lr": cfg.text_lr}], weight_decay=1e-2)
        self.vae_sched = torch.optim.lr_scheduler.LambdaLR(self.vae_opt, _lr_lambda(100, cfg.vae_steps))
        self.unet_sched = torch.optim.lr_scheduler.LambdaLR(self.unet_opt, _lr_lambda(cfg.warmup, cfg.unet_steps))
        self.ema = EMA([self.models["unet"], self.models["text_encoder"]], cfg.ema)
        self.scaling_factor = 1.0
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.evaluator_path = evaluator
        self.seconds = 0.0  # training time over all sessions

    # -- checkpoints
    def save(self) -> None:
        state = {"arch": asdict(self.arch), "train": asdict(self.cfg), "stage": self.stage, "step": self.step,
                 "models": {k: m.state_dict() for k, m in self.models.items()},
                 "vae_opt": self.vae_opt.state_dict(), "unet_opt": self.unet_opt.state_dict(),
                 "vae_sched": self.vae_sched.state_dict(), "unet_sched": self.unet_sched.state_dict(),
                 "ema": self.ema.state_dict(), "scaling_factor": self.scaling_factor, "metrics": self.metrics,
                 "rng": rng_state(self.g), "seconds": self.seconds + time.time() - self.t0}
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_save(state, self.ckpt_file)
        log.info("checkpoint: stage %s step %d -> %s", self.stage, self.step, self.ckpt_file)

    def load(self) -> None:
        if not self.ckpt_file.is_file():
            raise SystemExit(f"--resume: no checkpoint at {self.ckpt_file}")
        state = torch.load(self.ckpt_file, map_location="cpu", weights_only=False)  # load_state_dict moves to device
        check_same_arch(state["arch"], asdict(self.arch))
        for k, m in self.models.items():
            m.load_state_dict(state["models"][k])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.vae_sched.load_state_dict(state["vae_sched"])
        self.unet_sched.load_state_dict(state["unet_sched"])
        self.ema = EMA([self.models["unet"], self.models["text_encoder"]], self.cfg.ema)
        self.ema.load_state_dict(state["ema"])
        self.stage, self.step, self.scaling_factor = state["stage"], state["step"], state["scaling_factor"]
        self.metrics = state.get("metrics", {})
        set_rng_state(state["rng"], self.g)
        self.seconds = state.get("seconds", 0.0)
        log.info("resumed: stage %s step %d", self.stage, self.step)

    def init_vae(self, checkpoint: Path) -> None:
        """Take the trained VAE (and its scaling factor) of another run's checkpoint and start at the UNet stage."""
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state["stage"] == "vae":
            raise SystemExit(f"--init-vae: {checkpoint} has not finished its VAE stage")
        if tuple(state["arch"]["vae_channels"]) != self.arch.vae_channels or state["arch"]["resolution"] != self.arch.resolution:
            raise SystemExit(f"--init-vae: {checkpoint} has another VAE (channels/resolution)")
        self.models["vae"].load_state_dict(state["models"]["vae"])
        self.scaling_factor = state["scaling_factor"]
        self.metrics["vae"] = state.get("metrics", {}).get("vae", {})
        self.stage, self.step = "unet", 0
        log.info("VAE taken from %s (scaling factor %.4f)", checkpoint, self.scaling_factor)

    def _randn(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.g).to(self.device)

    def _after_step(self, bar: Any, postfix: Callable[[], dict[str, str]]) -> bool:
        """Progress (postfix every 10 steps), periodic checkpoint, time limit; False: the stage must stop now."""
        bar.update(1)
        if self.step % 10 == 0:
            bar.set_postfix(**postfix())
        if self.step % self.cfg.checkpoint_every == 0:
            self.save()
        if self.out_of_time():
            bar.close()
            return False
        return True

    def _advance(self, loss: torch.Tensor, opt: torch.optim.Optimizer, sched: Any, modules: list[torch.nn.Module],
                 bar: Any, smoothed: float | None) -> tuple[float, bool]:
        """One step of the denoiser stages (UNet, DiT): backward, clip at 1, optimizer, schedule, EMA, count,
        loss smoothed at 0.98 for the bar; (smoothed loss, False: the stage must stop now)."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in modules for p in m.parameters()], 1.0)
        opt.step()
        sched.step()
        self.ema.update()
        self.step += 1
        li = loss.item()
        smoothed = li if smoothed is None else 0.98 * smoothed + 0.02 * li
        return smoothed, self._after_step(bar, lambda e=smoothed: {"loss": f"{e:.4f}"})

    def _finish_stage(self, bar: Any, next_stage: str) -> bool:
        """The stage ran all its steps: close the bar, checkpoint at the start of ``next_stage``."""
        bar.close()
        self.stage, self.step = next_stage, 0
        self.save()
        return True

    def out_of_time(self) -> bool:
        return self.max_minutes is not None and time.time() - self.t0 > 60 * self.max_minutes

    # -- stage 1: VAE
    def train_vae(self) -> bool:
        cfg, vae = self.cfg, self.models["vae"]
        scenes = world.sample_scenes(cfg.vae_pool, cfg.seed + 1, "all", size_range=(0.45, 0.9), jitter=0.12,
                                     max_rotation=20.0, textured=0.4)
        log.info("rendering %d VAE training images", cfg.vae_pool)
        pool = _to_tensor(world.render_batch(scenes, self.arch.resolution))
        vae.train()
        bar = tqdm(total=cfg.vae_steps, initial=self.step, desc="vae", dynamic_ncols=True)
        while self.step < cfg.vae_steps:
            x = pool[torch.randint(0, len(pool), (cfg.vae_batch,), generator=self.g)]
            if torch.rand((), generator=self.g) < 0.5:
                x = x.flip(-1)
            x = x.to(self.device)
            dist = vae.encode(x).latent_dist
            z = dist.mean + dist.std * self._randn(dist.mean.shape)
            rec = vae.decode(z).sample
            rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
            loss = rec_loss + cfg.vae_kl * dist.kl().mean()
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            self.vae_opt.step()
            self.vae_sched.step()
            self.step += 1
            if not self._after_step(bar, lambda r=rec_loss: {"rec": f"{float(r):.4f}"}):
                return False
        bar.close()
        vae.eval()
        self.measure_vae()
        self.stage, self.step = "unet", 0
        self.save()
        return True

    @torch.no_grad()
    def measure_vae(self, n: int = 512) -> None:
        from lora_diffusion.demo.evaluator import sample_training_scenes

        vae = self.models["vae"].eval()
        scenes = sample_training_scenes(n, 777)
        x = _to_tensor(world.render_batch(scenes, self.arch.resolution)).to(self.device)
        mean = torch.cat([vae.encode(x[i:i + 128]).latent_dist.mean for i in range(0, n, 128)])
        rec = torch.cat([vae.decode(mean[i:i + 128]).sample for i in range(0, n, 128)]).clamp(-1, 1)
        self.scaling_factor = float(1.0 / mean.std())
        m: dict[str, Any] = {"rec_mse": round(float(F.mse_loss(rec, x)), 5), "latent_std": round(float(mean.std()), 4),
                             "scaling_factor": round(self.scaling_factor, 5)}
        ev = self._evaluator()
        if ev is not None:
            m["evaluator_on_renders"] = ev.accuracy(x.cpu(), scenes)
            m["evaluator_on_reconstructions"] = ev.accuracy(rec.cpu(), scenes)
        self.metrics["vae"] = m
        log.info("VAE: %s", json.dumps(m))

    def _evaluator(self) -> Any:
        from lora_diffusion.demo.evaluator import EvaluatorError, load_evaluator

        try:
            return load_evaluator(self.evaluator_path)
        except EvaluatorError as e:
            log.warning("no evaluator, accuracy not measured: %s", e)
            return None

    # -- stage 2: latent bank
    @torch.no_grad()
    def latent_bank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        cache = self.out / "latents.pt"
        if cache.is_file():
            data = torch.load(cache, map_location="cpu", weights_only=True)
            if data["n"] == cfg.bank and data["scaling_factor"] == self.scaling_factor:
                return data["mean"], data["std"], data["ids"]
        log.info("encoding a bank of %d pretraining latents", cfg.bank)
        vae = self.models["vae"].eval()
        means, stds, ids = [], [], []
        for i in tqdm(range(0, cfg.bank, 1000), desc="encode", dynamic_ncols=True):
            n = min(1000, cfg.bank - i)
            imgs, caps, _ = world.make_dataset(n, cfg.seed * 1000 + 10 + i, "pretrain", self.arch.resolution,
                                               caption_variety=cfg.caption_variety)
            d = vae.encode(_to_tensor(imgs).to(self.device)).latent_dist
            means.append(d.mean.half().cpu())
            stds.append(d.std.half().cpu())
            ids.append(self.tokenize(caps))
        data = {"n": cfg.bank, "scaling_factor": self.scaling_factor, "mean": torch.cat(means), "std": torch.cat(stds),
                "ids": torch.cat(ids)}
        _atomic_save(data, cache)
        return data["mean"], data["std"], data["ids"]

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=self.arch.max_length, truncation=True,
                              return_tensors="pt").input_ids

    # -- stage 3: UNet + text encoder
    def sample_timesteps(self, n: int) -> torch.Tensor:
        u = torch.rand(n, generator=self.g)
        return (1000 * (1 - (1 - u) ** (1 / self.cfg.t_gamma))).long().clamp(0, 999) if self.cfg.t_gamma != 1 \
            else (u * 1000).long().clamp(0, 999)

    def train_unet(self) -> bool:
        cfg = self.cfg
        unet, text = self.models["unet"], self.models["text_encoder"]
        for p in self.models["vae"].parameters():
            p.requires_grad_(False)
        mean, std, ids = self.latent_bank()
        empty = self.tokenize([""])[0]
        sched = build_scheduler(self.arch)
        unet.train()
        text.train()
        bar = tqdm(total=cfg.unet_steps, initial=self.step, desc="unet", dynamic_ncols=True)
        ema_loss = None
        while self.step < cfg.unet_steps:
            idx = torch.randint(0, len(mean), (cfg.unet_batch,), generator=self.g)
            lat = (mean[idx].float().to(self.device) + std[idx].float().to(self.device) * self._randn(mean[idx].shape))
            lat = lat * self.scaling_factor
            tok = ids[idx].clone()
            tok[torch.rand(len(idx), generator=self.g) < cfg.cond_drop] = empty
            tok = tok.to(self.device)
            noise = self._randn(lat.shape)
            t = self.sample_timesteps(len(idx)).to(self.device)
            noisy = sched.add_noise(lat, noise, t)
            target = sched.get_velocity(lat, noise, t) if self.arch.prediction_type == "v_prediction" else noise
            hidden = text(tok).last_hidden_state
            pred = unet(noisy, t, hidden).sample
            loss = F.mse_loss(pred, target)
            ema_loss, go_on = self._advance(loss, self.unet_opt, self.unet_sched, [unet, text], bar, ema_loss)
            if not go_on:
                return False
        return self._finish_stage(bar, "export")

    # -- stage 4: export + measure
    def export(self, folder: Path, measure_n: int) -> Path:
        self.ema.swap()  # export the averaged weights
        try:
            self.models["vae"].config.scaling_factor = self.scaling_factor  # type: ignore[attr-defined]
            self.models["vae"].register_to_config(scaling_factor=self.scaling_factor)  # type: ignore[operator]
            seconds = round(self.seconds + time.time() - self.t0)
            info = {"trained": True, "train_config": asdict(self.cfg), "train_seconds": seconds, "metrics": self.metrics}
            save_pipeline(self.models, self.tokenizer, self.arch, folder, info)
        finally:
            self.ema.swap()
        log.info("saved the pipeline to %s", folder)
        self.record_generation(folder, measure_n)
        return folder


    def record_generation(self, folder: Path, measure_n: int) -> None:
        """Measure the exported pipeline with the evaluator (``measure_n`` images per split; 0: skip) and record the
        figures in its ``demo_model.json`` (written atomically)."""
        if measure_n <= 0:
            return
        self.metrics["generation"] = measure_generation(folder, self.evaluator_path, measure_n, self.cfg.sample_steps,
                                                        self.cfg.guidance, grid_dir=self.out, device=self.device)
        meta = json.loads((folder / "demo_model.json").read_text())
        meta["metrics"] = self.metrics
        write_json(folder / "demo_model.json", meta, indent=2)


@torch.no_grad()
def measure_generation(folder: Path, evaluator: Path | None = None, n: int = 64, steps: int = 20, guidance: float = 4.0,
                       seed: int = 4242, grid_dir: Path | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Generate ``n`` images for seen and for held-out (shape, color, background) combinations with the canonical
    caption; the evaluator's accuracy on each attribute the prompt names. Sample grids go to ``grid_dir``."""
    from lora_diffusion.demo.evaluator import EvaluatorError, load_evaluator
    from lora_diffusion.demo.model import load_demo_pipeline

    try:
        ev = load_evaluator(evaluator)
    except EvaluatorError as e:
        log.warning("generation not measured: %s", e)
        return {}
    pipe = load_demo_pipeline(folder, device=device, dtype=torch.float32)
    out: dict[str, Any] = {"steps": steps, "guidance": guidance}
    for split in ("pretrain", "pretrain-heldout-combos"):
        scenes = world.sample_scenes(n, seed, split, textured=0.0)
        g = torch.Generator().manual_seed(seed)
        images = [pipe([s.caption() for s in scenes[i:i + 32]], num_inference_steps=steps, guidance_scale=guidance,
                       generator=g, output_type="np").images for i in range(0, n, 32)]
        arr = (np.clip(np.concatenate(images), 0, 1) * 255).round().astype(np.uint8)
        truth = [{"shape": s.shape, "color": s.color, "background": s.background} for s in scenes]
        out[split] = {k: round(v, 4) for k, v in ev.accuracy(arr, truth).items()}
        if grid_dir is not None:
            from PIL import Image

            k = int(math.sqrt(min(n, 64)))
            h, w = arr.shape[1:3]
            grid = arr[:k * k].reshape(k, k, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(k * h, k * w, 3)
            big = Image.fromarray(grid).resize((k * w * 2, k * h * 2), Image.NEAREST)
            big.save(Path(grid_dir) / f"samples-{split}.png")
    log.info("generation accuracy: %s", json.dumps(out))
    return out


# ---------------------------------------------------------------------------------------------------- CLI
def _add_dataclass_flags(p: argparse.ArgumentParser, cls: type) -> None:
    for f in fields(cls):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, tuple):
            p.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), default=default,
                           help=f"comma-separated (default {','.join(map(str, default))})")
        elif isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default, help=f"(default {default})")
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"(default {default})")


def add_common_flags(p: argparse.ArgumentParser, out_default: str, model_dirname: str) -> None:
    """The flags both demo-model pretrainers take (work folder, model folder, resume/stop, measurement, device)."""
    p.add_argument("--out", type=Path, default=None, help=f"work folder (default {out_default})")
    p.add_argument("--model-dir", type=Path, default=None, help=f"where the pipeline goes (default assets/{model_dirname})")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this long")
    p.add_argument("--export-on-stop", action="store_true", help="export and measure even when stopped early (trials)")
    p.add_argument("--evaluator", type=Path, default=None, help="evaluator folder (default assets/evaluator)")
    p.add_argument("--measure", type=int, default=64, help="images per split for the final accuracy (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p, "outputs/pretrain_demo", DEMO_MODEL_DIRNAME)
    p.add_argument("--init-vae", type=Path, default=None, help="start at the UNet stage with the VAE of this checkpoint.pt")
    _add_dataclass_flags(p, Arch)
    _add_dataclass_flags(p, Train)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    arch = Arch(**{f.name: getattr(a, f.name) for f in fields(Arch)})
    cfg = Train(**{f.name: getattr(a, f.name) for f in fields(Train) if f.name != "extra"})
    out = a.out or Path("outputs/pretrain_demo")
    folder = a.model_dir or assets_dir() / DEMO_MODEL_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    tr = Pretrainer(arch, cfg, out, a.max_minutes, a.evaluator, a.device)
    if a.resume:
        tr.load()
    elif tr.ckpt_file.exists():
        raise SystemExit(f"{tr.ckpt_file} exists: pass --resume to continue it, or another --out")
    elif a.init_vae is not None:
        tr.init_vae(a.init_vae)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in tr.models.items()}
    log.info("parameters: %s (fp16 %.1f MB)", n_params, 2 * sum(n_params.values()) / 2**20)
    if tr.stage == "vae" and not tr.train_vae():
        tr.save()
        log.warning("stopped by --max-minutes in stage vae; continue with --resume")
        return 3
    if tr.stage == "unet" and not tr.train_unet():
        tr.save()
        log.warning("stopped by --max-minutes in stage unet; continue with --resume")
        if not a.export_on_stop:
            return 3
        log.info("--export-on-stop: exporting the partly trained model (trials)")
    tr.export(folder, a.measure)
    log.info("done in %.1f min this session; metrics: %s", (time.time() - tr.t0) / 60, json.dumps(tr.metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
