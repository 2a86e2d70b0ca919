"""Doc-to-LoRA (D2L): a hypernetwork that reads a document through the frozen LLM and emits a LoRA that
internalizes it, so the model answers questions about the document without it in the prompt.

Charakorn, Cetin, Uesaka, Lange (Sakana AI), ICML 2026, https://arxiv.org/abs/2602.15902
(reference: docs/hyper.md, /work/shared/reference/variants.md §23).

    H_l    = LLM(doc).hidden_states[l]                     (T, hidden) activations entering layer l, frozen base
    C_l    = Linear(LN(H_l)) + E_layer[l]                  (T, d) per-layer context
    Z_l    = Perceiver(latents + E_layer[l] ; C_l)         (r, d) r learned latent queries cross-attend to C_l
    [A_{l,m}ᵀ | B_{l,m}] rows = Z_l W_{l,m} + init_{l,m}   per-layer, per-module head: latent i -> rank row i
    y      = W x + s · B_{l,m} A_{l,m} x,   s = alpha / r  an ordinary LoRA on the shared core

Long documents: split into chunks of ``chunk_tokens``, one LoRA per chunk, concatenated along the rank
(A = [A_1; ...; A_n], B = [B_1 ... B_n], alpha · n so each chunk keeps scale alpha/r), which equals the sum of
the chunk deltas: ΔW = s·Σ_c B_c A_c.
Bias-hyper-init (as T2L): head weights zero, a per-(layer, module) offset holds a fresh LoRA (A kaiming, B = 0),
so the first generated LoRA is the standard zero-delta init for every document.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import adapter_names, remove_adapters
from ..core.adapter import kaiming_uniform_
from ..core.errors import AdapterError, AdapterFileError
from ..core.spec import AdapterSpec
from ..io.files import read_safetensors, write_safetensors
from .t2l import Slot, _key, check_slots, install_lora, model_slots

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "lora-diffusion-d2l"
FINGERPRINT = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size")
LoRA = dict[str, tuple[torch.Tensor, torch.Tensor]]


class DocumentError(AdapterError):
    """An empty document, or one longer than the configured limit."""


@dataclass
class D2LConfig:
    """Hypernetwork shape and document limits. Rank 8 and ``down_proj`` as the paper's main config."""

    rank: int = 8  # = number of Perceiver latents: latent i emits rank row i
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["down_proj"])
    latent_dim: int = 64
    n_blocks: int = 2
    n_heads: int = 4
    chunk_tokens: int = 256  # tokens read per chunk (one LoRA each)
    chunking: bool = True  # False: a document longer than chunk_tokens is refused
    max_chunks: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("rank", "latent_dim", "n_blocks", "n_heads", "chunk_tokens", "max_chunks"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AdapterError(f"D2LConfig.{f}: expected an integer >= 1, found {v!r}")
        if self.latent_dim % self.n_heads:
            raise AdapterError(f"D2LConfig.latent_dim {self.latent_dim} must be divisible by n_heads {self.n_heads}")
        if not self.targets:
            raise AdapterError("D2LConfig.targets: expected at least one module-name pattern")


class PerceiverBlock(nn.Module):
    """Idefics2-style: latents attend to [context; latents], then an MLP; pre-norm, residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))

    def forward(self, lat: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """lat (L, r, d), ctx (L, T, d) -> (L, r, d)."""
        q = self.norm_q(lat)
        kv = torch.cat([self.norm_kv(ctx), q], dim=1)
        lat = lat + self.attn(q, kv, kv, need_weights=False)[0]
        return lat + self.mlp(lat)


class Aggregator(nn.Module):
    """Per-layer activations (L, T, hidden) -> per-layer latents (L, r, d)."""

    def __init__(self, hidden: int, n_layers: int, c: D2LConfig) -> None:
        super().__init__()
        d = c.latent_dim
        self.norm, self.proj = nn.LayerNorm(hidden), nn.Linear(hidden, d)
        self.layer_emb = nn.Embedding(n_layers, d)
        self.latents = nn.Parameter(torch.empty(c.rank, d))
        self.blocks = nn.ModuleList(PerceiverBlock(d, c.n_heads) for _ in range(c.n_blocks))
        self.out_norm = nn.LayerNorm(d)

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        pos = self.layer_emb.weight[:, None, :]  # (L, 1, d)
        ctx = self.proj(self.norm(acts)) + pos  # (L, T, d)
        lat = self.latents[None] + pos  # (L, r, d)
        for b in self.blocks:
            lat = b(lat, ctx)
        return self.out_norm(lat)


class D2L(nn.Module):
    """The hypernetwork for one base model (``hidden`` width, ``n_layers`` layers) and its adapted ``slots``."""

    def __init__(self, config: D2LConfig, slots: Sequence[Slot], hidden: int, n_layers: int,
                 base: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not slots:
            raise AdapterError("D2L: no modules to generate LoRAs for")
        self.config, self.slots, self.hidden, self.n_layers = config, list(slots), hidden, n_layers
        self.base = dict(base or {})  # the base model's config fingerprint, checked on load
        self.types = sorted({s.type for s in slots})
        self.widths = {t: next((s.in_features, s.out_features) for s in slots if s.type == t) for t in self.types}
        bad = [s.name for s in slots if s.layer >= n_layers]
        if bad:
            raise AdapterError(f"D2L: modules {bad[:3]} have a layer index >= the model's {n_layers} layers")
        self.aggregator = Aggregator(hidden, n_layers, config)
        r, d = config.rank, config.latent_dim
        self.head_W, self.init_A, self.init_B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self._seed_init()
        g = torch.Generator().manual_seed(config.seed + 1)
        for t in self.types:
            n_in, n_out = self.widths[t]
            n = len(self._of_type(t))
            self.head_W[_key(t)] = nn.Parameter(torch.zeros(n, d, n_in + n_out))  # per-layer heads, zero at init
            self.init_A[_key(t)] = nn.Parameter(kaiming_uniform_(torch.empty(n, r, n_in), g))
            self.init_B[_key(t)] = nn.Parameter(torch.zeros(n, n_out, r))

    def _seed_init(self) -> None:
        """Seeded, independent of the global RNG: determinism across runs and processes."""
        g = torch.Generator().manual_seed(self.config.seed)
        for name, p in self.aggregator.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, 0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def _of_type(self, t: str) -> list[Slot]:
        return [s for s in self.slots if s.type == t]

    @classmethod
    def for_model(cls, model: nn.Module, config: D2LConfig | None = None) -> D2L:
        config = config or D2LConfig()
        cfg = model.config
        base = {f: getattr(cfg, f) for f in FINGERPRINT if isinstance(getattr(cfg, f, None), (int, str))}
        return cls(config, model_slots(model, config.targets), cfg.hidden_size, cfg.num_hidden_layers, base)

    @property
    def scaling(self) -> float:
        return self.config.alpha / self.config.rank

    # --- generation ---
    def forward(self, acts: torch.Tensor) -> LoRA:
        """One chunk's activations (L, T, hidden) -> {module: (A (r, in), B (out, r))}, differentiable."""
        if acts.dim() != 3 or acts.shape[0] != self.n_layers or acts.shape[2] != self.hidden:
            raise AdapterError(f"D2L: activations of shape {tuple(acts.shape)}; expected "
                               f"({self.n_layers}, tokens, {self.hidden}) (layers, tokens, hidden)")
        z = self.aggregator(acts.to(self.aggregator.proj.weight))  # (L, r, d)
        out: LoRA = {}
        for t in self.types:
            slots, k, n_in = self._of_type(t), _key(t), self.widths[t][0]
            zt = z[torch.tensor([s.layer for s in slots], device=z.device)]  # (S, r, d)
            rows = torch.einsum("srd,sdo->sro", zt, self.head_W[k])  # (S, r, in + out)
            a = rows[..., :n_in] + self.init_A[k]  # (S, r, in)
            b = rows[..., n_in:].transpose(-1, -2) + self.init_B[k]  # (S, out, r)
            for i, s in enumerate(slots):
                out[s.name] = (a[i], b[i])
        return {s.name: out[s.name] for s in self.slots}

    def generate(self, chunks: Sequence[torch.Tensor]) -> LoRA:
        """Per-chunk activations -> one LoRA of rank n_chunks·r (the chunk LoRAs concatenated), no grad."""
        if not chunks:
            raise DocumentError("D2L.generate: no chunks (an empty document?)")
        with torch.no_grad():
            return concat_ranks([self(c) for c in chunks])

    # --- checkpoints ---
    def save(self, path: str | os.PathLike, base_model: str = "") -> Path:
        meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(self.config)),
                "slots": json.dumps([asdict(s) for s in self.slots]), "hidden": str(self.hidden),
                "n_layers": str(self.n_layers), "base_config": json.dumps(self.base, sort_keys=True),
                "base_model": base_model}
        write_safetensors(path, self.state_dict(), meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> D2L:
        """A saved hypernetwork; with ``model``, refuse one made for another base model, naming what differs."""
        tensors, meta = read_safetensors(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise AdapterFileError(f"{path}: not a D2L checkpoint (metadata 'format' is {meta.get('format')!r}; "
                                   f"expected {CHECKPOINT_FORMAT!r})")
        try:
            config = D2LConfig(**json.loads(meta["config"]))
            slots = [Slot(**s) for s in json.loads(meta["slots"])]
            hidden, n_layers, base = int(meta["hidden"]), int(meta["n_layers"]), json.loads(meta["base_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterFileError(f"{path}: metadata 'config'/'slots'/'hidden'/'n_layers' is malformed ({e!r})") from None
        if model is not None:
            check_base(path, meta.get("base_model", ""), base, hidden, n_layers, slots, model, config.targets)
        hyper = cls(config, slots, hidden, n_layers, base)
        hyper.load_state_dict(tensors)
        return hyper.eval()


def check_base(path: str | os.PathLike, base_model: str, base: dict[str, Any], hidden: int, n_layers: int,
               slots: list[Slot], model: nn.Module, targets: Sequence[str]) -> None:
    """Raise naming the config fields (layer count, widths, ...) where the checkpoint's base and ``model`` differ."""
    cfg = getattr(model, "config", None)
    ours = {f: getattr(cfg, f) for f in FINGERPRINT if isinstance(getattr(cfg, f, None), (int, str))}
    ours.setdefault("hidden_size", hidden)
    diff = {k: (base[k], ours[k]) for k in base if k in ours and base[k] != ours[k]}
    if diff:
        detail = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(diff.items()))
        raise AdapterFileError(f"{path}: this D2L hypernetwork was trained on base model '{base_model or '?'}', "
                               f"which differs from this model: {detail} (checkpoint vs model)")
    try:
        check_slots(slots, model_slots(model, targets), str(path))
    except AdapterFileError as e:
        raise AdapterFileError(str(e).replace("T2L hypernetwork", "D2L hypernetwork")) from None


def concat_ranks(loras: Sequence[LoRA]) -> LoRA:
    """Per-chunk LoRAs -> one LoRA along the rank: A = [A_1; ...; A_n], B = [B_1 ... B_n]; B A = Σ_c B_c A_c."""
    if len(loras) == 1:
        return dict(loras[0])
    return {m: (torch.cat([lo[m][0] for lo in loras], 0), torch.cat([lo[m][1] for lo in loras], 1))
            for m in loras[0]}


# --- reading a document through the frozen base ---
def tokenize_document(tokenizer: Any, document: str, config: D2LConfig) -> list[list[int]]:
    """Token ids, split into chunks of ``chunk_tokens``; refuses an empty or too-long document."""
    if not isinstance(document, str) or not document.strip():
        raise DocumentError(f"document {document[:40]!r}: expected a non-empty text" if isinstance(document, str)
                            else f"document: expected a text, found {type(document).__name__}")
    ids = list(tokenizer(document, add_special_tokens=False)["input_ids"])
    n, c = len(ids), config.chunk_tokens
    if not config.chunking and n > c:
        raise DocumentError(f"document of {n} tokens is longer than the chunk limit of {c} tokens "
                            f"(D2LConfig.chunk_tokens) and chunking is off; enable chunking (--chunking) or "
                            f"shorten the document")
    chunks = [ids[i:i + c] for i in range(0, n, c)]
    if len(chunks) > config.max_chunks:
        raise DocumentError(f"document of {n} tokens needs {len(chunks)} chunks of {c} tokens; the limit is "
                            f"{config.max_chunks} (D2LConfig.max_chunks, --max_chunks)")
    return chunks


def layer_activations(model: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """(L, T, hidden): the hidden states entering each of the model's L layers, no grad, adapters off."""
    if adapter_names(model):
        raise AdapterError(f"D2L reads documents through the base model, but adapters {adapter_names(model)} are "
                           f"on it; reset() / remove them first")
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)], device=dev), output_hidden_states=True)
    return torch.stack(out.hidden_states[:-1])[:, 0].float()  # embeddings + outputs of layers 0..L-2


def read_document(model: nn.Module, tokenizer: Any, document: str, config: D2LConfig) -> list[torch.Tensor]:
    """Per-chunk activations [(L, T_c, hidden), ...] of ``document``."""
    return [layer_activations(model, c) for c in tokenize_document(tokenizer, document, config)]


# --- onto the model, through the shared core ---
def apply_lora(model: nn.Module, hyper: D2L, lora: LoRA, name: str = "d2l", scale: float = 1.0) -> list[str]:
    """Inject a generated LoRA (rank n·r after chunking) as an ordinary frozen ``lora`` adapter ``name``."""
    c = hyper.config
    n = next(iter(lora.values()))[0].shape[0] // c.rank  # chunks concatenated
    spec = AdapterSpec(variant="lora", rank=n * c.rank, alpha=n * c.alpha, targets=list(c.targets))
    return install_lora(model, lora, spec, [s.name for s in hyper.slots], name, scale, "D2L")


def internalize(model: nn.Module, document: str, hyper: D2L, tokenizer: Any, name: str = "d2l",
                scale: float = 1.0) -> LoRA:
    """Read ``document`` and put its generated LoRA on ``model`` as adapter ``name`` (replacing a previous one);
    returns the LoRA. Save it with ``llm.save_llm_adapter(model, path, name)``."""
    reset(model, name)
    chunks = read_document(model, tokenizer, document, hyper.config)
    lora = hyper.generate(chunks)
    apply_lora(model, hyper, lora, name, scale)
    log.info("internalized a document of %d chunk(s) as adapter '%s' (rank %d)", len(chunks), name,
             len(chunks) * hyper.config.rank)
    return lora


def reset(model: nn.Module, name: str = "d2l") -> None:
    """Remove an internalized document's adapter: the base model's modules come back as they were."""
    if name in adapter_names(model):
        remove_adapters(model, [name])
