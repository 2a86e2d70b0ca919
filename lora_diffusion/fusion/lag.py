"""LAG (LoRA-Augmented Generation): per-token, per-layer choice of ONE adapter from a large LoRA library.

Fleshman & Van Durme, "LoRA-Augmented Generation (LAG) for Knowledge-Intensive Language Tasks", arXiv 2507.05346;
SpectR: arXiv 2504.03454; Arrow: Ostapenko et al., arXiv 2405.11157 (PEFT ``ArrowConfig``). No training, no data.

    offline, per adapter i and layer:   s_i·B_i A_i = U_i S_i V_iᵀ  (rank r),   B*_i = U_i S_i / s_i,   A*_i = V_iᵀ
    Arrow filter, per token x:          keep the top k adapters by |a*_{i,1} · x|   (a*_{i,1}: first row of A*_i)
    SpectR rerank (mode "lag"):         i* = argmax_{top k} ‖A*_i x‖₂   (score "delta": ‖ΔW_i x‖₂ = s_i‖S_i ⊙ A*_i x‖)
    output:                             y = W x + s_{i*} · B*_{i*} (A*_{i*} x)      (A*x reused from the rerank)
    mode "arrow" (PEFT's Arrow):        y = W x + Σ_{top k} softmax(|a*_{i,1}·x| / τ)_i · s_i B_i A_i x

k = 1 is Arrow's pick-one, k = n is SpectR. With ``inplace=True`` the alignment is done in place: each adapter's factors
become B*, A* (same ΔW, to rounding) as views into the per-layer stacks the router reads, so a library costs its
own size once (the default keeps an aligned copy and leaves the adapters bit for bit as they were). Routing
is one (T, in) x (in, n) matmul per layer on the stacked a*_{i,1}, then a gather of the k chosen A* (and one B*)
per token. Only low-rank additive adapters (LoRA, rsLoRA, LoRA-FA, SingLoRA) on linear layers can be routed;
anything else is refused before any adapter is changed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.layer import AdaptedLayer
from .base import Combiner, FusionMethod
from .routed import LowRankStack, Route, RoutedCombiner, gather_project, stack_factors

log = logging.getLogger(__name__)
MODES = ("lag", "arrow")
SCORES = ("norm", "delta")
DEFAULT_TOP_K = 20  # the paper's main setting (clamped to the adapters on each layer)


@torch.no_grad()
def spectral_align(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched SVD of B A without forming it: (A* (n, R, in), B* (n, out, R), S (n, R)) with B* A* = B A.

    B A = Qb Rb Raᵀ Qaᵀ (two thin QRs) and Rb Raᵀ = U S Vᵀ (n small R x R SVDs), so B* = Qb U S, A* = Vᵀ Qaᵀ.
    Rows of A* for zero singular values are zeroed (a zero-padded or degenerate adapter adds no direction
    to its SpectR score). Computed in float64, returned in A's dtype.
    """
    a, b = A.double(), B.double()
    qa, ra = torch.linalg.qr(a.transpose(1, 2))  # (n, in, R), (n, R, R)
    qb, rb = torch.linalg.qr(b)  # (n, out, R), (n, R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.transpose(1, 2))  # (n, R, R), (n, R), (n, R, R)
    keep = (s > s[:, :1] * 1e-12).to(s.dtype)  # (n, R)
    a_star = (vh @ qa.transpose(1, 2)) * keep[:, :, None]  # (n, R, in)
    b_star = (qb @ u) * (s * keep)[:, None, :]  # (n, out, R)
    return a_star.to(A.dtype), b_star.to(B.dtype), (s * keep).to(A.dtype)


class LAGCombiner(RoutedCombiner):
    def __init__(self, stack: LowRankStack, S: torch.Tensor, top_k: int, mode: str, temperature: float,
                 score: str) -> None:
        super().__init__(stack)
        self.top_k, self.mode, self.temperature, self.score = min(top_k, len(stack.names)), mode, temperature, score
        self.register_buffer("arrows", stack.A[:, 0, :].contiguous(), persistent=False)  # (n, in): a*_{i,1}
        self.register_buffer("S", S, persistent=False)  # (n, R)

    def route(self, x2: torch.Tensor, ctx: CallContext) -> Route:
        top_v, idx = (x2 @ self.arrows.T).abs().topk(self.top_k, dim=1)  # (T, k): Arrow filter, sign-agnostic
        if self.mode == "arrow":
            return Route(idx, torch.softmax(top_v / self.temperature, dim=1))
        z = gather_project(self.A, x2, idx)  # (T, k, R) = A*_i x for the k candidates
        if self.score == "delta":
            scores = (z * self.S[idx]).norm(dim=-1) * self.s[idx]  # ‖ΔW_i x‖
        else:
            scores = z.norm(dim=-1)  # ‖A*_i x‖
        j = scores.argmax(dim=1, keepdim=True)  # (T, 1): SpectR rerank
        zj = z.gather(1, j[..., None].expand(-1, -1, z.shape[-1]))  # (T, 1, R)
        return Route(idx.gather(1, j), None, zj)


class LAGFusion(FusionMethod):
    name = "lag"
    formula = ("top-k by |a*_i1 . x| (Arrow), then argmax ||A*_i x|| (SpectR): y = y0 + s B*_i A*_i x, one adapter "
               "per token and layer; mode 'arrow': softmax over the top k (PEFT Arrow)")
    paper = "https://arxiv.org/abs/2507.05346"
    models = ("llm",)  # routes tokens of linear layers (conv adapters are refused); not offered for diffusion blends

    @dataclass
    class Options:
        top_k: int | None = None  # Arrow candidates per token (None: min(20, library size); paper: 20, plateau ~5)
        mode: str = "lag"  # "lag": SpectR rerank, one adapter | "arrow": PEFT's softmax mixture of the top k
        temperature: float = 1.0  # Arrow softmax temperature (mode "arrow")
        score: str = "norm"  # SpectR score: "norm" ‖A* x‖ (LAG paper) | "delta" ‖ΔW x‖
        # True: the adapters' own factors become B*, A* (same ΔW to rounding) as views of the router's stack, so the
        # library is held once (large libraries); False: the router keeps an aligned copy, the adapters are untouched
        inplace: bool = False

        def __post_init__(self) -> None:
            if self.mode not in MODES:
                raise AdapterError(f"fusion 'lag': option mode={self.mode!r}; expected one of {MODES}")
            if self.score not in SCORES:
                raise AdapterError(f"fusion 'lag': option score={self.score!r}; expected one of {SCORES}")
            if (self.top_k is not None and int(self.top_k) < 1) or self.temperature <= 0:
                raise AdapterError(f"fusion 'lag': top_k must be >= 1 and temperature > 0; found top_k={self.top_k}, "
                                   f"temperature={self.temperature}")

    def check(self, layers: dict[str, AdaptedLayer], names: list[str]) -> None:
        if self.options.top_k is not None and self.options.top_k > len(names):
            raise AdapterError(f"fusion 'lag': top_k={self.options.top_k} is larger than the library "
                               f"({len(names)} adapters); expected top_k <= {len(names)}")
        for layer in layers.values():
            if any(n in layer.adapters for n in names):
                stack_factors(layer, names, self.name)  # raises naming the first adapter it cannot route

    def prepare(self, layers: dict[str, AdaptedLayer], names: list[str], roles: dict[str, str]) -> None:
        self.check(layers, names)  # everything is checked before any adapter is aligned
        self._stacks: dict[str, tuple[LowRankStack, torch.Tensor]] = {}
        for key, layer in layers.items():
            if any(n in layer.adapters for n in names):
                self._stacks[key] = align_layer(layer, names, self.name, self.options.inplace)

    def make_combiner(self, key: str, layer: AdaptedLayer, names: list[str], roles: dict[str, str]) -> Combiner | None:
        if key not in self._stacks:
            return None
        stack, S = self._stacks.pop(key)
        o = self.options
        k = DEFAULT_TOP_K if o.top_k is None else int(o.top_k)
        return LAGCombiner(stack, S, k, o.mode, float(o.temperature), o.score)


def align_layer(layer: AdaptedLayer, names: Sequence[str], method: str,
                inplace: bool) -> tuple[LowRankStack, torch.Tensor]:
    """Stack and spectrally align the adapters on ``layer``; ``inplace``: plain LoRAs then hold views of the stack."""
    stack = stack_factors(layer, names, method)
    stack.A, stack.B, S = spectral_align(stack.A, stack.B)
    for i, n in enumerate(stack.names if inplace else []):
        ad, r = layer.adapters[n], stack.ranks[i]
        if isinstance(getattr(ad, "lora_A", None), nn.Parameter) and not hasattr(ad, "lowrank_factors") \
                and ad.lora_A.dtype == stack.A.dtype:
            ad.lora_A = nn.Parameter(stack.A[i, :r], requires_grad=False)  # LAG trains nothing
            ad.lora_B = nn.Parameter(stack.B[i, :, :r], requires_grad=False)
    return stack, S


def library_files(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """Adapter files from files and folders (a folder: its ``*.safetensors``, sorted); an error names what is missing."""
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(src.glob("*.safetensors"))
            if not found:
                raise AdapterError(f"LAG library folder {src} holds no *.safetensors adapter files")
            files.extend(found)
        elif src.is_file():
            files.append(src)
        else:
            raise AdapterError(f"LAG library: {src} is neither an adapter file nor a folder")
    return files


def load_library(model: nn.Module, sources: Sequence[str | os.PathLike], **options: Any) -> Any:
    """Load every adapter file of ``sources`` (files or folders; each checked against the base model) and route them
    with LAG (``options``: top_k, mode, temperature, score). The library is aligned in place (held once). If any file
    fails to load or cannot be routed, the adapters loaded so far are removed and the error names the file."""
    from .. import api, llm
    from . import fuse

    names: list[str] = []
    try:
        for path in library_files(sources):
            stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in path.stem) or "adapter"
            name, k = stem, 1
            while name in names or name in api.list_adapters(model):
                k, name = k + 1, f"{stem}_{k + 1}"
            try:
                names.append(llm.load_llm_adapter(model, path, name=name))
            except (AdapterError, OSError, ValueError) as e:
                if str(path) in str(e):
                    raise
                raise AdapterError(f"LAG library file {path}: {e}") from e
        fusion = fuse(model, names, method="lag", **{"inplace": True, **options})
    except Exception:
        if names:
            api.remove_adapters(model, names)
        raise
    log.info("LAG library: %d adapters, %s", len(names), vars(fusion.method.options))
    return fusion


def save_library(model: nn.Module, fusion: Any, path: str | os.PathLike) -> Path:
    """One canonical file with every routed adapter (as aligned), LAG's options and the base model's fingerprint;
    ``load_adapter`` (and ``python -m lora_diffusion.chat --adapter FILE``) restores the routed library."""
    from .. import llm
    from .mixture import save_mixture

    if fusion.method.name != LAGFusion.name:
        raise AdapterError(f"save_library: the fusion is '{fusion.method.name}', not LAG")
    meta = {llm.META_BASE_MODEL: llm.base_name(model),
            llm.META_BASE_CONFIG: json.dumps(llm.base_fingerprint(model), sort_keys=True)}
    return save_mixture(model, fusion, path, metadata=meta)
