"""MoA: heterogeneous mixture of adapters per decoder block, soft (sigmoid router) or sparse (learned threshold).

Cao et al., "MoA: Heterogeneous Mixture of Adapters for Parameter-Efficient Fine-Tuning of Large Language Models",
arXiv 2506.05928; official code DCDmllm/MoA (read for the formulas, none of it used). Per decoder block, with
h = input_layernorm(x) (the attention's input) and h2 = post_attention_layernorm(·) (the FFN's input):

    w = sigmoid(R(h)) ∈ (0, 1)^E per token        R: Linear(H, E), or SwiGLU W2(silu(W1 h) ⊙ W3 h), hidden E·swi_x
    sparse:  Γ = Γ_max · sigmoid(W_Γ h + b_Γ),  w ← w · 1[w ≥ Γ]     (prompt expert off: it is not per token)
    LoRA expert on linear t (q, k, v, o, down, ...):   y_t = W_t x + w_t · s B_t A_t x
    prompt expert (before o_proj):   a ← a + w_p · (g ⊙ softmax(q K_pᵀ / √d)) V_p,  K_p = W_k P, V_p = W_v P,
                                     P: (L, H) learned prefix, g: per-head gate, zero-init
    parallel adapter on the FFN:     mlp(h2) ← mlp(h2) + w_a · U silu(D h2)

Init: B = 0 (LoRA experts), g = 0, U = 0, router and threshold biases 0, so the model equals the base at step 0.
(The official parallel adapter starts at xavier gain 1e-4, not exactly zero; U = 0 keeps the identity exact.)
The sparse mask is a step function, so W_Γ gets no gradient through it in the official code; here by default
the mask's backward is that of sigmoid((w - Γ)/τ) (straight-through), so the threshold learns; its forward value
is the hard mask, and experts below the threshold contribute exactly 0.

The LoRA experts are ordinary adapters on the block's linears (``AdaptedLayer``), weighted by a combiner; the router,
prompt and parallel adapter are a :class:`MoABlock` per decoder block. ``save_adapter`` writes all of it into the one
canonical file (tensors ``moa.<block>.<param>``, metadata ``moa`` = the config as JSON), and
``load_adapter`` rebuilds it. Llama-style blocks only (input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import mixtures
from ..core.context import CallContext
from ..core.errors import AdapterError, AdapterFileError
from ..core.layer import AdaptedLayer
from ..core.walk import walk_modules
from .base import Combiner

PAPER = "https://arxiv.org/abs/2506.05928"
META_KEY = "moa"  # canonical-file metadata: the MoAConfig as JSON (X-LoRA/MoLE mixture files use "mixture")
BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class MoAConfig:
    """MoA options (defaults: the official LLaMA-3 ``ModelArgs``: r 8, alpha 32, adapter 16, prompt 10, swi_x 4)."""

    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    rank: int = 8
    alpha: float = 32.0
    adapter_size: int = 16  # parallel FFN adapter width (0: no adapter expert)
    prompt_len: int = 10  # prompt-tuning prefix length (0: no prompt expert; always off when sparse)
    swi_x: int = 4  # router: 0 = Linear(H, E); > 0 = SwiGLU with hidden E * swi_x
    sparse: bool = False
    max_threshold: float = 0.5  # Γ_max
    threshold_grad: bool = True  # straight-through gradient for the threshold (False: the official hard step)
    threshold_tau: float = 0.1  # τ of that surrogate
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.targets or self.rank < 1 or self.adapter_size < 0 or self.prompt_len < 0 or self.swi_x < 0:
            raise AdapterError(f"MoA: expected targets, rank >= 1, adapter_size/prompt_len/swi_x >= 0; got {self}")
        if not 0 < self.max_threshold <= 1:
            raise AdapterError(f"MoA: max_threshold must be in (0, 1]; found {self.max_threshold}")

    @property
    def use_prompt(self) -> bool:
        return self.prompt_len > 0 and not self.sparse

    def experts(self) -> list[str]:
        """Expert order in the router output: the LoRA targets, then 'prompt', then 'adapter'."""
        return list(self.targets) + (["prompt"] if self.use_prompt else []) + (["adapter"] if self.adapter_size else [])


class MoABlock(nn.Module):
    """Router (+ threshold), prompt prefix and parallel adapter of one decoder block; ``w`` holds the last weights."""

    def __init__(self, cfg: MoAConfig, hidden: int, heads: int, dtype: torch.dtype) -> None:
        super().__init__()
        n = len(cfg.experts())
        self.cfg, self.heads = cfg, heads
        kw = {"dtype": dtype}
        if cfg.swi_x:
            self.w1, self.w3 = nn.Linear(hidden, n * cfg.swi_x, **kw), nn.Linear(hidden, n * cfg.swi_x, **kw)
            self.w2 = nn.Linear(n * cfg.swi_x, n, **kw)
        else:
            self.w2 = nn.Linear(hidden, n, **kw)
        if cfg.sparse:
            self.threshold = nn.Linear(hidden, 1, **kw)
        if cfg.use_prompt:
            self.prompt = nn.Parameter(torch.randn(cfg.prompt_len, hidden, dtype=dtype) * 0.02)
            self.prompt_gate = nn.Parameter(torch.zeros(1, heads, 1, 1, dtype=dtype))
        if cfg.adapter_size:
            self.down = nn.Linear(hidden, cfg.adapter_size, **kw)
            self.up = nn.Linear(cfg.adapter_size, hidden, **kw)
            nn.init.xavier_uniform_(self.down.weight)
            nn.init.zeros_(self.up.weight)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        self.w: torch.Tensor | None = None  # (B, T, E) of the current forward
        self.gamma: torch.Tensor | None = None  # (B, T, 1) sparse thresholds of the current forward
        self._q: torch.Tensor | None = None
        self._pos: Any = None

    def route(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, E) expert weights for the normalised block input h."""
        h = h.to(self.w2.weight.dtype)
        logits = self.w2(F.silu(self.w1(h)) * self.w3(h)) if self.cfg.swi_x else self.w2(h)
        w = torch.sigmoid(logits)
        if not self.cfg.sparse:
            return w
        gamma = self.cfg.max_threshold * torch.sigmoid(self.threshold(h))  # (B, T, 1)
        hard = (w >= gamma).to(w.dtype)
        if self.cfg.threshold_grad and torch.is_grad_enabled():
            soft = torch.sigmoid((w - gamma) / self.cfg.threshold_tau)
            hard = hard + (soft - soft.detach())  # forward: the hard mask exactly; backward: the surrogate's
        self.gamma = gamma
        return w * hard

    def weight(self, expert: int) -> torch.Tensor:
        if self.w is None:
            raise AdapterError("MoA: expert weights read before the block's router ran (input_layernorm not called)")
        return self.w[..., expert : expert + 1]

    def adapter_out(self, h2: torch.Tensor, expert: int) -> torch.Tensor:
        dt = self.up.weight.dtype
        return (self.weight(expert) * self.up(F.silu(self.down(h2.to(dt))))).to(h2.dtype)

    def prompt_out(self, attn: nn.Module, expert: int) -> torch.Tensor:
        """w_p · (g ⊙ softmax(q K_pᵀ · scale)) V_p, (B, T, heads·d), from the stashed q and rotary position."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q = self._q.to(self.prompt.dtype)
        B, T, _ = q.shape
        d = q.shape[-1] // self.heads
        base_dt = attn.k_proj.weight.dtype
        kv = lambda lin: (lin.base_layer if isinstance(lin, AdaptedLayer) else lin)(  # noqa: E731
            self.prompt.to(base_dt)).to(self.prompt.dtype)
        kp, vp = kv(attn.k_proj), kv(attn.v_proj)  # (L, kv_heads·d)
        groups = self.heads // (kp.shape[-1] // d)
        kp = kp.view(-1, self.heads // groups, d).repeat_interleave(groups, 1).transpose(0, 1)  # (heads, L, d)
        vp = vp.view(-1, self.heads // groups, d).repeat_interleave(groups, 1).transpose(0, 1)
        qh = q.view(B, T, self.heads, d).transpose(1, 2)  # (B, heads, T, d)
        if self._pos is not None:
            cos, sin = self._pos
            qh, _ = apply_rotary_pos_emb(qh, qh, cos.to(qh.dtype), sin.to(qh.dtype))
        scores = torch.softmax((qh @ kp.transpose(-1, -2)).float() / math.sqrt(d), dim=-1).to(q.dtype)
        out = (self.prompt_gate * scores) @ vp  # (B, heads, T, d)
        return self.weight(expert) * out.transpose(1, 2).reshape(B, T, -1)


class MoACombiner(Combiner):
    """y = y0 + w_e · y_lora for the LoRA expert of this linear (weights from the block's router)."""

    def __init__(self, name: str, block: MoABlock, expert: int) -> None:
        super().__init__([name])
        self._block, self.expert = [block], expert  # a list: not a submodule (the block is the model's)

    def combine(self, layer: AdaptedLayer, y0: torch.Tensor, ys: dict[str, torch.Tensor],
                ctx: CallContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        w = self._block[0].weight(self.expert).to(y0.dtype)
        out = y0
        for y in ys.values():
            out = torch.addcmul(out, w, y)
        return out, {n: w for n in ys}


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Llama-style decoder blocks (``BLOCK_PARTS`` and self_attn.{q,k,v,o}_proj), in order; an error if none."""
    found = [(n, m) for n, m in walk_modules(model)
             if all(hasattr(m, p) for p in BLOCK_PARTS)
             and all(hasattr(m.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    if not found:
        raise AdapterError(f"MoA needs Llama-style decoder blocks ({', '.join(BLOCK_PARTS)}, self_attn.q/k/v/o_proj); "
                           f"{type(model).__name__} has none")
    return found


class MoA:
    """Handle of one MoA installed on a model under adapter ``name``: blocks, hooks, combiners (a model-level
    mixture, ``core/mixtures.py``: saved, loaded, refused for merging and removed with its LoRA experts)."""

    kind = META_KEY

    def __init__(self, model: nn.Module, name: str, cfg: MoAConfig) -> None:
        self.model, self.name, self.cfg = model, name, cfg
        self.blocks: dict[str, MoABlock] = {}
        self.handles: list[Any] = []
        self.layers: list[AdaptedLayer] = []

    def parameters(self) -> list[nn.Parameter]:
        return [p for b in self.blocks.values() for p in b.parameters()]

    @property
    def active(self) -> bool:
        """On while its LoRA experts are active (``set_adapters``, ``disable_adapters`` switch the whole MoA)."""
        return not self.layers or self.name in self.layers[0].active

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{bn}.{k}": v.detach() for bn, b in self.blocks.items() for k, v in b.state_dict().items()}

    def metadata(self) -> dict[str, str]:
        return {META_KEY: json.dumps(dataclasses.asdict(self.cfg)), "moa_paper": PAPER}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for layer in self.layers:
            layer.set_combiner(None)
        for bn, _ in self.blocks.items():
            parent = self.model.get_submodule(bn)
            if hasattr(parent, f"moa_{self.name}"):
                delattr(parent, f"moa_{self.name}")
        mixtures.detach(self.model, self.name)
        self.handles, self.layers, self.blocks = [], [], {}


def _install_block(moa: MoA, bname: str, block: nn.Module, mb: MoABlock) -> None:
    cfg, experts = moa.cfg, moa.cfg.experts()
    block.add_module(f"moa_{moa.name}", mb)  # its parameters are the model's (optimizers, checkpoints, .to())
    moa.blocks[bname] = mb

    def on_norm(_m, _args, out):
        mb.w = mb.route(out) if moa.active else None

    moa.handles.append(block.input_layernorm.register_forward_hook(on_norm))
    for sub, mod in walk_modules(block):
        if isinstance(mod, AdaptedLayer) and moa.name in mod.adapters:
            e = next(i for i, t in enumerate(cfg.targets) if sub == t or sub.endswith("." + t))
            mod.set_combiner(MoACombiner(moa.name, mb, e))
            moa.layers.append(mod)
    if cfg.adapter_size:
        e_a = experts.index("adapter")
        moa.handles.append(block.mlp.register_forward_hook(
            lambda _m, args, out: out + mb.adapter_out(args[0], e_a) if mb.w is not None else None))
    if cfg.use_prompt:
        e_p, attn = experts.index("prompt"), block.self_attn

        def on_attn(_m, _args, kwargs):
            mb._pos = kwargs.get("position_embeddings")

        def on_q(_m, _args, out):
            mb._q = out

        def on_o(_m, args):
            if mb.w is None:  # the MoA is off
                return None
            return (args[0] + mb.prompt_out(attn, e_p).to(args[0].dtype), *args[1:])

        moa.handles += [attn.register_forward_pre_hook(on_attn, with_kwargs=True),
                        attn.q_proj.register_forward_hook(on_q), attn.o_proj.register_forward_pre_hook(on_o)]


def install_moa(model: nn.Module, name: str, cfg: MoAConfig) -> MoA:
    """MoA blocks, hooks and combiners for the LoRA experts ``name`` already on ``model``'s linears."""
    blocks = find_blocks(model)
    mc = getattr(model, "config", None)
    heads = int(getattr(mc, "num_attention_heads", 0) or 0)
    if cfg.use_prompt and heads < 1:
        raise AdapterError("MoA prompt expert: the model config has no num_attention_heads (set prompt_len=0)")
    moa = MoA(model, name, cfg)
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(cfg.seed)
        for bname, block in blocks:
            ref = block.input_layernorm.weight
            hidden = ref.shape[0]
            mb = MoABlock(cfg, hidden, max(heads, 1), torch.float32 if ref.dtype in (torch.float16, torch.bfloat16)
                          else ref.dtype).to(ref.device)
            _install_block(moa, bname, block, mb)
    mixtures.attach(model, name, moa)
    return moa


def add_moa(model: nn.Module, cfg: MoAConfig | None = None, name: str = "default", trainable: bool = True) -> MoA:
    """Add a MoA (LoRA experts on ``cfg.targets`` of every block, routers, prompt, parallel adapter) to ``model``."""
    from .. import api
    from ..core.spec import AdapterSpec

    cfg = cfg or MoAConfig()
    find_blocks(model)  # before anything is added
    spec = AdapterSpec(variant="lora", rank=cfg.rank, alpha=cfg.alpha, targets=list(cfg.targets), seed=cfg.seed)
    api.add_adapter(model, spec, name, trainable=trainable)
    try:
        moa = install_moa(model, name, cfg)
    except BaseException:
        api.remove_adapters(model, [name])
        raise
    for p in moa.parameters():
        p.requires_grad_(trainable)
    return moa


def get_moa(model: nn.Module, name: str = "default") -> MoA | None:
    moa = mixtures.model_mixtures(model).get(name)
    return moa if isinstance(moa, MoA) else None


def load_moa_state(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                   source: str, trainable: bool = False) -> MoA:
    """Rebuild the MoA of a canonical file on ``model`` (its LoRA experts ``name`` already loaded)."""
    try:
        cfg = MoAConfig(**json.loads(meta[META_KEY]))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{source}: metadata '{META_KEY}' is missing or malformed ({e!r})") from None
    moa = install_moa(model, name, cfg)
    expected = moa.state()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    bad = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        moa.remove()
        raise AdapterFileError(f"{source}: MoA tensors do not fit this model: missing {missing[:4]}, unexpected "
                               f"{unexpected[:4]}, wrong shape {bad[:4]}")
    with torch.no_grad():
        for bn, b in moa.blocks.items():
            for k, t in b.state_dict(keep_vars=True).items():
                t.copy_(tensors[f"{bn}.{k}"])
    for p in moa.parameters():
        p.requires_grad_(trainable)
    return moa


mixtures.register_mixture_kind(mixtures.MixtureKind(
    META_KEY, "MoA", holds="its router and extra experts",
    why_unmergeable="their experts are weighted per token (token-routed)", load=load_moa_state))
