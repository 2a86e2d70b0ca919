"""Chat with a base LLM and the same model with a trained adapter, side by side (``lora_diffusion.llm.chat.reply``).

One model per base is kept; the adapter is loaded once per file content and switched off for the base answer, so
both answers come from the same weights."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from lora_diffusion import AdapterError

from .errors import AppError
from .pipelines import Hashes
from .settings import Settings

log = logging.getLogger("app")


class LLMChat:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hashes = Hashes()
        self._models: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def _model(self, name: str) -> tuple[Any, Any]:
        from lora_diffusion import llm

        if name not in self.settings.llm_models:
            raise AppError(f"LLM: '{name}' is not one of the models this server offers: {sorted(self.settings.llm_models)}")
        if name not in self._models:
            self._models.clear()  # one base model in memory at a time
            try:
                model, tok = llm.load_causal_lm(self.settings.llm_models[name])
            except (AdapterError, OSError, ValueError) as e:
                raise AppError(f"LLM {name}: {e}") from None
            self._models[name] = (model.eval(), tok)
        return self._models[name]

    def reply_both(self, model_name: str, adapter: Path, label: str, history: list[dict[str, str]],
                   max_new_tokens: int = 64) -> tuple[str, str]:
        """(base answer, adapted answer) to the conversation ``history`` (greedy, so comparable)."""
        import lora_diffusion as ld
        from lora_diffusion import llm
        from lora_diffusion.llm.chat import reply

        if not history or not history[-1].get("content", "").strip():
            raise AppError("message: empty; type something to ask both models")
        if not 1 <= max_new_tokens <= 1024:
            raise AppError(f"max new tokens: expected 1..1024, got {max_new_tokens}")
        with self._lock:
            model, tok = self._model(model_name)
            name = f"a{self.hashes(adapter)[:16]}"
            if name not in ld.list_adapters(model):
                try:
                    llm.load_llm_adapter(model, adapter, name=name)
                except AdapterError as e:
                    raise AppError(f"adapter {label}: {str(e).replace(str(adapter), label)}") from None
            ld.disable_adapters(model)
            base = reply(model, tok, history, max_new_tokens, out=_Null())
            ld.set_adapters(model, [name])
            adapted = reply(model, tok, history, max_new_tokens, out=_Null())
        return base, adapted


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass
