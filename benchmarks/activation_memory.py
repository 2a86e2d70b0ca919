"""Activation memory kept for backward: LoRA vs LoRA-FA (A frozen, so the layer input is not saved).

    python benchmarks/activation_memory.py [--tokens 4096] [--dim 768] [--rank 16]

Two adapted Linear layers around a GELU (an MLP block); counts the bytes autograd saves during the forward
(``torch.autograd.graph.saved_tensors_hooks``), which is what the backward keeps alive, and prints the ratio.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import lora_diffusion as ld


def saved_bytes(variant: str, tokens: int, dim: int, rank: int) -> int:
    net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
    ld.add_adapter(net, ld.AdapterSpec(variant, rank=rank, targets=["0", "2"]))
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(torch.randn(1, tokens, dim))
    return sum(sizes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--rank", type=int, default=16)
    a = p.parse_args()
    got = {v: saved_bytes(v, a.tokens, a.dim, a.rank) for v in ("lora", "lorafa")}
    for v, b in got.items():
        print(f"{v:7s} saved for backward: {b / 2**20:7.1f} MiB")  # noqa: T201
    print(f"lorafa / lora: {got['lorafa'] / got['lora']:.2f}x")  # noqa: T201


if __name__ == "__main__":
    main()
