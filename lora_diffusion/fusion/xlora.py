"""X-LoRA: a classifier on the base model's hidden states weighs frozen LoRAs per token and layer.

Buehler & Buehler, "X-LoRA: Mixture of Low-Rank Adapter Experts", arXiv 2402.07148 (https://arxiv.org/abs/2402.07148);
reference implementation PEFT ``XLoraModel`` (``tuners/xlora``), whose ``XLoraConfig`` field names the options keep.

    1. scaling pass (no grad): every λ = scaling_pass_value (None: 1/N; 0: the base model), hidden h = H_last (B, T, H)
    2. λ = softmax(MLP(h) / temperature)  ->  (B, T, L, N)   (layerwise_scalings: one logit per layer; else shared)
       top_k_lora keeps the k largest per token (enable_softmax_topk: softmax over the kept ones)
    3. real pass, at adapted layer ℓ:   y = y0 + g · Σ_i λ_{ℓ,i}(token) · y_i,   g = global_scaling_weight

y_i = s_i B_i A_i x is adapter i's own output; PEFT scales the *input* (B_i A_i (λ x)), which is the same for the
additive adapters X-LoRA accepts (the output is linear in x). L = the number of adapted layers holding any of
the adapters, in module order. Only the classifier trains (``use_trainable_adapters`` unfreezes the LoRAs).

LLMs only: the classifier reads per-token final hidden states aligned with the tokens every adapted layer sees.
A diffusion UNet has neither (its layers work on feature maps at several resolutions, and its output is noise,
not hidden states), and PEFT has no UNet integration either: use ``mole`` there. Generation keeps a KV cache for
each pass (PEFT forces ``use_cache=False`` and re-runs both passes over the whole sequence every step): the scaling
pass gets its own cache of base-model keys/values, kept in step with the caller's.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.context import CallContext
from ..core.errors import AdapterError
from ..core.layer import AdaptedLayer
from .base import Combiner, Fusion, FusionMethod
from .mixture import check_mixable

log = logging.getLogger(__name__)


class XLoraClassifier(nn.Module):
    """MLP hidden -> logits: depth 1 is one Linear; deeper: (Linear, ReLU, Dropout) x (depth-1) then Linear."""

    def __init__(self, hidden: int, n_layers: int, n_adapters: int, opts: Any) -> None:
        super().__init__()
        self.n_layers, self.n_adapters, self.opts = n_layers, n_adapters, opts
        out = n_adapters * (n_layers if opts.layerwise_scalings else 1)
        mods: list[nn.Module] = []
        width = hidden
        for _ in range(opts.xlora_depth - 1):
            mods += [nn.Linear(width, opts.xlora_size), nn.ReLU()]
            if opts.xlora_dropout_p > 0:
                mods.append(nn.Dropout(opts.xlora_dropout_p))
            width = opts.xlora_size
        self.layers = nn.Sequential(*mods, nn.Linear(width, out))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> scalings (B, T, L, N)."""
        dtype = self.layers[-1].weight.dtype
        logits = self.layers(hidden.to(dtype))  # (B, T, N) or (B, T, L*N)
        b, t = logits.shape[:2]
        if self.opts.layerwise_scalings:
            logits = logits.reshape(b, t, self.n_layers, self.n_adapters)
        else:
            logits = logits.unsqueeze(2).expand(b, t, self.n_layers, self.n_adapters)
        if self.opts.enable_softmax:
            return torch.softmax(logits / self.opts.softmax_temperature, dim=-1)
        return logits


def topk_scalings(s: torch.Tensor, k: int | None, softmax_topk: bool) -> torch.Tensor:
    """Keep the ``k`` largest per token (the rest 0); ``softmax_topk``: softmax over the kept nonzero ones."""
    if k is not None:
        idx = torch.topk(s, k=k, dim=-1).indices
        s = s * torch.zeros_like(s, dtype=torch.bool).scatter(-1, idx, True).to(s.dtype)
    if softmax_topk:
        keep = s != 0
        s = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).masked_fill(~keep, 0.0)
    return s


class XLoraState:
    """Shared by the classifier hook and every combiner of one fusion: the scalings of the current pass."""

    def __init__(self) -> None:
        self.scalings: torch.Tensor | None = None  # (B, T, L, N)
        self.latest: torch.Tensor | None = None  # the classifier's last output (PEFT get_latest_scalings)
        self.log: list[torch.Tensor] | None = None  # every output while logging (PEFT enable_scalings_logging)
        self.log_ids: list[list[int]] = []  # the token ids of sample 0 for each logged output (plot labels)
        self.busy = False  # inside the scaling pass
        self.cache: Any = None  # the scaling pass's KV cache (base-model keys/values), in step with the real one
        self.real: Any = None  # the real pass's cache it mirrors

    def cache_kwargs(self, module: nn.Module, kwargs: dict) -> dict[str, Any]:
        """use_cache / past_key_values for the scaling pass. A prompt (empty or no cache) starts a fresh scaling
        cache when the real pass caches; later steps must bring the real cache this generation started with, and
        whatever ``generate`` does to it (beam reordering, cropping) is done to the scaling cache too."""
        key = cache_key(module, kwargs)
        past = kwargs.get(key)
        if past is not None and not hasattr(past, "get_seq_length"):
            raise AdapterError("xlora: legacy tuple KV caches are not supported; pass a transformers Cache or none")
        n_past = past.get_seq_length() if past is not None else 0
        if n_past == 0:
            wants = kwargs.get("use_cache")
            wants = bool(getattr(getattr(module, "config", None), "use_cache", False) if wants is None else wants)
            self.cache, self.real = None, None
            if wants and past is not None:
                self._mirror(past)
            return {"use_cache": wants and not module.training, key: None}
        if self.cache is None or self.cache.get_seq_length() != n_past or (
                self.real is not None and self.real is not past):
            raise AdapterError(f"xlora: a KV cache of {n_past} tokens that this X-LoRA generation did not start; "
                               "start from the prompt (no cache) or pass use_cache=False")
        if self.real is None:
            self._mirror(past)
        return {"use_cache": True, key: self.cache}

    def _mirror(self, past: Any) -> None:
        self.real = past
        if getattr(past, "_xlora_mirrored", None) is self:
            return
        for op in CACHE_OPS:
            if hasattr(past, op):
                setattr(past, op, _mirrored(getattr(past, op), self, op))
        past._xlora_mirrored = self


def cache_key(module: nn.Module, kwargs: dict) -> str:
    """The KV-cache argument's name: ``cache`` in transformers >= 5, ``past_key_values`` before."""
    for k in ("cache", "past_key_values"):
        if k in kwargs:
            return k
    return "cache" if "cache" in _forward_params(type(module)) else "past_key_values"


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _mirrored(fn: Any, state: XLoraState, op: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if state.cache is not None and state.real is not None:
            getattr(state.cache, op)(*args, **kwargs)
        return out

    return call


class XLoraCombiner(Combiner):
    def __init__(self, names: list[str], index: int, state: XLoraState, opts: Any) -> None:
        super().__init__(names)
        self.index, self.state, self.opts = index, state, opts

    def combine(self, layer: AdaptedLayer, y0: torch.Tensor, ys: dict[str, torch.Tensor],
                ctx: CallContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.state.scalings
        if s is None:
            raise AdapterError("X-LoRA: an adapted layer ran outside a forward of the model the fusion is attached "
                               "to (no scalings); call the model itself")
        if y0.dim() != 3 or tuple(y0.shape[:2]) != tuple(s.shape[:2]):
            raise AdapterError(f"X-LoRA: layer output {tuple(y0.shape)} is not (batch, tokens, features) of the "
                               f"model input {tuple(s.shape[:2])}; X-LoRA applies to token models (LLMs)")
        lam = topk_scalings(s[:, :, self.index, :], self.opts.top_k_lora, self.opts.enable_softmax_topk)  # (B, T, N)
        lam = lam * self.opts.global_scaling_weight
        out, weights = y0, {}
        for n, y in ys.items():
            w = lam[..., self.names.index(n), None].to(y.dtype)  # (B, T, 1)
            out = out + y * w
            weights[n] = w
        return out, weights


class XLoraFusion(FusionMethod):
    name = "xlora"
    formula = "y = y0 + g * sum_i lambda_{l,i}(token) * y_i, lambda = softmax(MLP(h_base)/T) from a scaling pass"
    paper = "https://arxiv.org/abs/2402.07148"
    trainable = True
    models = ("llm",)

    @dataclass
    class Options:  # PEFT XLoraConfig names and defaults (``adapters`` is the list of names given to ``fuse``)
        hidden_size: int | None = None  # None: the model's config.hidden_size
        enable_softmax: bool = True
        enable_softmax_topk: bool = False
        layerwise_scalings: bool = False
        xlora_depth: int = 1
        xlora_size: int = 2048
        xlora_dropout_p: float = 0.2
        use_trainable_adapters: bool = False
        softmax_temperature: float = 1.0
        top_k_lora: int | None = None
        scaling_pass_value: float | None = 0.0
        global_scaling_weight: float = 1.0

    def check(self, layers: dict[str, AdaptedLayer], names: list[str]) -> None:
        o = self.options
        check_mixable(layers, names, "xlora", min_adapters=1)
        unet = sorted({k.split(".")[0] for k in layers if k.startswith(("unet", "text_encoder"))})
        if unet:
            raise AdapterError(f"xlora: applies to LLMs (per-token hidden states); this model has {unet} components "
                               "— use method='mole' for diffusion models")
        if o.top_k_lora is not None and not 1 <= o.top_k_lora <= len(names):
            raise AdapterError(f"xlora: top_k_lora={o.top_k_lora} must be between 1 and the number of adapters "
                               f"({len(names)}: {names})")
        if o.xlora_depth < 1:
            raise AdapterError(f"xlora: xlora_depth={o.xlora_depth} must be at least 1")
        if o.softmax_temperature <= 0:
            raise AdapterError(f"xlora: softmax_temperature={o.softmax_temperature} must be positive")

    def prepare(self, layers: dict[str, AdaptedLayer], names: list[str], roles: dict[str, str]) -> None:
        self.state = XLoraState()
        held = [k for k, layer in layers.items() if any(n in layer.adapters for n in names)]
        self.index = {k: i for i, k in enumerate(held)}

    def make_combiner(self, key: str, layer: AdaptedLayer, names: list[str], roles: dict[str, str]) -> Combiner | None:
        if key not in self.index:
            return None
        return XLoraCombiner(names, self.index[key], self.state, self.options)

    def attach(self, fusion: Fusion, models: dict[str, nn.Module]) -> None:
        model = next((m for m in models.values() if _has_layers(m, fusion)), None)
        if model is None or len(models) != 1:
            raise AdapterError("xlora: attaches to one language model (a transformers causal LM)")
        hidden = self.options.hidden_size or getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:
            raise AdapterError("xlora: the model has no config.hidden_size; give hidden_size=")
        ref = next(model.parameters())
        dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        clf = XLoraClassifier(int(hidden), len(self.index), len(fusion.names), self.options).to(ref.device, dtype)
        fusion.modules["classifier"] = clf
        fusion.handles.append(model.register_forward_pre_hook(self._pre_forward(model, clf), with_kwargs=True))
        for layer in fusion.layers.values():
            for n in fusion.names:
                if n in layer.adapters:
                    layer.adapters[n].requires_grad_(self.options.use_trainable_adapters)

    def _pre_forward(self, model: nn.Module, clf: XLoraClassifier):
        state, o, n = self.state, self.options, len(self.index)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if state.busy:  # the scaling pass itself
                return None
            ids = kwargs.get("input_ids", args[0] if args else None)
            emb = kwargs.get("inputs_embeds")
            ref = ids if ids is not None else emb
            if ref is None:
                raise AdapterError("xlora: the model was called without input_ids or inputs_embeds")
            cache_kwargs = state.cache_kwargs(module, kwargs)
            fill = 1.0 / clf.n_adapters if o.scaling_pass_value is None else o.scaling_pass_value
            state.scalings = torch.full((ref.shape[0], ref.shape[1], n, clf.n_adapters), fill,
                                        device=ref.device, dtype=clf.layers[-1].weight.dtype)
            pass_kwargs = {**kwargs, "output_hidden_states": True, "return_dict": True, **cache_kwargs}
            pass_kwargs.pop("labels", None)
            state.busy = True
            try:
                with torch.no_grad():
                    out = module(*args, **pass_kwargs)
            finally:
                state.busy = False
            if cache_kwargs["use_cache"] and cache_kwargs[cache_key(module, kwargs)] is None:  # its own new cache
                state.cache = out["cache"] if "cache" in out else out.get("past_key_values")
            hidden = getattr(out, "hidden_states", None)
            if not hidden:
                raise AdapterError(f"xlora: {type(module).__name__} returned no hidden_states; X-LoRA needs a "
                                   "transformers model (output_hidden_states=True)")
            clf.train(module.training)  # the classifier is not a submodule: follow the model's train/eval mode
            state.scalings = state.latest = clf(hidden[-1])
            if state.log is not None:
                state.log.append(state.latest.detach())
                state.log_ids.append(ids[0].tolist() if ids is not None else [])
            return None

        return hook

    @staticmethod
    def log_scalings(fusion: Fusion, on: bool = True) -> None:
        """Start (clearing) or stop keeping every scaling-pass output (PEFT ``enable_scalings_logging``)."""
        fusion.method.state.log = [] if on else None
        fusion.method.state.log_ids = []

    @staticmethod
    def scalings_log(fusion: Fusion) -> torch.Tensor | None:
        """The logged scalings joined along the tokens, (B, T, L, N): a prompt then one token per step under a KV
        cache (the cache keeps earlier tokens' scalings fixed, so this is each token's weights as it was used)."""
        log_ = fusion.method.state.log
        return torch.cat(log_, 1) if log_ else None

    @staticmethod
    def latest_scalings(fusion: Fusion) -> torch.Tensor | None:
        """The classifier's last scalings (B, T, L, N) (PEFT ``get_latest_scalings``)."""
        return fusion.method.state.latest


def _has_layers(model: nn.Module, fusion: Fusion) -> bool:
    ids = {id(m) for m in model.modules()}
    return any(id(layer) in ids for layer in fusion.layers.values())


CACHE_OPS = ("reorder_cache", "crop", "batch_repeat_interleave", "batch_select_indices")  # what generate does to a cache


def options_from_peft(config: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """(our options, PEFT's ``adapters`` {name: path}) from a PEFT ``XLoraConfig``, its dict or the path of its
    ``adapter_config.json``: the fields keep PEFT's names, PEFT-only fields (task type, ...) are dropped."""
    if isinstance(config, (str, os.PathLike)):
        config = json.loads(Path(config).read_text())
    raw = config if isinstance(config, dict) else vars(config)
    ours = {f.name for f in dataclasses.fields(XLoraFusion.Options)}
    return {k: v for k, v in raw.items() if k in ours}, dict(raw.get("adapters") or {})


def plot_scalings(scalings: torch.Tensor, tokens: list[str], names: list[str], path: str | os.PathLike,
                  title: str = "") -> Path:
    """PNG: each adapter's weight per token (mean over layers; sample 0): which LoRA the classifier picked where."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = scalings[0].float().mean(1).T.cpu().numpy()  # (N, T)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * w.shape[1] + 2), 1.0 + 0.45 * len(names)))
    im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-6, float(w.max())), interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xticks(range(len(tokens)), [t.replace("\n", "⏎") for t in tokens], rotation=90, fontsize=7)
    ax.set_title(title or "X-LoRA scalings per token (mean over layers)", fontsize=9)
    fig.colorbar(im, ax=ax, label="weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
