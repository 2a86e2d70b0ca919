"""Training-step speed and peak memory on a diffusion transformer: our trainer vs diffusers' DreamBooth-LoRA step (PEFT).

    python benchmarks/bench_dit_trainer.py                              # CPU: Flux.1-dev config, 1 double + 1 single block
    python benchmarks/bench_dit_trainer.py --model sd35-medium --layers 2
    python benchmarks/bench_dit_trainer.py --device cuda --layers 0     # GPU: the full Flux.1-dev transformer, bf16

Both sides build the same transformer from the real config (tests/fixtures/flux1-dev-transformer.json or
sd35-medium-transformer.json; ``--layers N`` keeps N joint blocks and, for Flux, 2N single-stream blocks (0: all),
full width), the same seed, resolution and rank on the attention projections of every block (q/k/v/out and the
context projections add_q/k/v, to_add_out: our ``dit-attn`` preset, PEFT ``target_modules`` with the same names),
batch 1, AdamW, cached latents and text embeddings (random: the step does not depend on their values), under one
``accelerate.Accelerator``:

- ours: ``ld.add_adapter`` + ``training.objectives.FlowMatchingObjective`` + ``training.loop.train_step`` (what
  ``train_tlora.py`` runs each step; the T-LoRA mask for ``--variant tlora``);
- diffusers: ``transformer.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian", ...))``, then
  σ -> (1-σ)x0 + σε -> pack (Flux) -> ``transformer(...)`` -> MSE to ε - x0 -> ``accelerator.backward`` ->
  ``optimizer.step``, as ``examples/dreambooth/train_dreambooth_lora_flux.py`` / ``_sd3.py``.

Each side runs in its own process (alternating, best of ``--rounds``); peak memory is the process's peak RSS on CPU
(and the RSS growth after the model is built, "train") or ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_trainer import best_of_rounds, log_ratios, time_steps  # noqa: E402

log = logging.getLogger("bench_dit_trainer")
FIXTURES = {"flux-dev": "flux1-dev-transformer.json", "sd35-medium": "sd35-medium-transformer.json"}
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
TEXT_TOKENS = 128


def transformer_config(model: str, layers: int) -> dict[str, Any]:
    cfg = {k: v for k, v in json.loads((ROOT / "tests" / "fixtures" / FIXTURES[model]).read_text()).items()
           if not k.startswith("_")}
    if layers:
        cfg["num_layers"] = layers
        if model == "flux-dev":
            cfg["num_single_layers"] = 2 * layers
        if "dual_attention_layers" in cfg:
            cfg["dual_attention_layers"] = [i for i in cfg["dual_attention_layers"] if i < layers]
    return cfg


def build(model: str, cfg: dict[str, Any]) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if model == "flux-dev" else SD3Transformer2DModel
    return cls(**cfg)


class CachedConditioning:
    """Stands in for ``training.objectives.Conditioner`` with its caches filled."""

    def __init__(self, family: str, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> None:
        self.family, self.xl = family, False
        self.latents, self.emb, self.pooled = latents, text, pooled

    def prompt(self, ex: Any) -> str:
        return "p"

    def posterior(self, ex: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents, torch.zeros_like(self.latents)

    def text(self, prompt: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.emb, self.pooled


def inputs(model: str, cfg: dict[str, Any], resolution: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    channels = cfg["in_channels"] // 4 if model == "flux-dev" else cfg["in_channels"]  # Flux: 2x2 packed
    lat = torch.randn(1, channels, resolution // 8, resolution // 8, generator=g).to(device)
    text = torch.randn(1, TEXT_TOKENS, cfg["joint_attention_dim"], generator=g).to(device)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device)
    return lat, text, pooled


def worker(a: argparse.Namespace) -> dict[str, Any]:
    from accelerate import Accelerator

    torch.manual_seed(0)
    acc = Accelerator(mixed_precision=a.mixed_precision, cpu=a.device == "cpu")
    dev, dtype = acc.device, {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.mixed_precision]
    cfg = transformer_config(a.model, a.layers)
    model = build(a.model, cfg)
    model.requires_grad_(False)
    lat, text, pooled = inputs(a.model, cfg, a.resolution, dev)
    step_fn = (ours if a.side == "ours" else diffusers_peft)(a, acc, model, dtype, lat, text, pooled)
    r = time_steps(step_fn, dev, a.warmup, a.steps)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"side": a.side, **r, "trainable": n, "params": sum(p.numel() for p in model.parameters())}


def interleaved(a: argparse.Namespace) -> dict[str, Any]:
    """Both sides in one process on two copies of the model, steps alternating (A B, B A, ...): each pair of
    neighbouring steps sees the same machine load, so the per-pair time ratio is robust where whole runs in turn are
    not (a loaded shared CPU). Returns per-side median s/step and the median and quartiles of the pair ratios."""
    import copy
    import statistics

    from accelerate import Accelerator

    torch.manual_seed(0)
    acc = Accelerator(mixed_precision=a.mixed_precision, cpu=a.device == "cpu")
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.mixed_precision]
    cfg = transformer_config(a.model, a.layers)
    model = build(a.model, cfg).requires_grad_(False)
    twin = copy.deepcopy(model)
    lat, text, pooled = inputs(a.model, cfg, a.resolution, acc.device)
    steps = {"ours": ours(a, acc, model, dtype, lat, text, pooled),
             "diffusers": diffusers_peft(a, acc, twin, dtype, lat, text, pooled)}
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for i in range(a.warmup + a.steps):
        for side in (("ours", "diffusers") if i % 2 else ("diffusers", "ours")):
            t0 = time.perf_counter()
            steps[side]()
            if i >= a.warmup:
                times[side].append(time.perf_counter() - t0)
    if a.profile:
        profile_steps(steps, a.profile)
    ratios = sorted(o / d for o, d in zip(times["ours"], times["diffusers"]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"ours_s": statistics.median(times["ours"]), "diffusers_s": statistics.median(times["diffusers"]),
            "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[-1], "pairs": len(ratios),
            "params": sum(p.numel() for p in model.parameters())}


def profile_steps(steps: dict[str, Any], rows: int) -> None:
    """One step per side under torch.profiler: the ops by self CPU time, and the totals (where time goes)."""
    from torch.profiler import ProfilerActivity, profile

    for side, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ev = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ev) / 1e6
        log.info("profile %s: %.3f s self CPU in %d op calls\n%s", side, total, sum(e.count for e in ev),
                 ev.table(sort_by="self_cpu_time_total", row_limit=rows))


def ours(a, acc, model, dtype, lat, text, pooled):
    import lora_diffusion as ld
    from training.data import Example
    from training.diffusion import cast_frozen
    from training.loop import LoopConfig, train_step
    from training.objectives import FlowMatchingObjective, FlowSampling

    spec = ld.AdapterSpec(variant=a.variant, rank=a.rank, targets="dit-attn",
                          options={"min_rank": a.rank // 2} if a.variant == "tlora" else {})
    ld.add_adapter(model, spec)
    cast_frozen(model, dtype)
    model.to(acc.device)
    if a.gradient_checkpointing:
        ld.enable_gradient_checkpointing(model)
    opt = torch.optim.AdamW(ld.param_groups(model, 1e-4, weight_decay=1e-4))
    prepared, opt = acc.prepare(model, opt)
    family = "flux" if a.model == "flux-dev" else "sd3"
    obj = FlowMatchingObjective(prepared, model, CachedConditioning(family, lat, text, pooled), 0, FlowSampling(),
                                resolution=a.resolution, guidance=1.0)

    class One:
        def next_batch(self) -> list[Any]:
            return [Example(0, 0, 0, False, 0)]

    data, cfg = One(), LoopConfig(max_steps=1)
    return lambda: train_step(acc, prepared, opt, data, obj, cfg, 1)


def diffusers_peft(a, acc, model, dtype, lat, text, pooled):
    import torch.nn.functional as F
    from diffusers import FluxPipeline
    from peft import LoraConfig

    model.to(acc.device, dtype)
    model.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian", target_modules=PEFT_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: trainable LoRA weights in fp32
        p.data = p.data.float()
    if a.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    prepared, opt = acc.prepare(model, opt)
    g = torch.Generator().manual_seed(0)
    dev, flux = lat.device, a.model == "flux-dev"
    b, c, h, w = lat.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, dtype) if flux else None
    txt_ids = torch.zeros(TEXT_TOKENS, 3, device=dev, dtype=dtype)

    def step() -> None:
        noise = torch.randn(lat.shape, generator=g).to(dev)
        sigma = torch.rand((1,), generator=g).to(dev)  # weighting_scheme none
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * lat + sigma.view(-1, 1, 1, 1) * noise
        if flux:
            packed = FluxPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
            pred = prepared(hidden_states=packed, timestep=sigma.to(dtype), guidance=torch.ones(1, device=dev),
                            pooled_projections=pooled.to(dtype), encoder_hidden_states=text.to(dtype), txt_ids=txt_ids,
                            img_ids=img_ids, return_dict=False)[0]
            pred = FluxPipeline._unpack_latents(pred, h * 8, w * 8, 8)
        else:
            pred = prepared(hidden_states=noisy.to(dtype), timestep=sigma * 1000, encoder_hidden_states=text.to(dtype),
                            pooled_projections=pooled.to(dtype), return_dict=False)[0]
        loss = F.mse_loss(pred.float(), (noise - lat).float())
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="flux-dev", choices=sorted(FIXTURES))
    p.add_argument("--layers", type=int, default=None, help="joint blocks kept (Flux: and 2x single); 0 = all "
                   "(default: 1 on CPU, 0 on CUDA)")
    p.add_argument("--resolution", type=int, default=None, help="default: 256 on CPU, 1024 on CUDA")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--variant", default="lora", help="our side's variant (lora = the same method as PEFT's)")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: no (CPU), bf16 (CUDA)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per side; the fastest counts")
    p.add_argument("--interleave", action="store_true", help="time both sides in one process, steps alternating "
                   "(pairwise ratios; no memory figures): for a loaded shared CPU")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="with --interleave: profile one more step "
                   "per side (torch.profiler) and print the top ROWS ops")
    p.add_argument("--_side", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.layers = (0 if cuda else 1) if a.layers is None else a.layers
    a.resolution = a.resolution or (1024 if cuda else 256)
    a.mixed_precision = a.mixed_precision or ("bf16" if cuda else "no")
    torch.set_num_threads(a.threads)
    if a._side:
        a.side = a._side
        print(json.dumps(worker(a)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.interleave:
        r = interleaved(a)
        log.info("%s transformer (%s layers, %.0fM parameters), %d px, rank %d, %s, %d threads, %d step pairs after %d "
                 "warm-up, interleaved in one process", a.model, a.layers or "all", r["params"] / 1e6, a.resolution, a.rank,
                 a.device, a.threads, r["pairs"], a.warmup)
        log.info("median s/step: ours %.3f, diffusers+PEFT %.3f; time ratio ours/diffusers per step pair: median %.3fx "
                 "(quartiles %.3f-%.3f)", r["ours_s"], r["diffusers_s"], r["ratio_median"], r["ratio_q1"], r["ratio_q3"])
        return
    d, o = best_of_rounds(a, __file__)
    log.info("%s transformer (%s layers, %.0fM parameters), %d px, rank %d, %s, precision %s, grad ckpt %s, %d threads "
             "(%d timed steps after %d warm-up, best of %d alternating runs per side)", a.model, a.layers or "all",
             d["params"] / 1e6, a.resolution, a.rank, a.device, a.mixed_precision, a.gradient_checkpointing, a.threads,
             a.steps, a.warmup, a.rounds)
    log.info("| side | variant | s/step | peak MiB | train MiB | trainable |")
    log.info("|---|---|---|---|---|---|")
    for name, r in (("diffusers+PEFT", d), ("ours", o)):
        log.info("| %s | %s | %.3f | %.0f | %.0f | %d |", name, "lora" if name != "ours" else a.variant,
                 r["s_per_step"], r["peak_mib"], r["train_mib"], r["trainable"])
    log_ratios(d, o)


if __name__ == "__main__":
    main()
