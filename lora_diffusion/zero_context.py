"""SD3 without T5: the trailing zero context tokens collapsed into one, exactly.

``StableDiffusion3Pipeline`` without a T5 encoder (``text_encoder_3=None``, the trainer's ``--drop_t5``, the DiT demo
model's zero-output stand-in) appends ``max_sequence_length`` (256) zero rows to the CLIP context. Every per-token
operation of a joint block (context embedder, adaLN, q/k/v projections and their adapters, MLP) maps identical tokens
to identical outputs, so in joint attention k copies of one key/value are one key/value whose logit is raised by ln k:

    softmax([s_1, ..., s_n, z, ..., z]) · [v_1, ..., v_n, u, ..., u]  =  softmax([s_1, ..., s_n, z + ln k]) · [v, u]

:func:`collapse_zero_context` keeps one of the k trailing zero rows of ``encoder_hidden_states`` (a forward pre-hook)
and its joint-attention processors add ln k to that key's logit; the image tokens come out the same up to float
rounding (``tests/test_zero_context.py``), at a fraction of the cost when the image has few tokens (the DiT demo
model: 16 image tokens, 20 CLIP + 256 zero context tokens -> 21).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTR = "_lora_zero_context"


class ZeroContextJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` with ``log_copies`` added to the LAST context key's logit."""

    def __init__(self) -> None:
        self.log_copies = 0.0  # set per forward by the hook

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        b, n = hidden_states.shape[:2]
        c = encoder_hidden_states

        def heads(t: torch.Tensor, norm: Any = None) -> torch.Tensor:  # (b, l, h*d) -> (b, h, l, d)
            t = t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
            return norm(t) if norm is not None else t

        q, k, v = heads(attn.to_q(hidden_states), attn.norm_q), heads(attn.to_k(hidden_states), attn.norm_k), \
            heads(attn.to_v(hidden_states))
        if c is None:
            out = F.scaled_dot_product_attention(q, k, v)
            return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1).to(q.dtype)))
        q = torch.cat([q, heads(attn.add_q_proj(c), attn.norm_added_q)], 2)
        k = torch.cat([k, heads(attn.add_k_proj(c), attn.norm_added_k)], 2)
        v = torch.cat([v, heads(attn.add_v_proj(c))], 2)
        mask = None
        if self.log_copies:
            mask = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
            mask[-1] = self.log_copies
            mask = mask.expand(q.shape[2], -1)  # (n + l, n + l): a bias on the last key's logit
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, q.shape[2], -1)
        x, c = out[:, :n].to(q.dtype), out[:, n:].to(q.dtype)
        if not attn.context_pre_only:
            c = attn.to_add_out(c)
        return attn.to_out[1](attn.to_out[0](x)), c


def trailing_zero_rows(context: torch.Tensor) -> int:
    """How many of the last rows of ``context`` (b, l, d) are exactly zero in every sample."""
    nonzero = (context != 0).any(dim=-1).any(dim=0)  # (l,)
    idx = nonzero.nonzero()
    return int(context.shape[1] - (int(idx[-1]) + 1 if len(idx) else 0))


def _hook(processors: list[ZeroContextJointAttnProcessor]) -> Any:
    def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        in_kwargs = "encoder_hidden_states" in kwargs
        context = kwargs.get("encoder_hidden_states") if in_kwargs else (args[1] if len(args) > 1 else None)
        k = trailing_zero_rows(context) if context is not None else 0
        for p in processors:
            p.log_copies = math.log(k) if k > 1 else 0.0
        if k > 1:
            context = context[:, : context.shape[1] - k + 1]
            if in_kwargs:
                kwargs = {**kwargs, "encoder_hidden_states": context}
            else:
                args = (args[0], context, *args[2:])
        return args, kwargs
    return pre


def collapse_zero_context(transformer: nn.Module) -> bool:
    """Install the collapse on an ``SD3Transformer2DModel`` (joint-attention blocks: processors swapped, a pre-hook);
    idempotent; False (nothing done) on a model without joint attention. :func:`restore_zero_context` undoes it."""
    if getattr(transformer, ATTR, None) is not None:
        return True
    joint = {name: m for name, m in transformer.named_modules() if getattr(m, "add_q_proj", None) is not None
             and hasattr(m, "set_processor")}
    if not joint or type(transformer).__name__ != "SD3Transformer2DModel":
        return False
    before = {name: m.processor for name, m in joint.items()}
    procs = []
    for m in joint.values():
        procs.append(ZeroContextJointAttnProcessor())
        m.set_processor(procs[-1])
    handle = transformer.register_forward_pre_hook(_hook(procs), with_kwargs=True)
    transformer.__dict__[ATTR] = (handle, before)
    return True


def restore_zero_context(transformer: nn.Module) -> None:
    """The original processors back and the hook removed."""
    state = transformer.__dict__.pop(ATTR, None)
    if state is None:
        return
    handle, before = state
    handle.remove()
    modules = dict(transformer.named_modules())
    for name, proc in before.items():
        modules[name].set_processor(proc)


__all__ = ["ZeroContextJointAttnProcessor", "collapse_zero_context", "restore_zero_context", "trailing_zero_rows"]
