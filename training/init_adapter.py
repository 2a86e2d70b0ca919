"""``--init_adapter``: continue training from an adapter file with every part it carries, not its UNet part alone.

A file exported by this trainer (canonical, kohya with ``bundle_emb.*``) or by another tool may hold, besides the
denoiser's adapter, placeholder embeddings and a text-encoder adapter. The whole file is loaded onto the pipeline
in one ``load_adapter`` (all or nothing) as the run's adapter ``default``:

- **denoiser part**: the adapter this run trains (its variant and ranks replace --variant/--rank: config.py);
- **embeddings** of the run's ``--placeholder_token`` (which defaults to the file's one token): its initial
  vectors, trained further under ``--train_embedding``, kept fixed otherwise; saved with the result either way;
- **text-encoder part**: the run's text-encoder adapter when ``--text_encoder_targets`` asks for one (the file's
  modules and rank replace the flag's); otherwise kept, frozen, and saved as it came (a warning names it), so the
  result still draws as the file did plus what this run trained.

A file that does not fit the run (no denoiser part, embeddings of other tokens, widths of another model family)
is refused with one error naming the file, and nothing of it stays on the pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

import lora_diffusion as ld
from lora_diffusion import embeddings as ld_emb
from lora_diffusion.families import denoiser
from lora_diffusion.inject.walker import adapter_names

from .config import ConfigError, TLoRAConfig

log = logging.getLogger(__name__)
ADAPTER = "default"  # = diffusion.ADAPTER: the run's adapter and its placeholder tokens


def bundled_tokens(path: str | Path) -> list[str]:
    """The placeholder tokens a file bundles (``bundle_emb.<token>.*``; header only; [] for a folder)."""
    from lora_diffusion.io.embeddings import BUNDLE
    from lora_diffusion.io.files import read_header

    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return []
    header, _ = read_header(p)
    return sorted({k[len(BUNDLE):].partition(".")[0] for k in header if k.startswith(BUNDLE)})


def default_placeholder(cfg: TLoRAConfig) -> None:
    """No --placeholder_token given and the file bundles one token: the run continues that token."""
    tokens = bundled_tokens(cfg.adapter.init_adapter) if cfg.adapter.init_adapter else []
    if cfg.data.placeholder_token is None and len(tokens) == 1:
        cfg.data.placeholder_token = tokens[0]
        log.info("--init_adapter %s: placeholder token %r (from the file)", cfg.adapter.init_adapter, tokens[0])


def text_encoders_with(pipe: Any, name: str = ADAPTER) -> dict[str, nn.Module]:
    """{role: text encoder} of the pipeline's components besides the denoiser that hold adapter ``name``."""
    unet = denoiser(pipe)
    return {r: m for r, m in ld.components(pipe).items()
            if m is not unet and r != "vae" and name in adapter_names(m)}


def load_init_adapter(pipe: Any, cfg: TLoRAConfig) -> None:
    """Load the --init_adapter file onto the pipeline (every part) and check it fits the run; nothing on error."""
    path = cfg.adapter.init_adapter
    if not path:
        return
    ld.load_adapter(pipe, path, name=ADAPTER, trainable=True)
    try:
        _check_fits(pipe, cfg, str(path))
    except BaseException:
        ld.remove_adapters(pipe, [ADAPTER])
        raise
    for role, te in text_encoders_with(pipe).items():  # frozen until add_text_adapter continues it
        for _, p in ld.api.adapter_parameters(te, ADAPTER):
            p.requires_grad_(False)
        if not cfg.embedding.text_encoder_targets or role not in ld_emb.ENCODERS:
            log.warning("--init_adapter %s: its text-encoder adapter (%s, %d modules) is kept fixed and saved with "
                        "the result%s", path, role, len(ld.api.model_state(te).modules[ADAPTER]),
                        "" if role not in ld_emb.ENCODERS else "; pass --text_encoder_targets to train it further")


def _check_fits(pipe: Any, cfg: TLoRAConfig, path: str) -> None:
    unet = denoiser(pipe)
    if ADAPTER not in adapter_names(unet):
        parts = [r for r in ("text encoder",) if text_encoders_with(pipe)]
        raise ConfigError(f"--init_adapter {path}: holds no adapter for the {type(unet).__name__} (only "
                          f"{parts + (['embeddings'] if placeholders(pipe) else []) or 'nothing this model has'}); "
                          "expected a file with the denoiser's adapter")
    embs = placeholders(pipe)
    token = cfg.data.placeholder_token
    if embs and not any(token == e.token or token in e.names for e in embs):
        raise ConfigError(f"--init_adapter {path}: bundles embeddings for {[e.token for e in embs]}, not for this "
                          f"run's placeholder {token!r}; expected --placeholder_token {embs[0].token!r} (or a file "
                          "without embeddings)")


def placeholders(pipe: Any) -> list[ld_emb.TokenEmbeddings]:
    """The run's placeholder tokens already on the pipeline (those the --init_adapter file brought)."""
    return ld_emb.loaded_embeddings(pipe).get(ADAPTER, [])


def file_tokens(pipe: Any, cfg: TLoRAConfig) -> ld_emb.TrainableTokens | None:
    """The file's placeholder: its vectors are the initial ones (trainable under --train_embedding, else fixed)."""
    embs, e = placeholders(pipe), cfg.embedding
    n = sum(x.num_vectors for x in embs)
    if e.train_embedding and (e.num_vectors != n or e.initializer_token):
        log.info("--init_adapter: the file's %d vector(s) start the placeholder (--num_vectors %d and "
                 "--initializer_token are not used)", n, e.num_vectors)
    log.info("placeholder %s: %d vector(s) from --init_adapter %s, %s", [x.token for x in embs], n,
             cfg.adapter.init_adapter, f"trained at lr {e.embedding_lr:g}" if e.train_embedding else "kept fixed")
    return ld_emb.TrainableTokens(pipe, ADAPTER) if e.train_embedding else None


__all__ = ["bundled_tokens", "default_placeholder", "file_tokens", "load_init_adapter", "placeholders",
           "text_encoders_with"]
