"""AdapterSpec: what to inject, serialisable to JSON; ModuleConfig: the spec resolved for one module."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterError

SPEC_FIELDS = ("variant", "rank", "alpha", "dropout", "targets", "exclude", "rank_pattern",
               "alpha_pattern", "rslora", "seed", "options")


def match_name(name: str, pattern: str) -> bool:
    """A module name matches ``pattern`` if it equals it, ends with ``.pattern``,
    or, for ``re:<regex>``, if the regex matches the whole name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


@dataclass
class AdapterSpec:
    """What to inject and how.

    Attributes:
        variant: registry name ("lora", "rslora", "dora", "vera", "loha", "lokr", "tlora", ...).
        rank: r, the adapter's rank (VeRA: the shared projections' rank).
        alpha: scaling numerator; None means alpha = rank, i.e. scale 1 (also T-LoRA's convention).
        dropout: dropout on the adapter's input.
        targets: module-name patterns (suffix or ``re:<regex>``) or a preset name
            ("unet-attn", "clip-text", "llm", ...); None picks a preset from the model's class.
        exclude: patterns removed from the targets.
        rank_pattern / alpha_pattern: per-module overrides, first matching pattern wins.
        rslora: scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023).
        seed: seeds every random init (per module, so init does not depend on module order),
            VeRA's shared projections and T-LoRA's frozen copies, which files do not store.
        options: variant-specific options, checked against the variant's ``Options`` dataclass.
    """

    variant: str = "lora"
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: str | list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    rslora: bool = False
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.variant, str) or not self.variant:
            raise AdapterError(f"AdapterSpec.variant: expected a variant name, found {self.variant!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"AdapterSpec.rank: expected an integer >= 1, found {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise AdapterError(f"AdapterSpec.alpha: expected a finite number or None, found {self.alpha!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise AdapterError(f"AdapterSpec.dropout: expected 0 <= dropout < 1, found {self.dropout!r}")
        if isinstance(self.targets, list) and not all(isinstance(t, str) for t in self.targets):
            raise AdapterError(f"AdapterSpec.targets: expected strings, found {self.targets!r}")
        for pat, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise AdapterError(f"AdapterSpec.rank_pattern['{pat}']: expected an integer >= 1, found {r!r}")
        if not isinstance(self.options, dict):
            raise AdapterError(f"AdapterSpec.options: expected a dict, found {type(self.options).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterSpec:
        unknown = sorted(set(d) - set(SPEC_FIELDS))
        if unknown:
            raise AdapterError(f"AdapterSpec: unknown field(s) {unknown}; valid fields are {list(SPEC_FIELDS)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> AdapterSpec:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise AdapterError(f"AdapterSpec: metadata is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise AdapterError(f"AdapterSpec: expected a JSON object, found {type(d).__name__}")
        return cls.from_dict(d)

    def rank_for(self, module_name: str) -> int:
        return next((r for p, r in self.rank_pattern.items() if match_name(module_name, p)), self.rank)

    def alpha_for(self, module_name: str) -> float | None:
        return next((a for p, a in self.alpha_pattern.items() if match_name(module_name, p)), self.alpha)


@dataclass
class ModuleConfig:
    """The spec resolved for one module: what an Adapter's constructor receives."""

    module_name: str
    rank: int
    alpha: float
    dropout: float
    rslora: bool
    seed: int
    options: Any  # an instance of the variant's Options dataclass
    adapter_name: str = "default"

    @property
    def scaling(self) -> float:
        """alpha/r (LoRA) or alpha/sqrt(r) (rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def generator(self, salt: str = "") -> Any:
        """A CPU generator seeded from (seed, module name, salt): reproducible, order independent."""
        import torch

        key = zlib.crc32(f"{self.module_name}|{salt}".encode())
        return torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + key) % (2**63))
