"""Pretrain the DiT demo model: a small Stable Diffusion 3 (MM-DiT, rectified flow) of the shapes world.

    python -m training.pretrain_demo_dit                     # full run -> assets/demo-sd3 (see docs/demo_model.md)
    python -m training.pretrain_demo_dit --resume            # continue a stopped run from its last checkpoint
    python -m training.pretrain_demo_dit --steps 300 --bank 4000 --out /tmp/dit --max-minutes 5 --export-on-stop

The folder it writes is an ordinary diffusers ``StableDiffusion3Pipeline`` (``DiffusionPipeline.from_pretrained``
loads it; the default call arguments draw the world at 32x32):

- ``transformer``: ``SD3Transformer2DModel`` (patch 2 over 8x8x4 latents: 16 image tokens), trained from scratch,
  adaLN-Zero initialization (DiT), RMS q/k norm (SD3.5);
- ``vae``: the UNet demo model's trained VAE (``assets/demo-sd``), frozen; its ``scaling_factor``/``shift_factor``
  are measured on the latents (the SD3 pipeline decodes ``latents / scaling_factor + shift_factor``);
- ``text_encoder``/``text_encoder_2``: ``CLIPTextModelWithProjection`` over the world's word-level tokenizer,
  initialized from the UNet demo model's text encoder and trained jointly;
- ``text_encoder_3``: a stand-in ``T5EncoderModel`` with no layers and a final norm of weight 0, so its output is
  exactly zero: the context the pipeline builds without T5 (``max_sequence_length`` = 256 zero tokens after the CLIP
  tokens), but the folder loads with default arguments (with ``text_encoder_3: null`` in ``model_index.json``,
  diffusers 0.42 needs ``text_encoder_3=None`` passed to ``from_pretrained``); ``tokenizer_3`` is the world tokenizer;
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with ``shift`` (``--shift``); training samples
  ``sigma = shift(u)``, ``u`` logit-normal, the distribution SD3 trains with, so the scheduler's steps sit where
  the model was trained.

The 256 zero tokens are identical at every layer (same input, no positional embedding on the context), so in
attention they act as one key/value whose logit is raised by ln(256): training runs one zero token with that
bias (:func:`zero_tokens_processor`, 21 context tokens instead of 276, ~8x cheaper) and is exactly the
function the stock pipeline evaluates (``tests/test_demo_dit.py`` checks it in float64).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_diffusion.demo.model import DEMO_DIT_DIRNAME, DEMO_FORMAT, DEMO_MODEL_DIRNAME, assets_dir
from lora_diffusion.zero_context import ZeroContextJointAttnProcessor
from training.pretrain_demo import (
    EMA,
    Arch,
    Pretrainer,
    _add_dataclass_flags,
    _atomic_save,
    _lr_lambda,
    add_common_flags,
    build_tokenizer,
    build_vae,
    check_same_arch,
    rng_state,
    set_rng_state,
    world_meta,
    write_pipeline_folder,
)

log = logging.getLogger("pretrain_demo_dit")


@dataclass
class DitArch:
    """Architecture of the shipped pipeline (a checkpoint of another one is refused on --resume)."""

    resolution: int = 32
    patch_size: int = 2
    layers: int = 6
    heads: int = 4
    head_dim: int = 32
    qk_norm: str = "rms_norm"
    text_hidden: int = 64  # each CLIP encoder; the context is both concatenated (joint_attention_dim 128)
    text_layers: int = 2
    max_length: int = 20
    t5_tokens: int = 256  # the stock pipeline's max_sequence_length: zero tokens it appends without a T5
    shift: float = 3.0  # FlowMatchEulerDiscreteScheduler shift (SD3's)

    @property
    def unet_arch(self) -> Arch:
        """The UNet demo model's architecture, whose VAE and tokenizer this model shares."""
        return Arch(resolution=self.resolution, text_hidden=self.text_hidden, text_layers=self.text_layers,
                    max_length=self.max_length)

    @property
    def latent_size(self) -> int:
        return self.unet_arch.latent_size

    @property
    def joint_dim(self) -> int:
        return 2 * self.text_hidden


@dataclass
class DitTrain:
    bank: int = 20000  # the shipped run's figures (docs/demo_model.md, "The DiT demo model")
    steps: int = 2700
    batch: int = 64
    lr: float = 1e-3
    text_lr: float = 3e-4
    warmup: int = 200
    logit_mean: float = 0.0  # sigma = shift(sigmoid(N(logit_mean, logit_std)))
    logit_std: float = 1.0
    cond_drop: float = 0.1
    caption_variety: float = 0.3
    ema: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    sample_steps: int = 28  # StableDiffusion3Pipeline's defaults
    guidance: float = 7.0


# ---------------------------------------------------------------------------------------------------- models
def build_transformer(arch: DitArch) -> torch.nn.Module:
    """``SD3Transformer2DModel`` of ``arch`` with adaLN-Zero initialization: every block starts as the identity
    and the output as zero (DiT, Peebles & Xie 2023), which keeps a from-scratch run stable at lr 1e-3."""
    from diffusers import SD3Transformer2DModel

    inner = arch.heads * arch.head_dim
    model = SD3Transformer2DModel(
        sample_size=arch.latent_size, patch_size=arch.patch_size, in_channels=4, out_channels=4, num_layers=arch.layers,
        attention_head_dim=arch.head_dim, num_attention_heads=arch.heads, joint_attention_dim=arch.joint_dim,
        caption_projection_dim=inner, pooled_projection_dim=arch.joint_dim,
        pos_embed_max_size=arch.latent_size // arch.patch_size, qk_norm=arch.qk_norm or None)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and (name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear"))
                                                   or name == "proj_out"):
                m.weight.zero_()
                m.bias.zero_()
    return model


def build_text_encoder(arch: DitArch, vocab_size: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=arch.text_hidden, intermediate_size=2 * arch.text_hidden,
        num_hidden_layers=arch.text_layers, num_attention_heads=4, max_position_embeddings=arch.max_length,
        projection_dim=arch.text_hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu"))


def build_zero_t5(arch: DitArch, vocab_size: int) -> torch.nn.Module:
    """A ``T5EncoderModel`` whose output is zero for any input (no blocks; final RMS norm of weight 0), of width
    ``joint_dim``: the pipeline's T5 slot filled with what it uses when there is no T5 (6k parameters)."""
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=arch.joint_dim, d_kv=8, d_ff=8, num_layers=0, num_heads=1,
                                 pad_token_id=1, eos_token_id=1, decoder_start_token_id=0))
    torch.nn.init.zeros_(t5.encoder.final_layer_norm.weight)
    return t5.requires_grad_(False)


def build_models(arch: DitArch, vocab_size: int) -> dict[str, torch.nn.Module]:
    """Randomly initialized VAE (the UNet demo model's architecture), two CLIP text encoders and the transformer;
    the zero T5."""
    return {"vae": build_vae(arch.unet_arch), "text_encoder": build_text_encoder(arch, vocab_size),
            "text_encoder_2": build_text_encoder(arch, vocab_size), "text_encoder_3": build_zero_t5(arch, vocab_size),
            "transformer": build_transformer(arch)}


def build_scheduler(arch: DitArch) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=arch.shift)


def save_dit_pipeline(models: dict[str, torch.nn.Module], tokenizer: Any, arch: DitArch, folder: Path,
                      info: dict[str, Any] | None = None) -> Path:
    """Write a ``StableDiffusion3Pipeline`` folder atomically (weights rounded to fp16, stored as fp32 like
    demo-sd: diffusers' and transformers' default load then runs on CPU, and a fp16 load is the same model)."""
    from diffusers import StableDiffusion3Pipeline

    half = {k: copy.deepcopy(m).to(torch.float16).to(torch.float32).eval() for k, m in models.items()}
    pipe = StableDiffusion3Pipeline(transformer=half["transformer"], scheduler=build_scheduler(arch), vae=half["vae"],
                                    text_encoder=half["text_encoder"], tokenizer=tokenizer,
                                    text_encoder_2=half["text_encoder_2"], tokenizer_2=copy.deepcopy(tokenizer),
                                    text_encoder_3=half["text_encoder_3"], tokenizer_3=copy.deepcopy(tokenizer))
    meta = {"format": DEMO_FORMAT, "family": "sd3", "resolution": arch.resolution, "arch": asdict(arch),
            **world_meta(), **(info or {})}
    return write_pipeline_folder(pipe, Path(folder), meta)


def build_demo_dit_pipeline(folder: str | Path, seed: int = 0, arch: DitArch | None = None) -> Path:
    """A random-weight DiT demo pipeline folder with the shipped architecture (tests, and code that needs the
    layout before the trained one exists). Its VAE has ``scaling_factor`` 1 and ``shift_factor`` 0."""
    arch = arch or DitArch()
    torch.manual_seed(seed)
    tok = build_tokenizer(arch.max_length)
    models = build_models(arch, len(tok))
    models["vae"].register_to_config(scaling_factor=1.0, shift_factor=0.0)
    return save_dit_pipeline(models, tok, arch, Path(folder), {"trained": False})


# ---------------------------------------------------------------------------------------------------- forward
def zero_tokens_processor(copies: int) -> ZeroContextJointAttnProcessor:
    """SD3 joint attention where the LAST context token stands for ``copies`` identical zero tokens: ``softmax`` over
    ``[x, c, z*copies]`` equals ``softmax`` over ``[x, c, z]`` with ``ln(copies)`` added to ``z``'s logit (the
    library's :mod:`lora_diffusion.zero_context` processor with its bias fixed, since training passes one zero row)."""
    proc = ZeroContextJointAttnProcessor()
    proc.log_copies = math.log(copies)
    return proc


def encode_text(encoders: list[torch.nn.Module], ids: torch.Tensor, joint_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` gives without T5, minus the zero tokens: the penultimate
    hidden states of both CLIP encoders side by side (padded to ``joint_dim``) and their pooled projections.
    ids: (b, max_length) -> (b, max_length, joint_dim), (b, 2 * projection_dim)."""
    outs = [te(ids, output_hidden_states=True) for te in encoders]
    hidden = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    hidden = F.pad(hidden, (0, joint_dim - hidden.shape[-1]))
    return hidden, torch.cat([o.text_embeds for o in outs], dim=-1)


def training_forward(transformer: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                     pooled: torch.Tensor) -> torch.Tensor:
    """The transformer as the stock pipeline calls it with ``copies`` zero context tokens appended, run with one
    (the transformer's attention processors must be :func:`zero_tokens_processor`'s)."""
    zero = context.new_zeros(context.shape[0], 1, context.shape[2])
    return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=torch.cat([context, zero], 1),
                       pooled_projections=pooled, return_dict=False)[0]


def sample_sigmas(n: int, cfg: DitTrain, shift: float, g: torch.Generator) -> torch.Tensor:
    """sigma = shift*u / (1 + (shift-1)*u), u = sigmoid(N(mean, std)): SD3's logit-normal sampling through the
    scheduler's own shift (the inference steps are ``shift`` applied to an even grid)."""
    u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=g))
    return shift * u / (1 + (shift - 1) * u)


# ---------------------------------------------------------------------------------------------------- trainer
class DitPretrainer(Pretrainer):
    """Reuses the UNet pretrainer's latent bank, tokenizer, progress/checkpoint timing and measurement."""

    def __init__(self, arch: DitArch, cfg: DitTrain, out: Path, max_minutes: float | None, evaluator: Path | None,
                 init_from: Path, device: str = "cpu") -> None:
        self.arch, self.cfg, self.out, self.t0 = arch, cfg, out, time.time()  # type: ignore[assignment]
        self.device, self.max_minutes, self.evaluator_path = torch.device(device), max_minutes, evaluator
        self.ckpt_file = out / "checkpoint.pt"
        self.tokenizer = build_tokenizer(arch.max_length)
        torch.manual_seed(cfg.seed)
        self.models = {k: m.to(self.device) for k, m in build_models(arch, len(self.tokenizer)).items()}
        self.stage, self.step, self.seconds = "dit", 0, 0.0
        self.metrics: dict[str, Any] = {}
        self.latent_shift, self.latent_scale = 0.0, 1.0
        self.init_from = init_from
        self.scaling_factor = self._init_from_unet_demo(init_from)  # the bank's cache key (which VAE encoded it)
        self.trained = [self.models["transformer"], self.models["text_encoder"], self.models["text_encoder_2"]]
        self.opt = torch.optim.AdamW([
            {"params": self.models["transformer"].parameters(), "lr": cfg.lr},
            {"params": [p for m in self.trained[1:] for p in m.parameters()], "lr": cfg.text_lr}], weight_decay=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg.warmup, cfg.steps))
        self.ema = EMA(self.trained, cfg.ema)
        self.g = torch.Generator().manual_seed(cfg.seed)

    def _init_from_unet_demo(self, folder: Path) -> float:
        """VAE (frozen) and both text encoders' CLIP weights from the UNet demo model; its VAE scaling factor."""
        from safetensors.torch import load_file

        for f in (folder / "vae" / "diffusion_pytorch_model.safetensors", folder / "text_encoder" / "model.safetensors"):
            if not f.is_file():
                raise SystemExit(f"--init-from: {f} is missing; the DiT demo model starts from the UNet demo model's "
                                 f"VAE and text encoder (python -m training.pretrain_demo builds it)")
        from transformers import CLIPTextModel

        self.models["vae"].load_state_dict(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"))
        text = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()  # transformers 5: no text_model level
        for k in ("text_encoder", "text_encoder_2"):
            try:
                self.models[k].text_model.load_state_dict(text)
            except RuntimeError as e:
                raise SystemExit(f"--init-from: {folder / 'text_encoder'} does not match --text-hidden/--text-layers/"
                                 f"--max-length ({str(e)[:300]})") from e
        self.models["vae"].requires_grad_(False).eval()
        return float(json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"])

    # -- checkpoints
    def save(self) -> None:
        state = {"arch": asdict(self.arch), "train": asdict(self.cfg), "stage": self.stage, "step": self.step,
                 "models": {k: m.state_dict() for k, m in self.models.items()}, "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "ema": self.ema.state_dict(), "metrics": self.metrics,
                 "latent": (self.latent_shift, self.latent_scale), "rng": rng_state(self.g),
                 "seconds": self.seconds + time.time() - self.t0}
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_save(state, self.ckpt_file)
        log.info("checkpoint: stage %s step %d -> %s", self.stage, self.step, self.ckpt_file)

    def load(self) -> None:
        if not self.ckpt_file.is_file():
            raise SystemExit(f"--resume: no checkpoint at {self.ckpt_file}")
        state = torch.load(self.ckpt_file, map_location="cpu", weights_only=False)
        check_same_arch(state["arch"], asdict(self.arch))
        for k, m in self.models.items():
            m.load_state_dict(state["models"][k])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.ema.load_state_dict(state["ema"])
        self.stage, self.step, self.metrics = state["stage"], state["step"], state.get("metrics", {})
        self.latent_shift, self.latent_scale = state["latent"]
        set_rng_state(state["rng"], self.g)
        self.seconds = state.get("seconds", 0.0)
        log.info("resumed: stage %s step %d", self.stage, self.step)

    # -- training
    def latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """``shift_factor``/``scaling_factor`` from the bank: sampled latents -> zero mean, unit variance."""
        z = mean[:4096].float() + std[:4096].float() * torch.randn(mean[:4096].shape, generator=self.g)
        self.latent_shift = float(z.mean())
        self.latent_scale = float(1.0 / (z - self.latent_shift).std())
        self.metrics["latents"] = {"shift_factor": round(self.latent_shift, 5), "scaling_factor": round(self.latent_scale, 5)}
        log.info("latents: shift_factor %.4f scaling_factor %.4f", self.latent_shift, self.latent_scale)

    def loss(self, lat: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """Rectified flow: x_s = (1-s) x0 + s eps, the transformer predicts eps - x0 at timestep 1000 s."""
        a, cfg = self.arch, self.cfg
        noise = self._randn(lat.shape)
        sigma = sample_sigmas(len(lat), cfg, a.shift, self.g).to(self.device)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * lat + s * noise
        context, pooled = encode_text([self.models["text_encoder"], self.models["text_encoder_2"]], tok, a.joint_dim)
        pred = training_forward(self.models["transformer"], noisy, 1000 * sigma, context, pooled)
        return F.mse_loss(pred, noise - lat)

    def train_dit(self) -> bool:
        cfg = self.cfg
        mean, std, ids = self.latent_bank()
        if self.step == 0 and not self.metrics.get("latents"):
            self.latent_stats(mean, std)
        empty = self.tokenize([""])[0]
        tr = self.models["transformer"]
        tr.set_attn_processor(zero_tokens_processor(self.arch.t5_tokens))
        for m in self.trained:
            m.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="dit", dynamic_ncols=True)
        ema_loss = None
        while self.step < cfg.steps:
            idx = torch.randint(0, len(mean), (cfg.batch,), generator=self.g)
            lat = mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=self.g)
            lat = ((lat - self.latent_shift) * self.latent_scale).to(self.device)
            tok = ids[idx].clone()
            tok[torch.rand(len(idx), generator=self.g) < cfg.cond_drop] = empty
            loss = self.loss(lat, tok.to(self.device))
            ema_loss, go_on = self._advance(loss, self.opt, self.sched, self.trained, bar, ema_loss)
            if not go_on:
                return False
        return self._finish_stage(bar, "export")

    def export(self, folder: Path, measure_n: int) -> Path:
        self.ema.swap()  # export the averaged weights
        try:
            self.models["vae"].register_to_config(scaling_factor=self.latent_scale, shift_factor=self.latent_shift)
            info = {"trained": True, "init_from": str(self.init_from), "train_config": asdict(self.cfg),
                    "train_seconds": round(self.seconds + time.time() - self.t0), "trained_steps": self.step or self.cfg.steps,
                    "metrics": self.metrics}
            save_dit_pipeline(self.models, self.tokenizer, self.arch, folder, info)
        finally:
            self.ema.swap()
        log.info("saved the pipeline to %s", folder)
        self.record_generation(folder, measure_n)
        return folder


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p, "outputs/pretrain_demo_dit", DEMO_DIT_DIRNAME)
    p.add_argument("--init-from", type=Path, default=None,
                   help=f"UNet demo model whose VAE and text encoder start this one (default assets/{DEMO_MODEL_DIRNAME})")
    _add_dataclass_flags(p, DitArch)
    _add_dataclass_flags(p, DitTrain)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    arch = DitArch(**{f.name: getattr(a, f.name) for f in fields(DitArch)})
    cfg = DitTrain(**{f.name: getattr(a, f.name) for f in fields(DitTrain)})
    out = a.out or Path("outputs/pretrain_demo_dit")
    folder = a.model_dir or assets_dir() / DEMO_DIT_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    tr = DitPretrainer(arch, cfg, out, a.max_minutes, a.evaluator, a.init_from or assets_dir() / DEMO_MODEL_DIRNAME, a.device)
    if a.resume:
        tr.load()
    elif tr.ckpt_file.exists():
        raise SystemExit(f"{tr.ckpt_file} exists: pass --resume to continue it, or another --out")
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in tr.models.items()}
    log.info("parameters: %s (fp32 %.1f MB)", n_params, 4 * sum(n_params.values()) / 2**20)
    if tr.stage == "dit" and not tr.train_dit():
        tr.save()
        log.warning("stopped by --max-minutes at step %d; continue with --resume", tr.step)
        if not a.export_on_stop:
            return 3
        log.info("--export-on-stop: exporting the partly trained model (trials)")
    tr.export(folder, a.measure)
    log.info("done in %.1f min this session; metrics: %s", (time.time() - tr.t0) / 60, json.dumps(tr.metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
