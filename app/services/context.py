"""All of the app's services, built from the operator's settings."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from .hyper import HyperService
from .jobs import JobManager
from .library import LibraryService
from .llm import LLMChat
from .pipelines import GenerateService
from .sessions import Sessions
from .settings import Settings


class AppServices:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.generator = GenerateService(self.settings)
        from .presets import served_families

        # files made for a base family that none of the server's models has are marked in the Library tab
        self.library = LibraryService(self.settings, served_families(self.settings))
        self.jobs = JobManager(self.settings, self.library)
        self.llm = LLMChat(self.settings)
        self.hyper = HyperService(self.settings, self.library)
        # per-session outputs live in the system temp folder: Gradio copies returned files from there into its own
        # cache and serves only that cache (no app folder is ever served directly)
        self.sessions = Sessions(Path(tempfile.gettempdir()) / f"lora-diffusion-app-{uuid.uuid4().hex[:8]}",
                                 self.settings.session_ttl_s)
