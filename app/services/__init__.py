"""What the app does, without Gradio: generation (``pipelines``), training jobs (``jobs``), the adapter library
(``library``), per-session folders (``sessions``) and the operator's settings. ``app/ui.py`` only calls these;
tests call them directly."""

from .context import AppServices
from .errors import AppError
from .hyper import HyperService
from .jobs import PRESETS, JobManager, JobRequest, LLMJobRequest, estimate
from .library import EXPORT_FORMATS, LibraryService, safe_name
from .llm import LLMChat
from .pipelines import DEMO_EXAMPLES, AdapterUse, GenerateRequest, GenerateService, parse_seed
from .sessions import Sessions
from .settings import DEMO, Settings, parse_models, read_users

__all__ = ["DEMO", "DEMO_EXAMPLES", "EXPORT_FORMATS", "PRESETS", "AdapterUse", "AppError", "AppServices", "GenerateRequest",
           "GenerateService", "HyperService", "JobManager", "JobRequest", "LLMChat", "LLMJobRequest", "LibraryService",
           "Sessions", "Settings", "estimate",
           "parse_models", "parse_seed", "read_users", "safe_name"]
