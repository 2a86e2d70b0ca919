"""Diffusion-specific building blocks of the trainer: model, adapter, optimizer, data, validation, outputs."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lora_diffusion as ld
from lora_diffusion import embeddings as ld_emb
from lora_diffusion.embeddings import TrainableTokens
from lora_diffusion.families import FAMILIES, denoiser, family_of
from lora_diffusion.generate import _slug, generate, install_timestep_hook, load_pipeline, remove_timestep_hook
from lora_diffusion.io import embeddings as emb_io
from lora_diffusion.zero_context import collapse_zero_context

from . import init_adapter, lora_drop
from .config import NO_ADAPTER, ConfigError, TLoRAConfig, settle_family, with_rank_spec
from .data import (
    DataError,
    ExampleSampler,
    ImageSet,
    check_single_token,
    expand_prompts,
    find_images,
    parse_color_pairs,
    read_captions,
    subject_phrase,
)
from .objectives import Conditioner

log = logging.getLogger(__name__)
ADAPTER = "default"  # the name the trained adapter (and its placeholder tokens) has in the pipeline
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- pre-flight checks (before any model is loaded) ---
def check_output_dir(path: str | Path) -> Path:
    """Create the folder and prove it is writable."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output_dir {out}: not writable ({e.strerror or e})") from None
    return out


def preflight(cfg: TLoRAConfig) -> list[Path]:
    """Output folder, data folders and optional features; returns the instance image files."""
    check_output_dir(cfg.checkpoint.output_dir)
    images = find_images(cfg.data.instance_data_dir, cfg.data.one_image)
    if cfg.data.with_prior_preservation and not cfg.data.num_class_images:
        find_images(cfg.data.class_data_dir, None, "--class_data_dir")
    if cfg.data.with_prior_preservation and cfg.data.num_class_images and not cfg.data.class_data_dir:
        raise ConfigError("--num_class_images: name the folder the class images go to (--class_data_dir)")
    if cfg.optim.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if cfg.model.attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ConfigError("--attention xformers: xformers is not installed (pip install xformers)")
    if cfg.validation.validation_prompts is not None:
        expand_prompts(cfg.validation.validation_prompts, "x")
    check_flow_options(cfg)
    return images


def check_flow_options(cfg: TLoRAConfig) -> None:
    """Flux/SD3: what this trainer does not do on a transformer yet, refused before anything is loaded."""
    family = cfg.model.model_family
    if family not in FAMILIES or not FAMILIES[family].flow:
        return
    sd, text = "SD/SDXL UNets", "SD/SDXL UNets and SD3"  # pivotal tuning: CLIP encoders (Flux's prompt is T5's)
    unsupported = [(cfg.embedding.train_embedding and family == "flux", "--train_embedding (pivotal tuning)", text),
                   (cfg.embedding.text_encoder_targets and family == "flux", "--text_encoder_targets", text),
                   (cfg.adapter.variant == lora_drop.VARIANT, "--variant loradrop", sd),
                   (cfg.model.attention == "xformers", "--attention xformers", sd),
                   (cfg.data.with_prior_preservation and cfg.data.num_class_images, "--num_class_images", sd)]
    for bad, flag, where in unsupported:
        if bad:
            raise ConfigError(f"{flag}: {where} only for now; the model is a {family} transformer")


# --- model and adapter ---
def adapter_spec(cfg: TLoRAConfig) -> ld.AdapterSpec:
    a = cfg.adapter
    options = dict(a.adapter_options)
    if a.variant == "tlora":
        options.update(min_rank=a.min_rank, rank_exponent=a.alpha_rank_scale, sig_type=a.sig_type,
                       ortho=a.trainer_type == "ortho_lora")
    targets: str | list[str] = a.targets if a.targets in ld.PRESETS else [t.strip() for t in a.targets.split(",")]
    spec = ld.AdapterSpec(variant=a.variant, rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout,
                          targets=targets, seed=cfg.run.seed, options=options)
    return with_rank_spec(spec, a.rank_spec)


def load_base(cfg: TLoRAConfig) -> Any:
    m = cfg.model
    drop = {"text_encoder_3": None, "tokenizer_3": None} if m.drop_t5 else None
    pipe = load_pipeline(m.pretrained_model_name_or_path, torch.float32, m.revision, m.single_file_config,
                         m.pretrained_vae_model_name_or_path, components=drop)
    pipe.set_progress_bar_config(disable=True)
    found = family_of(pipe).name
    if settle_family(cfg, found):  # --model_family auto guessed from the name: the loaded pipeline says
        check_flow_options(cfg)
    if found != m.model_family and not (found in ("sd", "sdxl") and m.model_family in ("sd", "sdxl")):
        raise ConfigError(f"--model_family {m.model_family}: the model '{m.pretrained_model_name_or_path}' is a "
                          f"{type(pipe).__name__} ({found}); pass --model_family {found} or auto")
    m.model_family = found
    for comp in ld.components(pipe).values():
        comp.requires_grad_(False)
    return pipe


def default_resolution(pipe: Any) -> int:
    family = family_of(pipe).name
    if family in ("sdxl", "flux"):
        return 1024
    return int(denoiser(pipe).config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast a model to ``dtype`` except its adapters (trainable weights stay fp32)."""
    if dtype == torch.float32:
        return
    adapters = [m for m in model.modules() if isinstance(m, ld.Adapter)]
    shared = getattr(model, "lora_shared", None)
    model.to(dtype)
    for m in adapters:
        m.float()
    if shared is not None:
        shared.float()


def add_placeholder(pipe: Any, cfg: TLoRAConfig) -> TrainableTokens | None:
    """With --train_embedding: the placeholder's new token(s) in the tokenizer(s), initialized, and trainable.
    Those an --init_adapter file brought (``load_init_adapter``) start from its vectors instead."""
    e, d = cfg.embedding, cfg.data
    if init_adapter.placeholders(pipe):
        return init_adapter.file_tokens(pipe, cfg)
    if not e.train_embedding:
        return None
    source = f"--placeholder_token {d.placeholder_token!r}"
    try:
        init = e.initializer_token or d.class_name.split()[-1] if (e.initializer_token or d.class_name) else None
        vectors = ld_emb.init_vectors(pipe, init, e.num_vectors,
                                      "--initializer_token" if e.initializer_token else "--class_name")
        placeholder = ld_emb.TokenEmbeddings(d.placeholder_token, vectors)
        ld_emb.apply_embeddings(pipe, ADAPTER, [placeholder], source, allow_existing=e.allow_existing_token)
    except ld_emb.EmbeddingError as err:
        raise ConfigError(str(err)) from None
    log.info("placeholder %s: %d vector(s) initialized from %s, lr %g%s", placeholder.names, e.num_vectors,
             repr(init) if init else "the vocabulary mean", e.embedding_lr,
             f", trained for {e.embedding_steps} steps" if e.embedding_steps is not None else "")
    return ld_emb.TrainableTokens(pipe, ADAPTER)


def add_text_adapter(pipe: Any, cfg: TLoRAConfig) -> list[nn.Module]:
    """--text_encoder_targets: a LoRA of rank --lora_rank on each text encoder; returns the adapted encoders.
    An encoder that got its adapter from the --init_adapter file continues that one."""
    targets = cfg.embedding.text_encoder_targets
    if not targets:
        return []
    loaded = list(init_adapter.text_encoders_with(pipe).values())
    a = cfg.adapter
    spec = ld.AdapterSpec(variant="lora", rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout,
                          targets=targets if targets in ld.PRESETS else [t.strip() for t in targets.split(",")],
                          seed=cfg.run.seed)
    out = []
    for role in ld_emb.ENCODERS:
        te = getattr(pipe, role, None)
        if te is not None and te in loaded:
            log.info("text encoder %s: the adapter of --init_adapter %s (%d modules)", role, cfg.adapter.init_adapter,
                     len(ld.api.model_state(te).modules[ADAPTER]))
            ld.mark_trainable(te, [ADAPTER])
            out.append(te)
        elif te is not None:
            names = ld.add_adapter(te, spec, ADAPTER)
            log.info("text encoder %s: LoRA rank %d on %d modules", role, a.lora_rank, len(names))
            out.append(te)
    return out


def add_adapter(pipe: Any, cfg: TLoRAConfig, device: torch.device) -> nn.Module:
    """The UNet's (Flux/SD3: transformer's) adapter, dtype, device and attention (LoRA-drop's adapter comes later:
    ``add_loradrop``)."""
    unet = denoiser(pipe)
    if cfg.adapter.init_adapter or cfg.adapter.variant not in (NO_ADAPTER, lora_drop.VARIANT):
        if cfg.adapter.init_adapter:  # continue from a file (e.g. a squeezed LoRA): its spec and weights, trainable
            if ADAPTER not in ld.list_adapters(unet):  # load_init_adapter put it there with the file's other parts
                ld.load_adapter(unet, cfg.adapter.init_adapter, name=ADAPTER, trainable=True)
            names = ld.api.model_state(unet).modules["default"]
        else:
            names = ld.add_adapter(unet, adapter_spec(cfg))  # raises before touching the model on a bad rank/target
        n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        log.info("%s rank %d on %d modules: %.2fM trainable parameters", cfg.adapter.variant, cfg.adapter.lora_rank,
                 len(names), n / 1e6)
    dtype = DTYPES[cfg.model.mixed_precision]
    cast_frozen(unet, dtype)
    for comp in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")):
        if comp is not None:  # a text-encoder adapter (--text_encoder_targets) trains in fp32 like the UNet's
            cast_frozen(comp, dtype)
            comp.to(device)
    pipe.vae.to(device, torch.float32)  # fp32 VAE: no fp16 NaNs (sd-scripts --no_half_vae)
    unet.to(device)
    if not family_of(pipe).flow:  # the transformers keep their own (SDPA) joint-attention processors
        set_attention(unet, cfg.model.attention, device)
    elif collapse_zero_context(unet):  # SD3 without T5: its 256 zero context tokens run as one (exact)
        log.info("SD3: zero context tokens (T5 dropped, or a zero stand-in) run as one with a ln(k) logit bias")
    if cfg.model.gradient_checkpointing and cfg.adapter.variant != lora_drop.VARIANT:  # recomputation sees the
        ld.enable_gradient_checkpointing(unet)  # timestep its forward saw
    return unet


def add_loradrop(pipe: Any, cfg: TLoRAConfig, cond: Conditioner, resolution: int, accelerator: Any,
                 resume: bool) -> list[str]:
    """--variant loradrop: the importance stage with this trainer's denoising loss on a stratified sample
    (``--lora_drop_samples`` micro-batches from the training images, micro-batch k at a timestep drawn in the k-th
    of as many equal strata of [0, T)), then the LoRA-drop adapter (training/lora_drop.py)."""
    from diffusers import DDPMScheduler

    from .objectives import FixedTimestepObjective

    unet, args, spec = pipe.unet, cfg.lora_drop, adapter_spec(cfg)

    def make() -> lora_drop.DropPlan:
        k, big_t = args.lora_drop_samples, int(pipe.scheduler.config.num_train_timesteps)
        draw = ExampleSampler(cond.sets[False], cfg.data.train_batch_size, cfg.run.seed * 1000 + 997, cond.sets[True])
        g = torch.Generator().manual_seed(cfg.run.seed)
        items = [(draw.next_batch(), min(big_t - 1, int((i + float(torch.rand((), generator=g))) * big_t / k)))
                 for i in range(k)]
        objective = FixedTimestepObjective(unet, unet, DDPMScheduler.from_config(pipe.scheduler.config), cond,
                                           cfg.run.seed * 1000 + 998, cfg.data.prior_loss_weight, resolution)
        return lora_drop.importance_stage(accelerator, unet, spec, items, objective, args, cfg.optim.learning_rate,
                                          cfg.run.progress)

    plan = lora_drop.resolve_plan(Path(cfg.checkpoint.output_dir), args, resume, make, accelerator,
                                  lora_drop.matcher(unet, spec, args))
    names = lora_drop.apply_plan(unet, spec, plan)
    if cfg.model.gradient_checkpointing:
        ld.enable_gradient_checkpointing(unet)
    return names


def set_attention(unet: nn.Module, mode: str, device: torch.device) -> None:
    has_xf = importlib.util.find_spec("xformers") is not None
    if mode == "xformers" or (mode == "auto" and has_xf and device.type == "cuda"):
        unet.enable_xformers_memory_efficient_attention()
        log.info("attention: xformers")
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
        log.info("attention: PyTorch SDPA")


def make_optimizer(unet: nn.Module, cfg: TLoRAConfig, tokens: TrainableTokens | None = None,
                   text_encoders: list[nn.Module] = ()) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the adapter's tensors (by role), the text adapters and the placeholder vectors (own lr, no decay)."""
    from diffusers.optimization import get_scheduler

    o = cfg.optim
    ratios = {"B": o.loraplus_lr_ratio} if o.loraplus_lr_ratio else None
    groups = ld.param_groups(unet, o.learning_rate, lr_ratios=ratios, weight_decay=o.adam_weight_decay)
    for te in text_encoders:
        groups += [{**g, "role": f"text_{g['role']}"} for g in
                   ld.param_groups(te, o.learning_rate, lr_ratios=ratios, weight_decay=o.adam_weight_decay)]
    if tokens is not None:
        groups.append({"params": list(tokens.parameters()), "lr": cfg.embedding.embedding_lr, "weight_decay": 0.0,
                       "role": "embedding"})
    kw = {"betas": (o.adam_beta1, o.adam_beta2), "eps": o.adam_epsilon}
    own = ld.variant_optimizer([unet, *text_encoders], groups, lr=o.learning_rate, weight_decay=o.adam_weight_decay,
                               **kw)
    if own is not None:  # a variant's own optimizer (LoRA-FA's projected gradient)
        opt: torch.optim.Optimizer = own
    elif o.use_8bit_adam:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(groups, **kw)
    else:
        opt = torch.optim.AdamW(groups, **kw)
    sched = get_scheduler(o.lr_scheduler, opt, num_warmup_steps=o.lr_warmup_steps, num_training_steps=o.max_train_steps)
    return opt, sched


# --- data ---
@torch.no_grad()
def make_class_images(pipe: Any, cfg: TLoRAConfig, resolution: int, device: torch.device) -> int:
    """Prior preservation (DreamBooth): the base model draws class images until --class_data_dir holds
    --num_class_images, cycling through the '#'-separated --class_prompt; each image gets a ``.txt`` caption.
    Call before any adapter or placeholder is added. Returns how many were drawn."""
    d, v = cfg.data, cfg.validation
    if not (d.with_prior_preservation and d.num_class_images):
        return 0
    folder = Path(d.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = len([p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")])
    need = d.num_class_images - have
    if need <= 0:
        return 0
    prompts = [t.strip() for t in (d.class_prompt or f"a photo of {d.class_name}".strip()).split("#") if t.strip()]
    todo = [prompts[(have + i) % len(prompts)] for i in range(need)]
    log.info("prior preservation: drawing %d class images with the base model into %s", need, folder)
    pipe.to(device)
    for start in range(0, need, 16):
        batch = todo[start:start + 16]
        g = torch.Generator().manual_seed(cfg.run.seed * 100003 + have + start)
        images = pipe(batch, num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale, generator=g,
                      height=resolution, width=resolution).images
        for k, (prompt, im) in enumerate(zip(batch, images)):
            stem = folder / f"class-{have + start + k:05d}"
            im.save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(prompt)
    return need


def build_data(cfg: TLoRAConfig, pipe: Any, images: list[Path], resolution: int, process_index: int,
               device: torch.device) -> tuple[ExampleSampler, Conditioner]:
    d = cfg.data
    check_single_token(pipe.tokenizer, d.placeholder_token)
    if getattr(pipe, "tokenizer_2", None) is not None and family_of(pipe).name != "flux":  # Flux's is T5's
        check_single_token(pipe.tokenizer_2, d.placeholder_token)
    phrase = subject_phrase(d.placeholder_token, d.class_name)
    captions = read_captions(images, phrase)  # per-image .txt captions win over the template
    prompts = captions or expand_prompts(d.prompt_template, phrase)
    inst = ImageSet(images, resolution, prompts, d.center_crop, d.random_flip, per_image=captions is not None)
    inst.hue_jitter, inst.invert_p = d.hue_jitter, d.invert_p
    if d.jitter_prompt_template:
        inst.jitter_prompts = expand_prompts(d.jitter_prompt_template, phrase)
    inst.recolor, inst.recolor_p = d.jitter_color_words, d.recolor_p
    inst.recolor_exclude = parse_color_pairs(d.recolor_exclude)
    if d.recolor_p and not inst.can_repaint():
        log.info("--recolor_p: no image is a flat mix of a subject and a background color its caption names (e.g. "
                 "'a red %s on a white background'); no view is repainted", phrase)
    if d.jitter_color_words and not d.hue_jitter:
        log.warning("--jitter_color_words renames the color words of hue-jittered views, but --hue_jitter is 0")
    classes = None
    class_prompt = None
    if d.with_prior_preservation:
        class_prompt = d.class_prompt or f"a photo of {d.class_name}".strip()
        class_images = find_images(d.class_data_dir, None, "--class_data_dir")
        class_captions = read_captions(class_images, phrase)  # per-image prompts (e.g. drawn by make_class_images)
        if class_captions:
            class_prompt = None
        classes = ImageSet(class_images, resolution, class_captions or [class_prompt], d.center_crop, d.random_flip,
                           per_image=class_captions is not None)
    log.info("%d training image(s) at %d px; %s: %s%s", len(inst), resolution,
             "captions (.txt)" if captions else "prompts", prompts[:4], " ..." if len(prompts) > 4 else "")
    cond = Conditioner(pipe, inst, classes, class_prompt, d.cache_latents, d.cache_text_embeddings)
    cond.max_sequence_length = cfg.model.max_sequence_length
    cond.live_text = bool(cfg.embedding.train_embedding or cfg.embedding.text_encoder_targets)
    cond.warm(device)
    if cond.cache_text and not cond.live_text and family_of(pipe).flow:
        text_encoders_to(pipe, torch.device("cpu"))  # every prompt is cached: T5-XXL & co. wait off the GPU
    return ExampleSampler(inst, d.train_batch_size, cfg.run.seed * 1000 + process_index, classes), cond


def identity(cfg: TLoRAConfig, digest: str, resolution: int) -> dict[str, Any]:
    """What a checkpoint depends on: resuming with any of these changed is refused."""
    a, d, o = cfg.adapter, cfg.data, cfg.optim
    return {"variant": a.variant, "lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha, "targets": a.targets,
            "min_rank": a.min_rank if a.variant == "tlora" else None, "alpha_rank_scale": a.alpha_rank_scale,
            "trainer_type": a.trainer_type if a.variant == "tlora" else None, "sig_type": a.sig_type,
            "adapter_options": a.adapter_options, "base_model": cfg.model.pretrained_model_name_or_path,
            "placeholder_token": d.placeholder_token, "class_name": d.class_name, "prompt_template": d.prompt_template,
            "images": digest, "resolution": resolution, "train_batch_size": d.train_batch_size,
            "with_prior_preservation": d.with_prior_preservation, "seed": cfg.run.seed,
            "gradient_accumulation_steps": o.gradient_accumulation_steps,
            **({"model_family": cfg.model.model_family, "flow": vars(cfg.flow), "drop_t5": cfg.model.drop_t5,
                "max_sequence_length": cfg.model.max_sequence_length} if cfg.model.model_family in ("flux", "sd3") else {}),
            "embedding": {k: v for k, v in vars(cfg.embedding).items() if k != "embedding_steps"},
            **({"rank_pattern": with_rank_spec(adapter_spec(cfg), a.rank_spec).rank_pattern} if a.rank_spec else {})}


# --- validation and outputs ---
def validation_prompts(cfg: TLoRAConfig) -> list[str]:
    v, d = cfg.validation, cfg.data
    if not v.validation_prompts:
        return []
    return expand_prompts(v.validation_prompts, subject_phrase(d.placeholder_token, d.class_name))


def text_encoders_to(pipe: Any, device: torch.device) -> torch.device | None:
    """Move the text encoders (Flux: CLIP-L + T5-XXL, ~9.5 GB in bf16; SD3: + CLIP-G) to ``device``; returns where
    they were (None: no text encoder)."""
    encoders = [m for m in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if m is not None]
    if not encoders:
        return None
    was = next(encoders[0].parameters()).device
    if was != device:
        for m in encoders:
            m.to(device)
    return was


def sample(pipe: Any, cfg: TLoRAConfig, step: int, resolution: int) -> list[tuple[str, Any]]:
    """Validation images at ``step`` written to ``samples/step-<step>/``; returns (prompt, image) pairs."""
    prompts = validation_prompts(cfg)
    if not prompts:
        return []
    v, unet = cfg.validation, denoiser(pipe)
    unet.eval()
    install_timestep_hook(unet, pipe.scheduler.config.num_train_timesteps)
    parked = text_encoders_to(pipe, unet.device)  # offloaded text encoders come back for the prompts
    try:
        with torch.no_grad():
            images = generate(pipe, prompts, v.num_inference_steps, v.guidance_scale, v.validation_seed,
                              v.num_val_imgs_per_prompt, resolution, resolution)
    finally:
        remove_timestep_hook(unet)
        unet.train()
        if parked is not None:
            text_encoders_to(pipe, parked)
    folder = Path(cfg.checkpoint.output_dir) / "samples" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for k, im in enumerate(images):
        prompt = prompts[k // v.num_val_imgs_per_prompt]
        im.save(folder / f"{_slug(prompt)}-{k % v.num_val_imgs_per_prompt}.png")
        pairs.append((prompt, im))
    log.info("step %d: %d validation image(s) in %s", step, len(images), folder)
    return pairs


def adapter_metadata(cfg: TLoRAConfig, step: int, resolution: int) -> dict[str, str]:
    d = cfg.data
    return {"trigger_word": subject_phrase(d.placeholder_token, d.class_name), "placeholder_token": d.placeholder_token,
            "class_name": d.class_name, "base_model": str(cfg.model.pretrained_model_name_or_path or "demo-model"),
            "resolution": str(resolution), "steps": str(step), "prompt_template": d.prompt_template,
            "trainer": "training.train_tlora"}


def save_target(pipe: Any, cfg: TLoRAConfig) -> Any:
    """What the adapter file is written from: the UNet, or the pipeline when it holds tokens or text adapters
    (trained, or kept from the --init_adapter file)."""
    carried = init_adapter.placeholders(pipe) or init_adapter.text_encoders_with(pipe)
    return pipe if cfg.embedding.train_embedding or cfg.embedding.text_encoder_targets or carried else denoiser(pipe)


def save_outputs(pipe: Any, cfg: TLoRAConfig, folder: Path, step: int, resolution: int) -> dict[str, Path]:
    """The canonical adapter file, kohya and diffusers files, and the embedding files of a trained placeholder."""
    name = cfg.adapter.variant
    meta = adapter_metadata(cfg, step, resolution)
    target = save_target(pipe, cfg)
    out = {"canonical": ld.save_adapter(target, folder / f"{name}.safetensors", metadata=meta)}
    if init_adapter.placeholders(pipe):  # trained, or kept from the --init_adapter file
        stem = re.sub(r"[^A-Za-z0-9_-]", "", cfg.data.placeholder_token) or "embedding"
        out["a1111"] = emb_io.save_embeddings(pipe, folder / "embeddings" / f"{stem}.safetensors", ADAPTER, "a1111")
        out["diffusers_emb"] = emb_io.save_embeddings(pipe, folder / f"{name}_emb.safetensors", ADAPTER, "diffusers")
    if "format" not in inspect.signature(ld.save_adapter).parameters or name == NO_ADAPTER:
        return out
    external = pipe if family_of(pipe).flow else target  # a bare transformer's role ('transformer') needs the pipeline
    for fmt, fname in (("kohya", f"{name}.kohya.safetensors"), ("diffusers", "pytorch_lora_weights.safetensors")):
        try:
            out[fmt] = ld.save_adapter(external, folder / fname, metadata=meta, format=fmt)
        except ld.AdapterError as e:  # e.g. a variant the format cannot express
            log.warning("no %s file for variant '%s': %s", fmt, name, e)
    return out


__all__ = ["DataError", "add_adapter", "build_data", "check_output_dir", "identity", "load_base", "make_optimizer",
           "preflight", "sample", "save_outputs"]
