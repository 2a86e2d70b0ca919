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

``--objective composition`` trains on what a blend is for: images that show two LoRAs' content together, with
captions naming both (``<pair_data>/<lora a>+<lora b>/`` images + ``.txt``, e.g. ``a red dotted ring on a blue
background``). Each step draws one such pair, applies both LoRAs through the gate, and takes the denoising loss

    L = MSE(v̂(x_t; caption_ab), target)  (+ --paper_weight · the paper's losses on the same two LoRAs)

The paper's losses only ever show a LoRA its own images, where the other LoRA can only interfere, so damping both
is their cheapest answer and nothing rewards keeping both (docs/autolora.md); this one does. The pairs need not be
the pairs the gates will blend: the gate's parameters are shared by all LoRAs, so gates trained on some pairs are
applied to others with ``--allow-unseen-loras``.

``--texture_loss highpass|spectrum --texture_weight w`` (default highpass, 3; ``--texture_weight 0``: off) adds w x a
detail term on the decoded predicted clean image (training/texture_loss.py) to every denoising loss on a LoRA's (or
a pair's) own caption: a latent MSE is dominated by shape, color and background, and a texture (the style LoRA's
contribution) is a small part of it.

On Flux.1 and SD3/3.5 (``--model`` a diffusers folder or hub id of one) the gates sit on the transformer and the
denoising loss is the T-LoRA trainer's rectified-flow MSE (training/objectives.py ``FlowMatchingObjective``:
x_σ = (1-σ)x0 + σε, target ε - x0, σ drawn as ``--weighting_scheme``/``--flow_shift`` say, the text through the
pipeline's CLIP/T5 encoders with the pooled embedding); the gate's φ(t) gets t = 1000·σ, the scale the timestep
hook hands it when ``blend`` samples. The texture term decodes x̂0 = x_σ - σ v̂ there, weighted by 1 - σ. ``--resolution`` sets the
training size (default: the model's, 1024 on Flux/SD3).

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
from .config import CheckpointArgs, ConfigError, FlowArgs, RunArgs, opt, parse_args, to_yaml
from .data import DataError, ImageSet, files_digest, find_images, read_captions
from .loop import EXIT_STOPPED, LoopConfig, NonFiniteLossError, Reporter, TrainingStopped, fit, make_accelerator
from .objectives import Conditioner, FlowMatchingObjective, FlowSampling, pipeline_shift
from .texture_loss import TEXTURE_LOSSES, flow_texture_loss, texture_loss

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
    pair_data: str | None = opt(None, "composition: folder holding <lora a>+<lora b>/ with images showing both and "
                                "their .txt captions (None: <folder of the first LoRA>/data/pairs)")
    caption_dropout: float = opt(0.3, "probability of an empty caption for the denoising loss (CFG)")
    train_batch_size: int = opt(8, "images per step (half from each of the two LoRAs)")
    resolution: int | None = opt(None, "training resolution in pixels (None: the model's default, e.g. 512 SD1.5, "
                                 "1024 SDXL/Flux/SD3, 64 the demo model)")


OBJECTIVES = ("paper", "composition")


@dataclass
class GateArgs:
    method: str = opt("gated", "gated (AutoLoRA gates per layer, channel and step) | mole (MoLE: softmax gate per "
                               "block, balancing loss; writes mole.safetensors, loadable with ld.load_adapter)",
                      choices=["gated", "mole"])
    balance_weight: float = opt(0.5, "mole: alpha of the balancing loss -sum_i log q_i")
    objective: str = opt("paper", "paper: each LoRA's own images (AutoLoRA's losses); composition: images of two "
                         "LoRAs' content together with combined captions", choices=list(OBJECTIVES))
    paper_weight: float = opt(0.0, "composition: weight of the paper's losses added on the same two LoRAs")
    time_features: int = opt(3, "Fourier features of the timestep in the gate")
    per_role: bool = opt(True, "gated: per-role gate terms (subject/style/other offsets of bias, time weights and "
                               "output weight), so the gate can treat a concept and a style LoRA differently; "
                               "--no-per_role: the paper's gate, every parameter shared by all LoRAs")
    roles: str | None = opt(None, "name=role,... (subject | style | other); None: each file's lora_kind metadata "
                            "(concept -> subject, style -> style, else other), as blend does")
    texture_loss: str = opt("highpass", "a detail term on the decoded predicted clean image beside the denoising loss "
                            "(training/texture_loss.py): highpass (fine-detail error) | spectrum (amplitude spectrum of the "
                            "fine detail: where the texture sits does not matter) | none",
                            choices=list(TEXTURE_LOSSES))
    texture_weight: float = opt(3.0, "weight of --texture_loss (0: off; "
                                     "3 with highpass: composition both-kept 52% -> 66-69% on the demo world, "
                                     "docs/autolora.md)")
    margin: float = opt(0.3, "paper objective: hinge margin m, how far the loss under the other LoRA's caption is "
                        "kept from falling")
    hinge_weight: float = opt(1.0, "paper objective: λ, the weight of the hinge term max(0, m - that loss)")


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
    flow: FlowArgs = field(default_factory=FlowArgs)  # Flux/SD3 only


@dataclass
class LoraData:
    name: str
    path: Path
    sha256: str
    images: list[Path]
    captions: list[str]
    role: str = "other"


def lora_roles(cfg: GateConfig, files: list[Path]) -> dict[str, str]:
    """{stem: role}: ``--roles`` entries win, then the file's ``lora_kind`` (the mapping ``blend`` uses)."""
    from lora_diffusion.blend import KIND_ROLES
    from lora_diffusion.fusion import ROLES
    from lora_diffusion.io.files import read_header

    given = dict(kv.strip().split("=", 1) for kv in (cfg.gates.roles or "").split(",") if "=" in kv)
    stems = {f.stem for f in files}
    bad = {k: v for k, v in given.items() if k not in stems or v not in ROLES}
    if bad or any(kv.strip() and "=" not in kv for kv in (cfg.gates.roles or "").split(",")):
        raise ConfigError(f"--roles {cfg.gates.roles!r}: expected name=role with a name of --loras {sorted(stems)} "
                          f"and a role of {list(ROLES)}")
    return {f.stem: given.get(f.stem) or KIND_ROLES.get(read_header(f)[1].get("lora_kind", ""), "other") for f in files}


def find_data(cfg: GateConfig) -> list[LoraData]:
    """Every LoRA file with its images and captions; errors name the file or folder."""
    files = [Path(p.strip()) for p in (cfg.data.loras or "").split(",") if p.strip()]
    if len(files) < 2:
        raise ConfigError(f"--loras: gates learn to combine LoRAs; give at least 2 files, got {len(files)}")
    for f in files:
        if not f.is_file():
            raise ConfigError(f"--loras: no such file: {f}")
    roles = lora_roles(cfg, files)
    out = []
    for f in files:
        folder = Path(cfg.data.data_root or f.parent / "data") / f.stem
        images = find_images(folder, what=f"images of LoRA '{f.stem}'")
        caps = read_captions(images, f.stem)
        if caps is None:
            raise DataError(f"{folder}: gate training needs each image's caption (<image>.txt); none found")
        out.append(LoraData(f.stem, f, sha256(f), images, caps, roles[f.stem]))
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--loras: two files share a name: {names}")
    return out


@dataclass
class PairData:
    a: int  # indices into the LoRA list
    b: int
    folder: Path
    images: list[Path]
    captions: list[str]


def find_pairs(cfg: GateConfig, data: list[LoraData]) -> list[PairData]:
    """``--objective composition``: every ``<a>+<b>/`` folder of the pair data whose two names are given LoRAs."""
    root = Path(cfg.data.pair_data or data[0].path.parent / "data" / "pairs")
    if not root.is_dir():
        raise ConfigError(f"--pair_data: no folder {root}; --objective composition needs <lora a>+<lora b>/ folders "
                          f"of images showing both LoRAs' content with .txt captions (training.build_demo_library "
                          f"writes them for the demo library)")
    index = {d.name: k for k, d in enumerate(data)}
    out, ignored = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        a, sep, b = folder.name.partition("+")
        if not sep or a not in index or b not in index or a == b:
            ignored.append(folder.name)
            continue
        images = find_images(folder, what=f"images of the pair '{folder.name}'")
        caps = read_captions(images, folder.name)
        if caps is None:
            raise DataError(f"{folder}: composition training needs each image's caption (<image>.txt); none found")
        out.append(PairData(index[a], index[b], folder, images, caps))
    if not out:
        raise ConfigError(f"--pair_data {root}: no <a>+<b>/ folder names two of the LoRAs {sorted(index)} "
                          f"(found {ignored[:8]})")
    if ignored:
        log.info("pair folders not used (not two of the given LoRAs): %s", ignored)
    return out


class PairSampler:
    """Draws a batch: paper objective: (i, j, examples of i, examples of j, caption indices of the other LoRA,
    dropout flags); composition: a pair folder, its examples and dropout flags (and the paper's part if used)."""

    def __init__(self, sets: list[ImageSet], batch_size: int, caption_dropout: float, seed: int,
                 pairs: list[tuple[int, int, ImageSet]] | None = None, paper: bool = True) -> None:
        self.sets, self.half, self.p_drop = sets, max(1, batch_size // 2), caption_dropout
        self.batch, self.pairs, self.paper = batch_size, pairs or [], paper
        self.gen = torch.Generator().manual_seed(seed)

    def _paper(self, i: int, j: int) -> dict[int, Any]:
        side = {}
        for a, b in ((i, j), (j, i)):
            exs = [self.sets[a].draw(self.gen) for _ in range(self.half)]
            other = torch.randint(len(self.sets[b].prompts), (self.half,), generator=self.gen).tolist()
            drop = (torch.rand(self.half, generator=self.gen) < self.p_drop).tolist()
            side[a] = (exs, other, drop)
        return side

    def next_batch(self) -> dict[str, Any]:
        if not self.pairs:
            i, j = torch.randperm(len(self.sets), generator=self.gen)[:2].tolist()
            return {"pair": (i, j), "side": self._paper(i, j)}
        k = int(torch.randint(len(self.pairs), (1,), generator=self.gen))
        i, j, s = self.pairs[k]
        exs = [s.draw(self.gen) for _ in range(self.batch)]
        drop = (torch.rand(self.batch, generator=self.gen) < self.p_drop).tolist()
        return {"pair": (i, j), "both": (k, exs, drop), "side": self._paper(i, j) if self.paper else {}}

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


class GateObjective:
    """paper: denoising loss with each image's caption + hinge on the loss under the other LoRA's caption;
    composition: denoising loss on images of both LoRAs' content with their combined caption (+ the paper's)."""

    def __init__(self, model: Any, unet: Any, scheduler: Any, conds: list[Conditioner], names: list[str],
                 cfg: GateArgs, seed: int, pair_conds: list[Conditioner] | None = None, vae: Any = None,
                 flow: FlowMatchingObjective | None = None) -> None:
        self.model, self.unet, self.sched, self.conds, self.names, self.cfg = model, unet, scheduler, conds, names, cfg
        self.vae = vae
        self.pair_conds = pair_conds or []
        self.gen = torch.Generator().manual_seed(seed)
        self.T = int(scheduler.config.num_train_timesteps)
        self.last: dict[str, float] = {}
        self.flow = flow  # Flux/SD3: the T-LoRA trainer's rectified-flow objective draws σ and calls the transformer
        if flow is not None:
            flow.gen = self.gen  # one generator (checkpointed here) for noise and σ

    def _noisy(self, cond: Conditioner, exs: list[Any], device: torch.device) -> tuple[torch.Tensor, ...]:
        """(x_t, t, target, x0) of the examples' latents with fresh noise and uniform timesteps; Flux/SD3:
        ({x0, ε, t}, t = 1000·σ, None, x0), noised and targeted by the flow objective's ``predict``."""
        stats = [cond.posterior(ex, device) for ex in exs]
        mean, std = torch.cat([m for m, _ in stats]), torch.cat([s for _, s in stats])
        x0 = mean + std * torch.randn(mean.shape, generator=self.gen).to(device)
        noise = torch.randn(mean.shape, generator=self.gen).to(device)
        if self.flow is not None:  # t = 1000·σ: the scale the gate's φ(t) sees at sampling (the timestep hook)
            t = self.flow.timesteps(len(exs)).to(device)
            return {"latents": x0, "noise": noise, "timesteps": t}, t, None, x0
        t = torch.randint(0, self.T, (len(exs),), generator=self.gen).to(device)
        target = self.sched.get_velocity(x0, noise, t) if self.sched.config.prediction_type == "v_prediction" else noise
        return self.sched.add_noise(x0, noise, t), t, target, x0

    def _mse(self, noisy: Any, t: torch.Tensor, text: Any, target: torch.Tensor | None) -> torch.Tensor:
        if self.flow is not None:
            return F.mse_loss(*self._flow(noisy, text))
        return F.mse_loss(self._predict(noisy, t, text), target)

    def _flow(self, x: dict[str, torch.Tensor], text: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(v̂, ε - x0) of the transformer (Flux: both packed into 2x2-patch tokens)."""
        pred, target = self.flow.predict({**x, "text": text[0], "pooled": text[1]})
        return pred.float(), target.float()

    def _predict(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        dtype = next(p for p in self.unet.parameters() if not p.requires_grad).dtype
        return self.model(noisy.to(dtype), t, text.to(dtype)).sample.float()

    def _denoise(self, batch: tuple[torch.Tensor, ...], text: torch.Tensor, parts: dict[str, float],
                 share: float = 1.0) -> torch.Tensor:
        """The denoising MSE (+ texture_weight x the texture term, logged as 'texture') of one noisy batch."""
        noisy, t, target, x0 = batch
        if self.flow is not None:
            pred, target = self._flow(noisy, text)
        else:
            pred = self._predict(noisy, t, text)
        loss = F.mse_loss(pred, target)
        if self.cfg.texture_weight > 0 and self.cfg.texture_loss != "none":
            tex = self._texture(noisy, t, pred, x0)
            parts["texture"] = parts.get("texture", 0.0) + share * float(tex.detach())
            loss = loss + self.cfg.texture_weight * tex
        return loss

    def _texture(self, noisy: Any, t: torch.Tensor, pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The texture term; Flux/SD3: x_σ as ``FlowMatchingObjective.predict`` made it, σ = t / T."""
        if self.flow is None:
            return texture_loss(self.cfg.texture_loss, self.vae, self.sched, noisy, t, pred, x0)
        sigma = t.float() / self.flow.T
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * noisy["latents"] + s * noisy["noise"]
        return flow_texture_loss(self.cfg.texture_loss, self.vae, x_t, sigma, pred, x0)

    def _text(self, cond: Conditioner, prompts: list[str], device: torch.device) -> Any:
        """UNet: the prompt embeddings (B, L, D); Flux/SD3: (embeddings, pooled (B, P))."""
        if self.flow is None:
            return torch.cat([cond.text(p, device)[0] for p in prompts])
        texts = [cond.text(p, device) for p in prompts]
        return torch.cat([e for e, _ in texts]), torch.cat([q for _, q in texts])

    def _paper(self, i: int, j: int, side: dict[int, Any], device: torch.device, parts: dict[str, float]) -> Any:
        total = 0.0
        for a, (exs, other, drop) in side.items():
            b = j if a == i else i
            noisy, t, target, x0 = batch = self._noisy(self.conds[a], exs, device)
            own = ["" if d else self.conds[a].sets[False].prompts[ex.prompt] for ex, d in zip(exs, drop)]
            wrong = [self.conds[b].sets[False].prompts[k] for k in other]
            ld.set_timestep(self.unet, t, self.T)
            l_own = self._denoise(batch, self._text(self.conds[a], own, device), parts, share=0.5)
            l_wrong = self._mse(noisy, t, self._text(self.conds[b], wrong, device), target)
            hinge = F.relu(self.cfg.margin - l_wrong)
            total = total + (l_own + self.cfg.hinge_weight * hinge) / 2
            for k, v in (("denoise", l_own), ("hinge", hinge), ("other_caption", l_wrong)):
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / 2
        return total

    def _both(self, k: int, exs: list[Any], drop: list[bool], device: torch.device,
              parts: dict[str, float]) -> torch.Tensor:
        cond = self.pair_conds[k]
        batch = self._noisy(cond, exs, device)
        prompts = ["" if d else cond.sets[False].prompts[ex.prompt] for ex, d in zip(exs, drop)]
        ld.set_timestep(self.unet, batch[1], self.T)
        return self._denoise(batch, self._text(cond, prompts, device), parts)

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        device = next(self.unet.parameters()).device
        i, j = batch["pair"]
        ld.set_adapters(self.unet, [self.names[i], self.names[j]])
        parts: dict[str, float] = {}
        total = self._paper(i, j, batch["side"], device, parts) if batch["side"] else 0.0
        if "both" in batch:
            l_both = self._both(*batch["both"], device, parts)
            parts["composition"] = float(l_both.detach())
            total = l_both + (self.cfg.paper_weight * total if batch["side"] else 0.0)
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


def _conditioner(pipe: Any, images: list[Path], captions: list[str], res: int, device: Any) -> Conditioner:
    c = Conditioner(pipe, ImageSet(images, res, captions, per_image=True), None, None, True, True)
    c.warm(device)
    return c


GATE_FAMILIES = ("gate training runs on SD1.x/2.x, SDXL, the demo model (DDPM objective), Flux.1 and SD3/3.5 "
                 "(rectified flow), like training.train_tlora")


def check_gate_model(source: str | None, pipe: Any = None) -> str | None:
    """The family (sd | sdxl | flux | sd3) of the loaded pipeline, or without one of a local diffusers folder's
    ``model_index.json`` (None when that cannot tell, e.g. a hub id: checked once loaded). Gate training runs where
    the T-LoRA trainer does; anything else (FLUX.2, which the loader refuses too) gets one error naming the model,
    for a local folder before anything is written."""
    import json

    from lora_diffusion.families import BY_PIPELINE, FamilyError, family_of

    if pipe is not None:
        try:
            return family_of(pipe).name
        except FamilyError as e:
            raise ConfigError(f"--pretrained_model_name_or_path {source or 'demo'}: {e}; {GATE_FAMILIES}") from None
    index = Path(source or "") / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if source and index.is_file() else None
    if name is not None and name not in BY_PIPELINE:
        raise ConfigError(f"--pretrained_model_name_or_path {source}: a {name}; {GATE_FAMILIES}")
    return BY_PIPELINE[name].name if name else None


def _build(cfg: GateConfig, data: list[LoraData], pairs: list[PairData],
           acc: Any) -> tuple[Any, Any, list[Conditioner], list[Conditioner]]:
    from lora_diffusion.families import denoiser
    from lora_diffusion.generate import load_pipeline

    pipe = load_pipeline(cfg.model.pretrained_model_name_or_path, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    check_gate_model(cfg.model.pretrained_model_name_or_path, pipe)
    for comp in ld.components(pipe).values():
        comp.requires_grad_(False)
    den = denoiser(pipe)  # the UNet, or the Flux/SD3 transformer
    for d in data:  # onto the pipeline: a LoRA's pivotal-tuning tokens load with it (its captions name them)
        ld.load_adapter(pipe, d.path, name=d.name)
    opts = ({"time_features": cfg.gates.time_features, "per_role": cfg.gates.per_role} if cfg.gates.method == "gated"
            else {"balance_weight": cfg.gates.balance_weight})
    fusion = fuse(den, [d.name for d in data], method=cfg.gates.method, roles={d.name: d.role for d in data}, **opts)
    log.info("roles: %s", {d.name: d.role for d in data})
    for p in fusion.parameters():
        p.requires_grad_(True)
    dif.cast_frozen(den, dif.DTYPES[cfg.model.mixed_precision])
    for p in fusion.parameters():
        p.data = p.data.float()
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # SDXL, Flux and SD3 have several
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(acc.device, dif.DTYPES[cfg.model.mixed_precision])
    pipe.vae.to(acc.device, torch.float32)
    den.to(acc.device)
    res = cfg.data.resolution or dif.default_resolution(pipe)
    conds = [_conditioner(pipe, d.images, d.captions, res, acc.device) for d in data]
    pair_conds = [_conditioner(pipe, p.images, p.captions, res, acc.device) for p in pairs]
    c0 = conds[0]
    c0.text("", acc.device)
    for c in conds[1:] + pair_conds:  # share the empty caption's encoding
        c._text[""] = c0._text[""]
    return pipe, fusion, conds, pair_conds


def identity(cfg: GateConfig, data: list[LoraData], pairs: list[PairData], flow: str | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (``flow``: the Flux/SD3 family and its σ sampling, absent on UNets
    so their checkpoints keep resuming)."""
    return {"loras": {d.name: d.sha256 for d in data}, "data": files_digest([p for d in data for p in d.images]),
            "base_model": cfg.model.pretrained_model_name_or_path, "time_features": cfg.gates.time_features,
            "margin": cfg.gates.margin, "hinge_weight": cfg.gates.hinge_weight, "batch": cfg.data.train_batch_size,
            "caption_dropout": cfg.data.caption_dropout, "seed": cfg.run.seed, "objective": cfg.gates.objective,
            **({"texture_loss": cfg.gates.texture_loss, "texture_weight": cfg.gates.texture_weight}
               if cfg.gates.texture_weight > 0 else {}),
            **({"per_role": True, "roles": {d.name: d.role for d in data}}
               if cfg.gates.per_role and cfg.gates.method == "gated" else {}),
            **({"paper_weight": cfg.gates.paper_weight, "pairs": files_digest([p for q in pairs for p in q.images])}
               if pairs else {}),
            **({"method": "mole", "balance_weight": cfg.gates.balance_weight} if cfg.gates.method == "mole" else {}),
            **({"family": flow, "flow": vars(cfg.flow), "resolution": cfg.data.resolution} if flow else {})}


def save_learned(fusion: Any, pipe: Any, folder: Path, hashes: dict[str, str], meta: dict[str, str] | None = None) -> Path:
    """gated: ``gates.safetensors`` (the gates + LoRA hashes); mole: ``mole.safetensors`` (a mixture file: the
    LoRAs with their trigger-word embeddings and the gates, ``ld.load_adapter(pipe, path)`` restores all)."""
    if fusion.method.name == "mole":
        return save_mixture(pipe, fusion, folder / "mole.safetensors", metadata={**(meta or {}), "loras": str(hashes)})
    return save_gates(fusion, folder / "gates.safetensors", hashes, meta)


def flow_objective(cfg: GateConfig, pipe: Any, model: Any, conds: list[Conditioner]) -> FlowMatchingObjective | None:
    """Flux/SD3: the T-LoRA trainer's rectified-flow objective with ``cfg.flow``'s σ sampling (None: logit-normal
    for SD3, uniform for Flux) and shift (None: the stock pipeline's at this resolution); UNets: None (DDPM)."""
    from lora_diffusion.families import denoiser, family_of

    fam = family_of(pipe)
    if not fam.flow:
        return None
    f, res = cfg.flow, conds[0].sets[False].resolution
    tokens = (res // (int(getattr(pipe, "vae_scale_factor", 8)) * 2)) ** 2 if fam.name == "flux" else 0
    shift = f.flow_shift if f.flow_shift is not None else pipeline_shift(pipe.scheduler.config, tokens)
    scheme = f.weighting_scheme or ("logit_normal" if fam.name == "sd3" else "uniform")
    log.info("%s: rectified flow, σ %s, shift %.3g", fam.name, scheme, shift)
    return FlowMatchingObjective(model, denoiser(pipe), conds[0], 0, FlowSampling(scheme, f.logit_mean, f.logit_std,
                                 f.mode_scale, shift), resolution=res, guidance=f.train_guidance_scale,
                                 num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps))


def _objective(cfg: GateConfig, pipe: Any, model: Any, data: list[LoraData], pairs: list[PairData],
               conds: list[Conditioner], pair_conds: list[Conditioner]) -> tuple[GateObjective, PairSampler]:
    from diffusers import DDPMScheduler

    from lora_diffusion.families import denoiser

    flow = flow_objective(cfg, pipe, model, conds)
    sched = pipe.scheduler if flow is not None else DDPMScheduler.from_config(pipe.scheduler.config)
    objective = GateObjective(model, denoiser(pipe), sched, conds, [d.name for d in data], cfg.gates,
                              cfg.run.seed * 1000 + 1, pair_conds, pipe.vae, flow)
    sampler = PairSampler([c.sets[False] for c in conds], cfg.data.train_batch_size, cfg.data.caption_dropout,
                          cfg.run.seed, [(p.a, p.b, c.sets[False]) for p, c in zip(pairs, pair_conds)],
                          cfg.gates.paper_weight > 0)
    return objective, sampler


def train(cfg: GateConfig) -> GateResult:
    """Check the inputs, build, (resume,) train the gates, save them."""
    from diffusers.optimization import get_scheduler

    from lora_diffusion.families import denoiser

    check_gate_model(cfg.model.pretrained_model_name_or_path)
    out = dif.check_output_dir(cfg.checkpoint.output_dir)
    data = find_data(cfg)
    pairs = find_pairs(cfg, data) if cfg.gates.objective == "composition" else []
    acc = make_accelerator(cfg.model.mixed_precision, cfg.run.cpu)
    torch.manual_seed(cfg.run.seed)
    pipe, fusion, conds, pair_conds = _build(cfg, data, pairs, acc)
    flow = conds[0].family in ("flux", "sd3")
    if flow and cfg.gates.texture_weight > 0 and cfg.gates.texture_loss != "none":
        log.info("--texture_loss %s x %g on %s: x̂0 = x_σ - σ·v̂ decoded by its VAE, weighted by 1 - σ",
                 cfg.gates.texture_loss, cfg.gates.texture_weight, conds[0].family)
    o = cfg.optim
    opt_ = torch.optim.AdamW(fusion.parameters(), lr=o.learning_rate, weight_decay=o.adam_weight_decay)
    sched = get_scheduler("cosine", opt_, num_warmup_steps=min(20, o.max_train_steps // 10), num_training_steps=o.max_train_steps)
    model, opt_ = acc.prepare(denoiser(pipe), opt_)
    objective, sampler = _objective(cfg, pipe, model, data, pairs, conds, pair_conds)
    ckpt = CheckpointManager(out / "checkpoints", identity(cfg, data, pairs, conds[0].family if flow else None),
                             cfg.checkpoint.checkpoints_total_limit)
    shared = {"params": TrainableParams(denoiser(pipe)), "optimizer": opt_, "lr_scheduler": sched}
    local = {"rng": GlobalRNG(), "data": sampler, "objective": objective}
    start = 0
    if cfg.checkpoint.resume_from_checkpoint:
        path = ckpt.find(cfg.checkpoint.resume_from_checkpoint)
        start = ckpt.load(path, shared, local) if path else 0
    return _run(cfg, out, pipe, fusion, data, pairs, (acc, model, opt_, sched, sampler, objective), ckpt,
                (shared, local), start)


def _run(cfg: GateConfig, out: Path, pipe: Any, fusion: Any, data: list[LoraData], pairs: list[PairData],
         parts: tuple[Any, ...], ckpt: CheckpointManager, state: tuple[dict, dict], start: int) -> GateResult:
    """The loop (progress, checkpoints, Stop) from ``start``, then the validation loss and the gates file."""
    acc, model, opt_, sched, sampler, objective = parts
    shared, local = state
    o = cfg.optim
    reporter = Reporter(out / cfg.run.logging_dir, cfg.run.report_to == "tensorboard")
    hashes = {d.name: d.sha256 for d in data}

    def on_step(step: int, logs: dict[str, float]) -> None:
        reporter.scalars(step, {**logs, **objective.last})
        if step % max(1, o.max_train_steps // 10) == 0:
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in objective.last.items()))
        every = cfg.checkpoint.checkpointing_steps
        if every and step % every == 0:
            ckpt.save(step, shared, local, lambda d: save_learned(fusion, pipe, d, hashes))

    loop = LoopConfig(o.max_train_steps, 1, o.max_grad_norm, "train gates", cfg.run.progress)
    before = validation_loss(objective, sampler)
    try:
        result = fit(acc, model, opt_, sched, sampler, objective, loop, start, [on_step],
                     on_stop=lambda step: ckpt.save_once(step, shared, local,
                                                         lambda d: save_learned(fusion, pipe, d, hashes)))
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
            "trainer": "training.train_gates", "objective": cfg.gates.objective,
            "texture_loss": f"{cfg.gates.texture_loss} x {cfg.gates.texture_weight}",
            "pairs": ",".join(p.folder.name for p in pairs)}
    gates = save_learned(fusion, pipe, out, hashes, meta)
    log.info("gates of %d layers for %s -> %s", len(fusion.combiners), [d.name for d in data], gates)
    return GateResult(result.losses, result.first_step, result.last_step, gates, ckpt.checkpoints(), (before, after))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        usage = "\n\n".join(__doc__.split("\n\n")[:2]) + "\n\nObjectives, losses and outputs: docs/autolora.md."
        cfg, print_config, _ = parse_args(GateConfig, argv, usage, show_defaults=True)
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
