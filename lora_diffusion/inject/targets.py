"""Walk a model and find the modules a spec targets."""

from __future__ import annotations

from torch import nn

from ..core.errors import TargetError
from ..core.spec import AdapterSpec, match_name
from ..core.walk import walk_modules
from .presets import resolve_patterns


def iter_candidates(model: nn.Module):
    """(name, module) for every module, with adapted layers standing for their base layer (not entered)."""
    yield from walk_modules(model, into_base=False)


def find_targets(model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Module]:
    """Modules whose names match the spec's targets and none of its excludes.

    Raises a TargetError naming the patterns (and a few module names) if nothing matches.
    """
    patterns = resolve_patterns(spec.targets, model)
    found: dict[str, nn.Module] = {}
    for name, module in iter_candidates(model):
        if not name or not any(match_name(name, p) for p in patterns):
            continue
        if any(match_name(name, p) for p in spec.exclude):
            continue
        found[name] = module
    if not found:
        sample = [n for n, m in walk_modules(model) if isinstance(m, (nn.Linear, nn.Conv2d))][:8]
        raise TargetError(
            f"target patterns {patterns} match no module of {type(model).__name__} "
            f"(examples of module names: {sample})")
    return found
