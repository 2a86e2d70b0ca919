"""For Gradio's reload mode while developing the UI: ``gradio app/reload.py`` (settings from LORA_APP_* variables)."""

from __future__ import annotations

import os

from app.services import AppServices, Settings
from app.ui import build_app

demo = build_app(AppServices(Settings(library=os.environ.get("LORA_APP_LIBRARY", "outputs/app/library"),
                                      output=os.environ.get("LORA_APP_OUTPUT", "outputs/app"),
                                      device=os.environ.get("LORA_APP_DEVICE"))))

if __name__ == "__main__":
    demo.launch()
