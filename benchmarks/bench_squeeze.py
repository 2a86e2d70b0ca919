"""LoRA-Squeeze on an SDXL-sized LoRA: error, file size and time of lora_diffusion.squeeze_file, and PEFT's
``convert_to_lora`` (dense ΔW + torch.linalg.svd per module) on a sample of the same modules in the same run.

    python benchmarks/bench_squeeze.py [--rank 128] [--targets 32,16] [--decay 1.0] [--peer-modules 24]

The LoRA is a kohya fp16 file on the real SDXL UNet's attention, feed-forward and projection Linear layers (module
names and shapes from the meta-device SDXL skeleton, the config of tests/fixtures/sdxl-base-unet.json), rank 128,
random factors with a decaying spectrum: ΔW = U diag(σ) Vᵀ, U and V random orthonormal, σ_i = c·i^(−decay)
(i = 1..128; decay 1 by default, the power-law shape trained LoRA spectra roughly follow), c drawn per module so
‖ΔW‖_F varies across modules by ~10x (as layers differ in a trained LoRA). Reported per target rank: total relative
Frobenius error (all modules), the Eckart–Young value expected from the spectrum, file sizes, seconds.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora_diffusion as ld  # noqa: E402
from lora_diffusion.io.bundle import model_view  # noqa: E402
from lora_diffusion.io.files import write_safetensors  # noqa: E402
from lora_diffusion.io.kohya import flat_name  # noqa: E402
from lora_diffusion.io.skeleton import Skeleton  # noqa: E402

LINEAR = [r"re:.*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|proj_in|proj_out|ff\.net\.(0\.proj|2))"]


def spectrum(rank: int, decay: float, scale: float) -> torch.Tensor:
    return scale * torch.arange(1, rank + 1, dtype=torch.float64) ** (-decay)


def make_lora(rank: int, decay: float, path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """A kohya fp16 SDXL LoRA file; returns {module: (down, up)} (fp16 values as written) and the σ per module."""
    sk = Skeleton("sdxl")
    unet = sk.components["unet"]
    view, g = model_view(unet), torch.Generator().manual_seed(0)
    tensors, factors, sigmas = {}, {}, {}
    for name in ld.find_targets(unet, ld.AdapterSpec(targets=LINEAR)):
        info, f = view[name], flat_name("unet", name, "sdxl", unet.config)
        sig = spectrum(rank, decay, 10 ** float(torch.rand((), generator=g)) * 0.05)
        u = torch.linalg.qr(torch.randn(info.out_features, rank, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(info.fan_in, rank, generator=g, dtype=torch.float64)).Q
        down, up = (sig.sqrt()[:, None] * v.T).half(), (u * sig.sqrt()).half()
        tensors[f"{f}.lora_down.weight"], tensors[f"{f}.lora_up.weight"] = down, up
        tensors[f"{f}.alpha"] = torch.tensor(float(rank))  # scale 1
        factors[name], sigmas[name] = (down, up), sig
    write_safetensors(path, tensors, {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": str(rank),
                                      "ss_network_alpha": str(rank)})
    return factors, sigmas


def expected_error(sigmas: dict[str, torch.Tensor], k: int) -> float:
    tot = sum(float((s ** 2).sum()) for s in sigmas.values())
    return math.sqrt(sum(float((s[k:] ** 2).sum()) for s in sigmas.values()) / tot)


def peer(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], names: list[str], k: int) -> tuple[float, float, float]:
    """PEFT convert_to_lora on the sampled modules vs our factored SVD on the same (down, up): (peft s, ours s, max
    |relative error difference|)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.conversion import convert_to_lora

    from lora_diffusion.squeeze import factored_spectrum

    net = torch.nn.ModuleDict({f"m{i}": torch.nn.Linear(factors[n][0].shape[1], factors[n][1].shape[0], bias=False)
                               for i, n in enumerate(names)})
    r = factors[names[0]][0].shape[0]
    model = get_peft_model(torch.nn.Sequential(net), LoraConfig(r=r, lora_alpha=r, target_modules=list(net)))
    with torch.no_grad():
        for i, n in enumerate(names):
            layer = model.base_model.model[0][f"m{i}"]
            layer.lora_A["default"].weight.copy_(factors[n][0].float())
            layer.lora_B["default"].weight.copy_(factors[n][1].float())
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # "already a LoRA adapter": the point of the comparison
        warnings.simplefilter("ignore")
        _, sd = convert_to_lora(model, k)
    t_peft = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = {n: factored_spectrum(factors[n][0], factors[n][1], 1.0) for n in names}
    t_ours = time.perf_counter() - t0
    diff = 0.0
    for i, n in enumerate(names):
        dw = factors[n][1].double() @ factors[n][0].double()
        a = next(v for key, v in sd.items() if f"m{i}.lora_A" in key).double()
        b = next(v for key, v in sd.items() if f"m{i}.lora_B" in key).double()
        e_peft = float((b @ a - dw).norm() / dw.norm())
        e_ours = math.sqrt(ours[n].tail(k) / ours[n].total)
        diff = max(diff, abs(e_peft - e_ours))
    return t_peft, t_ours, diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--targets", default="32,16")
    p.add_argument("--decay", type=float, default=1.0)
    p.add_argument("--peer-modules", type=int, default=24, help="modules (spread over all shapes) for the PEFT run")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "sdxl-r128.safetensors"
        t0 = time.perf_counter()
        factors, sigmas = make_lora(a.rank, a.decay, src)
        print(f"built {len(factors)} modules, rank {a.rank}, σ_i ∝ i^-{a.decay:g}, {src.stat().st_size / 2**20:.1f} MiB "
              f"({time.perf_counter() - t0:.0f} s)")
        names = list(factors)
        sample = names[:: max(1, len(names) // a.peer_modules)][: a.peer_modules]
        print(f"| target rank | total rel. error | Eckart–Young | file MiB (from {src.stat().st_size / 2**20:.1f}) | "
              f"squeeze s | PEFT convert_to_lora s ({len(sample)} modules) | ours s (same) | ours/PEFT | max err diff |")
        for k in [int(x) for x in a.targets.split(",")]:
            out = Path(tmp) / f"r{k}.safetensors"
            rep = ld.squeeze_file(src, out, rank=k, base="sdxl")
            t_peft, t_ours, diff = peer(factors, sample, k)
            print(f"| {k} | {rep.total_error:.4f} | {expected_error(sigmas, k):.4f} | {rep.bytes_after / 2**20:.1f} | "
                  f"{rep.seconds:.1f} | {t_peft:.2f} | {t_ours:.2f} | {t_ours / t_peft:.3g}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
