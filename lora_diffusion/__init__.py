"""lora-diffusion: one library of LoRA-family adapters for diffusion UNets and LLMs."""

from . import variants  # noqa: F401  (registers every variant)
from .api import (
    adapter_parameters,
    adapter_state_dict,
    add_adapter,
    components,
    disable_adapters,
    enable_gradient_checkpointing,
    get_spec,
    list_adapters,
    load_adapter,
    load_adapter_state_dict,
    mark_trainable,
    merge_adapters,
    param_groups,
    remove_adapters,
    save_adapter,
    set_adapters,
    set_context,
    set_timestep,
    shared_tensors,
    timestep,
    unmerge_adapters,
)
from .core.adapter import Adapter
from .core.errors import AdapterError, AdapterFileError, TargetError, UnknownVariantError
from .core.layer import AdaptedLayer
from .core.registry import get_variant, register_variant, variant_names
from .core.spec import AdapterSpec
from .fusion import moa as _moa  # noqa: F401  (registers the mixtures: MoA, X-LoRA/MoLE/LAG files load anywhere)
from .inject.presets import PRESETS, preset_names
from .inject.steps import TrainingHooks, variant_optimizer
from .inject.targets import find_targets
from .squeeze import squeeze_file  # noqa: F401  (LoRA-Squeeze)

__all__ = [
    "PRESETS", "AdaptedLayer", "Adapter", "AdapterError", "AdapterFileError", "AdapterSpec", "TargetError",
    "UnknownVariantError", "adapter_parameters", "adapter_state_dict", "add_adapter", "components",
    "disable_adapters", "enable_gradient_checkpointing", "find_targets", "get_spec", "get_variant",
    "list_adapters", "load_adapter",
    "load_adapter_state_dict", "mark_trainable", "merge_adapters", "param_groups", "preset_names",
    "register_variant", "remove_adapters", "save_adapter", "set_adapters", "set_context", "set_timestep", "shared_tensors",
    "timestep", "unmerge_adapters", "variant_names", "TrainingHooks", "variant_optimizer",
]
