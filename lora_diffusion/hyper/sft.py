"""T2L end-to-end SFT: the generated LoRA applied functionally inside the frozen LLM, loss on task records,
gradients only to the hypernetwork.

    (A_n, B_n)_{l,m} = hyper(embed(description_n))       one LoRA per record n of the batch
    y_{n,l,m}        = W x_n + s · x_n A_nᵀ B_nᵀ            a forward hook per adapted module (no injection)
    loss             = CE_smooth(logits, labels) + λ · mean_m(mean(A²) + mean(B²))

Charakorn et al. 2025 (arXiv 2506.06105) "SFT" mode; the reference scripts use label smoothing 0.1, an L2 penalty
1e-3 on the generated weights and NEFTune noise α = 5 on the input embeddings (uniform(-1, 1)·α/√(T·d), training
only). ``StaticLoRA`` is an ordinary trainable LoRA with the same interface (it ignores the embedding): the task
LoRA and multi-task LoRA baselines train through exactly the same code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import kaiming_uniform_
from ..core.errors import AdapterError
from .t2l import Slot, T2LConfig, model_slots

Lora = dict[str, tuple[torch.Tensor, torch.Tensor]]
IGNORE = -100


@dataclass
class SFTConfig:
    steps: int = 300
    lr: float = 1e-3  # peak; linear warmup then cosine decay (the paper's 2.5e-5 is for many more steps)
    warmup_frac: float = 0.1
    weight_decay: float = 1e-2
    batch_tasks: int = 4  # tasks per step (one LoRA each)
    per_task: int = 2  # records per task per step
    label_smoothing: float = 0.1
    l2: float = 1e-3  # penalty on the generated weights' mean squares
    neftune_alpha: float = 5.0  # 0 turns NEFTune off
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 20


class StaticLoRA(nn.Module):
    """A plain trainable LoRA (A kaiming, B = 0) with the hypernetwork's interface: ``forward(emb (N, d))`` returns
    the same LoRA for every row. Baselines (one task, multi-task) train through the SFT code with it."""

    def __init__(self, config: T2LConfig, slots: Sequence[Slot]) -> None:
        super().__init__()
        self.config, self.slots = config, list(slots)
        g = torch.Generator().manual_seed(config.seed)
        r = config.rank
        self.A = nn.ParameterList([nn.Parameter(kaiming_uniform_(torch.empty(r, s.in_features), g)) for s in slots])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(s.out_features, r)) for s in slots])

    @classmethod
    def for_model(cls, model: nn.Module, config: T2LConfig) -> StaticLoRA:
        return cls(config, model_slots(model, config.targets))

    @property
    def scaling(self) -> float:
        return self.config.alpha / self.config.rank

    def forward(self, task_embedding: torch.Tensor) -> Lora:
        n = task_embedding.shape[0] if task_embedding.dim() == 2 else None
        return {s.name: (a, b) if n is None else (a.expand(n, *a.shape), b.expand(n, *b.shape))
                for s, a, b in zip(self.slots, self.A, self.B)}

    def generate(self, task_embedding: torch.Tensor | None = None) -> Lora:
        with torch.no_grad():
            return {s.name: (a.detach().clone(), b.detach().clone()) for s, a, b in zip(self.slots, self.A, self.B)}


def _delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s · x Aᵀ Bᵀ; x (N, T, in) with per-row A (N, r, in), B (N, out, r), or shared A (r, in), B (out, r)."""
    if a.dim() == 2:
        return F.linear(F.linear(x, a), b) * s
    if x.dim() != 3 or x.shape[0] != a.shape[0]:
        raise AdapterError(f"per-record LoRA: activations {tuple(x.shape)} vs {a.shape[0]} generated LoRAs; "
                           "expected one LoRA per batch row")
    return torch.einsum("ntr,nor->nto", torch.einsum("nti,nri->ntr", x, a.to(x.dtype)), b.to(x.dtype)) * s


@contextlib.contextmanager
def lora_hooks(model: nn.Module, lora: Lora, scaling: float) -> Iterator[None]:
    """Add ``scaling · x Aᵀ Bᵀ`` to the output of every module in ``lora`` while the context is open (no adapter is
    injected, nothing is copied: gradients flow to whatever produced A and B)."""
    handles = []
    try:
        for name, (a, b) in lora.items():
            mod = model.get_submodule(name)
            handles.append(mod.register_forward_hook(
                lambda m, args, out, a=a, b=b: out + _delta(args[0], a, b, scaling)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def neftune(model: nn.Module, alpha: float, generator: torch.Generator | None = None) -> Iterator[None]:
    """NEFTune (Jain et al. 2023): uniform(-1, 1)·alpha/√(T·d) noise on the input embeddings while open."""
    if alpha <= 0:
        yield
        return

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        t, d = out.shape[-2], out.shape[-1]
        noise = torch.rand(out.shape, generator=generator, device="cpu").to(out) * 2 - 1
        return out + noise * (alpha / math.sqrt(t * d))

    h = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0,
            reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits at the target positions (N, P, V)): next-token CE on labelled positions, the LM head run only
    where some row has a target (``logits_to_keep``). ``reduction="none"`` gives one mean loss per row."""
    labels = batch["labels"][:, 1:]  # (N, T-1): targets of positions 0..T-2
    keep = (labels != IGNORE).any(0).nonzero().flatten()  # (P,)
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    except TypeError:  # a model without logits_to_keep: full logits
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out.logits = out.logits[:, keep]
    logits, tgt = out.logits.float(), labels[:, keep]  # (N, P, V), (N, P)
    ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE, label_smoothing=label_smoothing,
                         reduction="none")  # (N, P)
    mask = (tgt != IGNORE).float()
    per_row = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)
    loss = per_row if reduction == "none" else (ce * mask).sum() / mask.sum().clamp(min=1)
    return loss, logits


def l2_penalty(lora: Lora) -> torch.Tensor:
    return torch.stack([a.pow(2).mean() + b.pow(2).mean() for a, b in lora.values()]).mean()


def sft_loss(model: nn.Module, hyper: nn.Module, batch: dict[str, torch.Tensor], task_emb: torch.Tensor,
             cfg: SFTConfig, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, CE): one LoRA per batch row from ``task_emb`` (N, d), applied by hooks, the frozen model's CE."""
    lora = hyper(task_emb)
    with lora_hooks(model, lora, hyper.scaling), neftune(model, cfg.neftune_alpha if hyper.training else 0.0,
                                                         generator):
        ce, _ = lm_loss(model, batch, cfg.label_smoothing if hyper.training else 0.0)
    return ce + cfg.l2 * l2_penalty(lora), ce


def answer_exact(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) bool: greedy decoding reproduces every target token (teacher-forced argmax == label at all targets).
    ``logits`` as returned by ``lm_loss`` (the positions where some row has a target)."""
    labels = batch["labels"][:, 1:]
    keep = (labels != IGNORE).any(0).nonzero().flatten()
    tgt = labels[:, keep]
    ok = (logits.argmax(-1) == tgt) | (tgt == IGNORE)
    return ok.all(1)
