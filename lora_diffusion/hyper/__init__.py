"""Generated adapters: hypernetworks that emit ordinary LoRAs for the shared core (Text-to-LoRA, docs/hyper.md)."""

from .t2l import T2L, Slot, T2LConfig, apply_generated, embed_description, make_embedder, model_slots, text_to_lora

__all__ = ["T2L", "Slot", "T2LConfig", "apply_generated", "embed_description", "make_embedder", "model_slots",
           "text_to_lora"]
