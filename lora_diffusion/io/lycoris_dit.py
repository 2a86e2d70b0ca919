"""LyCORIS networks on diffusers models by module name (SimpleTuner, ``lycoris.create_lycoris(transformer, ...)``).

Keys are ``lycoris_<module path, '.' -> '_'>.<param>`` (``LycorisNetwork.LORA_PREFIX``), e.g.
``lycoris_transformer_blocks_0_attn_to_q.q_layer.weight``; the per-module parameters are those of kohya/LyCORIS files
(``lora_down``/``lora_up``, LoHa, LoKr, T-LoRA ``q_layer``/``p_layer``/``lambda_layer``, ``alpha``, ``dora_scale``), so
each module is parsed by the kohya reader (io/kohya.py). The prefix does not name a component: LyCORIS wraps the model
it is given, the denoiser (Flux/SD3 transformer or UNet) in SimpleTuner's training. A T-LoRA's frozen copies and
schedule are rebuilt as for LyCORIS' kohya files (``formats._lycoris_tlora``).
"""

from __future__ import annotations

import torch

from ..core.errors import AdapterFileError
from . import kohya
from .bundle import Bundle, ModuleView

PREFIX = "lycoris_"


def is_lycoris_network(keys: list[str]) -> bool:
    return bool(keys) and all(k.startswith(PREFIX) for k in keys)


def read(tensors: dict[str, torch.Tensor], meta: dict[str, str], views: dict[str, ModuleView], src: str) -> Bundle:
    role = next((r for r in ("transformer", "unet", "") if r in views), None)
    if role is None:
        raise AdapterFileError(f"{src}: a LyCORIS network on a diffusion model's denoiser; the target has {sorted(views)}"
                               ", expected a pipeline with a transformer or UNet, or the bare model")
    view = views[role]
    idx = {PREFIX + path.replace(".", "_"): path for path in view}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        flat, dot, suffix = key.partition(".")
        if not dot:
            raise AdapterFileError(f"{src}: key '{key}': expected '<module>.<param>' (e.g. "
                                   "'lycoris_transformer_blocks_0_attn_to_q.lora_down.weight')")
        by_module.setdefault(flat, {})[suffix] = t
    mods = []
    for flat, ts in by_module.items():
        if flat not in idx:
            raise AdapterFileError(f"{src}: key '{flat}.{next(iter(ts))}': module '{flat.removeprefix(PREFIX)}' is not "
                                   f"in the model ({role or 'the bare model'}); expected LyCORIS' name of one of its "
                                   "Linear/Conv modules")
        path = idx[flat]
        mods.append(kohya._parse_module(src, flat, ts, role, path, view[path]))
    return Bundle(kohya._group(mods), dict(meta), "LyCORIS network (diffusers module names)")
