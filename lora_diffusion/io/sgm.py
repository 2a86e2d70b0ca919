"""diffusers UNet module paths <-> the SGM/LDM paths kohya uses for SDXL (``input_blocks.4.1...``).

The mapping is structural, computed from the UNet config (layers_per_block, block types), so it holds
for any UNet2DConditionModel laid out like SD/SDXL, reduced test configs included.
"""

from __future__ import annotations

import re
from typing import Any

TOP = {  # modules outside the block structure
    "conv_in": "input_blocks.0.0", "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
          "conv_shortcut": "skip_connection"}
MID = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets\.\d+|attentions\.0)\.(.+)")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def _inner(kind: str, rest: str) -> str:
    if kind == "resnets":
        head, _, tail = rest.partition(".")
        return RESNET.get(rest, rest) if not tail else f"{RESNET.get(head, head)}.{tail}"
    if kind == "downsamplers":
        return "op" if rest == "conv" else rest
    return rest


def to_sgm(path: str, unet_config: Any) -> str | None:
    """The SGM path of a diffusers UNet module path, or None if it has none."""
    if path in TOP:
        return TOP[path]
    m = _MID.fullmatch(path)
    if m:
        kind = m.group(1).split(".")[0]
        return f"{MID[m.group(1)]}.{_inner(kind, m.group(2))}" if m.group(1) in MID else None
    m = _BLOCK.fullmatch(path)
    if not m:
        return None
    side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    n_blocks = len(_get(unet_config, "block_out_channels"))
    lpb = _get(unet_config, "layers_per_block", 2)
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n_blocks
    if side == "down_blocks":
        start = 1 + sum(n + 1 for n in lpb[:i])
        if kind == "downsamplers":
            return f"input_blocks.{start + lpb[i]}.0.{_inner(kind, rest)}"
        return f"input_blocks.{start + j}.{1 if kind == 'attentions' else 0}.{_inner(kind, rest)}"
    up_lpb = [n + 1 for n in reversed(lpb)]
    start = sum(up_lpb[:i])
    if kind == "upsamplers":
        has_attn = "CrossAttn" in _get(unet_config, "up_block_types")[i]
        return f"output_blocks.{start + up_lpb[i] - 1}.{2 if has_attn else 1}.{rest}"
    return f"output_blocks.{start + j}.{1 if kind == 'attentions' else 0}.{_inner(kind, rest)}"
