"""Load + apply time of a large kohya SDXL LoRA: lora_diffusion.load_adapter vs diffusers' load_lora_weights.

    python benchmarks/bench_formats.py [--rank 32] [--repeats 3] [--reduced]

The UNet is the real SDXL config (fp16, weights left uninitialised: loading a LoRA does not read them), the
LoRA a random kohya file with SGM names (LoCon: attention, feed-forward, projections, resnet and sampler convs,
embeddings) written to a temp folder. Both sides read the same file, from the OS page cache after a warm-up.
Reported: median seconds over ``--repeats`` alternating runs, adapters removed between runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora_diffusion as ld  # noqa: E402
from lora_diffusion.io.bundle import model_view  # noqa: E402
from lora_diffusion.io.files import write_safetensors  # noqa: E402
from lora_diffusion.io.kohya import flat_name  # noqa: E402

LOCON = [r"re:.*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.(0\.proj|2))",
         r"re:.*resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)", r"re:.*(downsamplers|upsamplers)\.0\.conv"]


def build_unet(reduced: bool):
    from diffusers import UNet2DConditionModel

    root = Path(__file__).resolve().parents[1]
    raw = json.loads((root / "tests/fixtures/sdxl-base-unet.json").read_text())
    cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
    if reduced:
        cfg.update(block_out_channels=[64, 128, 128], attention_head_dim=[2, 4, 4])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    return unet.to_empty(device="cpu").to(torch.float16).eval()


def make_lora(unet, rank: int, path: Path) -> int:
    g = torch.Generator().manual_seed(0)
    view, tensors = model_view(unet), {}
    for name in ld.find_targets(unet, ld.AdapterSpec(targets=LOCON)):
        info, f = view[name], flat_name("unet", name, "sdxl", unet.config)
        r = min(rank, info.out_features, info.fan_in)
        tensors[f"{f}.lora_down.weight"] = (torch.randn(r, info.in_features, *info.kernel_size, generator=g) * 0.01).half()
        tensors[f"{f}.lora_up.weight"] = (torch.randn(info.out_features, r, *([1] * info.ndim_kernel), generator=g) * 0.01).half()
        tensors[f"{f}.alpha"] = torch.tensor(float(r / 2))
    write_safetensors(path, tensors, {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": str(rank)})
    return len(tensors)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reduced", action="store_true", help="SDXL block structure at toy width (quick check)")
    a = p.parse_args()
    torch.set_num_threads(2)
    from diffusers import StableDiffusionXLPipeline

    t0 = time.perf_counter()
    unet = build_unet(a.reduced)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sdxl_locon.safetensors"
        n = make_lora(unet, a.rank, path)
        size = path.stat().st_size / 2**20
        print(f"UNet built in {time.perf_counter() - t0:.1f}s; LoRA: {n} tensors, {size:.0f} MiB, rank {a.rank}")
        ours, theirs = [], []
        for i in range(a.repeats + 1):  # the first round warms the page cache and imports
            t = time.perf_counter()
            ld.load_adapter(pipe, path, name="bench")
            t_ours = time.perf_counter() - t
            ld.remove_adapters(pipe, ["bench"])
            t = time.perf_counter()
            pipe.load_lora_weights(str(path), adapter_name="bench")
            t_theirs = time.perf_counter() - t
            pipe.unload_lora_weights()  # removes PEFT's wrappers too
            if i:
                ours.append(t_ours)
                theirs.append(t_theirs)
            print(f"round {i}{' (warm-up)' if not i else ''}: ours {t_ours:.2f}s, diffusers {t_theirs:.2f}s")
    mo, md = statistics.median(ours), statistics.median(theirs)
    print(f"median over {a.repeats}: lora_diffusion.load_adapter {mo:.2f}s, diffusers load_lora_weights {md:.2f}s, "
          f"ratio {mo / md:.2f}x (target <= 0.5x)")


if __name__ == "__main__":
    main()
