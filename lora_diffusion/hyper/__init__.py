"""Generated adapters: hypernetworks that emit ordinary LoRAs for the shared core (Text-to-LoRA, Doc-to-LoRA; docs/hyper.md)."""

from .d2l import D2L, D2LConfig, internalize, reset
from .sft import SFTConfig, StaticLoRA, lora_hooks
from .t2l import T2L, Slot, T2LConfig, apply_generated, embed_description, make_embedder, model_slots, text_to_lora

__all__ = ["D2L", "D2LConfig", "internalize", "reset",
           "T2L", "Slot", "T2LConfig", "apply_generated", "embed_description", "make_embedder", "model_slots",
           "text_to_lora",
           "SFTConfig", "StaticLoRA", "lora_hooks"]
