"""AutoLoRA's weight-based retriever: an encoder of LoRA weights, trained against description embeddings.

Paper: Li et al. 2025, https://arxiv.org/abs/2508.02107, §3.1 (released code: lzws/AutoLoRA ``retriever.py``).
It finds LoRAs whose files carry no useful name or metadata, from what their weights do::

    y_l   = ΔW_l p_l = B_l (A_l p_l)               a learned probe p_l (P vectors of d_in) through layer l's ΔW
    y_l  <- y_l / rms(y_1..L)                      one scale per LoRA: alpha, rank and learning rate drop out
    h_l   = Proj_{d_out}(flatten y_l) + pos_l      one token per adapted layer; projections shared per width
    z     = normalize(Head(mean_l LN(Transformer(h_1..L))))      (dim of the text embedder)

trained with the symmetric InfoNCE loss of the paper between z and the frozen text embedding t of each
LoRA's description: L = ½ CE(s·Z Tᵀ, Y) + ½ CE(s·T Zᵀ, Y), s = 10 (the paper's fixed scale). The paper's
targets are Y = I; ours are Y = softmax(T Tᵀ / 0.05) row-wise, so LoRAs whose descriptions say the same thing
are positives of each other instead of being pushed apart (measured on the synthetic library of
tests/test_retrieval_weights.py, same- vs cross-theme cosine: one-hot 0.23 vs -0.07, soft 0.80 vs -0.15).

Unlike the FLUX-only original (a fixed list of 304 layers; a LoRA missing one raises KeyError), layers are
named from the file (kohya, diffusers, PEFT and canonical names map to one key) and a LoRA may cover any
subset of the layers seen in training; layers never seen are ignored. Read: LoRA/LoCon (``lora_down``/
``lora_up``, ``lora_A``/``lora_B``) and LoHa (dense ΔW); files of other variants get no weight score.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import AdapterError, AdapterFileError
from ..io.files import read_header, read_safetensors, write_safetensors
from .embedders import CACHE_DIR, EmbedderError

log = logging.getLogger(__name__)
FORMAT = "lora-diffusion-weight-retriever"
DEFAULT_NAME = ".lora_retriever.safetensors"  # in the library folder (hidden: never indexed as a LoRA)
Delta = tuple[torch.Tensor, torch.Tensor | None]  # (up (out, r), down (r, in)) or (ΔW (out, in), None)

_COMPONENTS = (("lora_unet_", "unet"), ("lora_te1_", "te"), ("lora_te2_", "te2"), ("lora_te_", "te"),
               ("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"), ("transformer.", "transformer"),
               ("base_model.model.", ""))
_UNET_ROOTS = ("down_blocks_", "mid_block_", "up_blocks_", "conv_in", "conv_out", "time_embedding_", "input_blocks_",
               "middle_block_", "output_blocks_", "add_embedding_")
_PAIRS = ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight"), (".lora_B", ".lora_A"),
          (".lora.up.weight", ".lora.down.weight"), ("_lora.up.weight", "_lora.down.weight"))


class WeightRetrieverError(AdapterError):
    """A weight-retriever file that cannot be used, or a LoRA it cannot read."""


# ---------------------------------------------------------------------------------------------------- reading ΔW
def layer_key(module: str) -> str:
    """One name per adapted layer whatever the format: "unet:down_blocks_0_..._attn1_to_q"."""
    comp = ""
    for prefix, c in _COMPONENTS:
        if module.startswith(prefix):
            comp, module = c, module[len(prefix):]
            break
    flat = module.replace(".", "_").removeprefix("text_model_")
    if not comp and flat.startswith(_UNET_ROOTS):  # a bare UNet's file (no component prefix)
        comp = "unet"
    return f"{comp}:{flat}"


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.float().reshape(t.shape[0], -1)


def read_deltas(path: str | os.PathLike) -> dict[str, Delta]:
    """{layer key: (up, down)} of a LoRA file (or (ΔW, None) for LoHa); conv kernels flattened to (r, in*k*k)."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    _, meta = read_header(path)
    tensors, _ = read_safetensors(path)
    if meta.get("format") == "lora-diffusion" and any(k.endswith((".lora_S", ".vera_lambda_b")) for k in tensors):
        raise WeightRetrieverError(f"{path}: a canonical {meta.get('variant', '')} file stores only part of its ΔW "
                                   "(frozen init regenerated from the seed); export it to kohya/diffusers to score its weights")
    out: dict[str, Delta] = {}
    for k, v in tensors.items():
        for up_s, down_s in _PAIRS:
            if k.endswith(down_s) and (k[: -len(down_s)] + up_s) in tensors:
                out[layer_key(k[: -len(down_s)])] = (_flat(tensors[k[: -len(down_s)] + up_s]), _flat(v))
        if k.endswith(".hada_w1_a"):
            m = k[: -len(".hada_w1_a")]
            w = [tensors.get(f"{m}.hada_{n}") for n in ("w1_a", "w1_b", "w2_a", "w2_b")]
            if all(t is not None for t in w):
                out[layer_key(m)] = ((_flat(w[0]) @ _flat(w[1])) * (_flat(w[2]) @ _flat(w[3])), None)
    if not out:
        raise WeightRetrieverError(f"{path}: no LoRA/LoCon/LoHa factor pairs found (keys like "
                                   f"'{next(iter(tensors), '<none>')}'); this variant gets no weight score")
    return out


def _shape(d: Delta) -> tuple[int, int]:
    up, down = d
    return (up.shape[1], up.shape[0]) if down is None else (down.shape[1], up.shape[0])  # (d_in, d_out)


# ---------------------------------------------------------------------------------------------------- the encoder
@dataclass
class EncoderConfig:
    """Size of the weight encoder (the paper: 1 probe, width 768, 2 CLIP layers; ours is small by default)."""

    width: int = 128  # token width
    depth: int = 2  # transformer layers
    heads: int = 4
    probes: int = 4  # probe vectors per layer (P)
    out_dim: int = 384  # = the text embedder's dim (MiniLM: 384)


class WeightEncoder(nn.Module):
    """LoRA weights -> one unit vector in the text embedder's space (see the module docstring)."""

    def __init__(self, layers: dict[str, tuple[int, int]], cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg, self.layers = cfg, dict(sorted(layers.items()))
        self.index = {k: i for i, k in enumerate(self.layers)}
        g = torch.Generator().manual_seed(0)
        self.probes = nn.ParameterList([nn.Parameter(torch.randn(cfg.probes, d_in, generator=g) / math.sqrt(d_in))
                                        for d_in, _ in self.layers.values()])
        self.proj = nn.ModuleDict({str(o): nn.Linear(cfg.probes * o, cfg.width) for o in sorted({o for _, o in layers.values()})})
        self.pos = nn.Parameter(torch.randn(len(self.layers), cfg.width, generator=g) * 0.02)
        block = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 2 * cfg.width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(block, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.out_dim)

    def known(self, deltas: dict[str, Delta]) -> list[str]:
        """The layers of ``deltas`` this encoder has a probe for (same key and shape)."""
        return [k for k, d in deltas.items() if k in self.index and _shape(d) == self.layers[k]]

    def tokens(self, deltas: dict[str, Delta], keep: list[str]) -> torch.Tensor:
        """(L, width) tokens of one LoRA's layers ``keep``."""
        ys = []
        for k in keep:
            up, down = deltas[k]
            p = self.probes[self.index[k]]  # (P, d_in)
            ys.append(p @ up.T if down is None else (p @ down.T) @ up.T)  # (P, d_out)
        scale = torch.sqrt(torch.stack([y.pow(2).mean() for y in ys]).mean()) + 1e-12
        return torch.stack([self.proj[str(y.shape[1])](y.flatten() / scale) + self.pos[self.index[k]]
                            for k, y in zip(keep, ys)])

    def forward(self, batch: list[dict[str, Delta]], layer_dropout: float = 0.0) -> torch.Tensor:
        """(B, out_dim) unit vectors; ``layer_dropout`` drops each known layer with that probability (training)."""
        seqs = []
        for deltas in batch:
            keep = self.known(deltas)
            if not keep:
                raise WeightRetrieverError("a LoRA with no layer this weight encoder was trained on")
            if layer_dropout > 0 and len(keep) > 1:
                mask = torch.rand(len(keep)) >= layer_dropout
                keep = [k for k, m in zip(keep, mask.tolist()) if m] or keep[:1]
            seqs.append(self.tokens(deltas, keep))
        n = max(s.shape[0] for s in seqs)
        x = torch.stack([F.pad(s, (0, 0, 0, n - s.shape[0])) for s in seqs])  # (B, L, width)
        pad = torch.stack([torch.arange(n) >= s.shape[0] for s in seqs])  # (B, L) True = padding
        h = self.norm(self.transformer(x, src_key_padding_mask=pad))
        h = (h * (~pad)[..., None]).sum(1) / (~pad).sum(1, keepdim=True)  # masked mean pool
        return F.normalize(self.head(h), dim=-1)


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 32  # LoRAs per step (the paper: 32)
    lr: float = 1e-3
    weight_decay: float = 0.01
    scale: float = 10.0  # logit scale of the InfoNCE loss (the paper's x10, no learned temperature)
    layer_dropout: float = 0.1
    target_temperature: float = 0.05  # soft InfoNCE targets from description similarity (0: one-hot, the paper)
    align: float = 0.0  # weight of an extra term 1 - cos(z, t) pulling z onto its description (not in the paper)
    seed: int = 0


def info_nce(z: torch.Tensor, t: torch.Tensor, scale: float, target_temperature: float = 0.05) -> torch.Tensor:
    """Symmetric InfoNCE between weight embeddings z (B, D) and text embeddings t (B, D).

    Targets: softmax(t tᵀ / target_temperature) per row instead of the identity, so LoRAs whose descriptions say
    the same thing are positives of each other (0 -> the paper's one-hot targets)."""
    if target_temperature > 0:
        target = F.softmax(t @ t.T / target_temperature, dim=1)  # (B, B)
    else:
        target = torch.eye(len(t))
    logits = scale * z @ t.T  # (B, B)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def train_encoder(items: list[dict[str, Delta]], texts: torch.Tensor, enc_cfg: EncoderConfig, cfg: TrainConfig,
                  on_step: Callable[[int, float, WeightEncoder], None] | None = None) -> WeightEncoder:
    """Train a :class:`WeightEncoder` so each LoRA of ``items`` lands on its description embedding ``texts[i]``."""
    if len(items) < 2:
        raise WeightRetrieverError(f"training needs at least 2 LoRAs with descriptions, got {len(items)}")
    torch.manual_seed(cfg.seed)
    layers: dict[str, tuple[int, int]] = {}
    for deltas in items:
        for k, d in deltas.items():
            layers.setdefault(k, _shape(d))
    enc = WeightEncoder(layers, EncoderConfig(**{**asdict(enc_cfg), "out_dim": texts.shape[1]}))
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(1, cfg.steps + 1):
        idx = torch.randperm(len(items), generator=g)[: cfg.batch_size].tolist()
        z, t = enc([items[i] for i in idx], cfg.layer_dropout), texts[idx]
        loss = info_nce(z, t, cfg.scale, cfg.target_temperature) + cfg.align * (1 - (z * t).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, loss.item(), enc)
    return enc.eval()


# ---------------------------------------------------------------------------------------------------- the retriever
class WeightRetriever:
    """A trained :class:`WeightEncoder` plus the embedder it was trained against; scores library entries."""

    def __init__(self, encoder: WeightEncoder, embedder_id: str, info: dict[str, Any] | None = None) -> None:
        self.encoder, self.embedder_id, self.info = encoder.eval(), embedder_id, info or {}
        self._memo: dict[str, torch.Tensor | None] = {}

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha1()
        for v in self.encoder.state_dict().values():
            h.update(v.detach().float().numpy().tobytes()[:4096])
        return h.hexdigest()[:12]

    @torch.no_grad()
    def embed_file(self, path: str | os.PathLike) -> torch.Tensor:
        """The (out_dim,) embedding of one LoRA file; raises :class:`WeightRetrieverError` if it cannot be read."""
        deltas = read_deltas(path)
        if not self.encoder.known(deltas):
            raise WeightRetrieverError(f"{path}: none of its layers was seen when this weight retriever was trained")
        return self.encoder([deltas])[0]

    def embeddings(self, lib: Any, entries: list[Any]) -> dict[str, torch.Tensor]:
        """{file: embedding} for the entries it can read (others logged once); cached by sha256 in memory and in
        ``<library>/.lora_embeddings/weights-<fingerprint>.safetensors``."""
        cache_path = Path(lib.folder) / CACHE_DIR / f"weights-{self.fingerprint()}.safetensors"
        disk: dict[str, torch.Tensor] = {}
        if cache_path.is_file():
            try:
                disk = read_safetensors(cache_path)[0]
            except AdapterFileError as e:
                log.warning("%s: ignored (%s)", cache_path, e)
        out, new = {}, False
        for e in entries:
            key = e.sha256 or e.file
            if key not in self._memo:
                if key in disk:
                    self._memo[key] = disk[key]
                else:
                    try:
                        self._memo[key], new = self.embed_file(e.path), True
                    except AdapterError as err:
                        log.info("weight retriever: %s gets no weight score: %s", e.file, err)
                        self._memo[key] = None
            if self._memo[key] is not None:
                out[e.file] = self._memo[key]
        if new and os.access(lib.folder, os.W_OK):
            write_safetensors(cache_path, {k: v for k, v in self._memo.items() if v is not None}, {"format": FORMAT})
        return out

    def scores(self, lib: Any, entries: list[Any], query: torch.Tensor, embedder: Any) -> dict[str, float]:
        """{file: cosine(prompt embedding, weight embedding)} (the prompt embedded by the same embedder)."""
        if embedder.id != self.embedder_id:
            raise EmbedderError(f"this weight retriever was trained against '{self.embedder_id}' embeddings; the prompt "
                                f"was embedded by '{embedder.id}': use the same embedder")
        return {f: float(v @ query) for f, v in self.embeddings(lib, entries).items()}

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file (atomic write): encoder weights + JSON metadata (config, layers, embedder, info)."""
        meta = {"format": FORMAT, "config": json.dumps(asdict(self.encoder.cfg)), "embedder": self.embedder_id,
                "layers": json.dumps(self.encoder.layers), "info": json.dumps(self.info)}
        write_safetensors(path, self.encoder.state_dict(), meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WeightRetriever:
        tensors, meta = read_safetensors(path)
        if meta.get("format") != FORMAT:
            raise WeightRetrieverError(f"{path}: not a weight-retriever file (metadata 'format' is {meta.get('format')!r}; "
                                       "train one with python -m training.train_retriever)")
        try:
            layers = {k: tuple(v) for k, v in json.loads(meta["layers"]).items()}
            enc = WeightEncoder(layers, EncoderConfig(**json.loads(meta["config"])))
            enc.load_state_dict(tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise WeightRetrieverError(f"{path}: damaged weight-retriever file ({type(e).__name__}: {e})") from None
        return cls(enc, meta["embedder"], json.loads(meta.get("info", "{}")))


# ---------------------------------------------------------------------------------------------------- the figure
def theme_cosines(z: torch.Tensor, themes: list[str]) -> tuple[float, float]:
    """(mean cosine of pairs of the same theme, of pairs of different themes) of unit vectors z (AutoLoRA Fig. 4)."""
    sim = z @ z.T
    same, diff = [], []
    for i in range(len(themes)):
        for j in range(i + 1, len(themes)):
            (same if themes[i] == themes[j] else diff).append(float(sim[i, j]))
    return _mean(same), _mean(diff)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def theme_of(description: str, themes: list[str]) -> str | None:
    """The first of ``themes`` named (as a word) in ``description``, or None."""
    found = [(m.start(), t) for t in themes if (m := re.search(rf"\b{re.escape(t)}\b", description, re.IGNORECASE))]
    return min(found)[1] if found else None
