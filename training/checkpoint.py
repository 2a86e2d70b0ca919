"""Training checkpoints: ``checkpoint-<step>`` folders, written atomically, rotated, resumed.

Model-agnostic: a checkpoint holds the state dicts of whatever objects the trainer hands over
("stateful": anything with ``state_dict()``/``load_state_dict()``), in two kinds:

- shared states (trainable parameters, optimizer, LR schedule), identical on every process,
  written once by the main process to ``shared.pt``;
- local states (RNGs, data and noise generators), one file per process, ``local-<rank>.pt``.

A folder becomes visible only complete: everything is written to ``checkpoint-<step>.tmp``, then
``checkpoint.json`` (step, identity of the run), then the folder is renamed. ``identity`` is the part
of the configuration a checkpoint depends on (variant, rank, base model, data...): resuming from a
checkpoint whose identity differs is refused, naming the differing fields.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
META = "checkpoint.json"
FORMAT = "lora-diffusion-checkpoint"
_NAME = re.compile(r"checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here (missing, incomplete, from another run)."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class TrainableParams:
    """The trainable (``requires_grad``) parameters of a model and its adapters' training-state buffers, as a
    stateful object."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def _params(self) -> dict[str, torch.Tensor]:
        """Trainable parameters and the adapters' training-state buffers (``Adapter.state_buffers``)."""
        from lora_diffusion.core.adapter import Adapter

        out: dict[str, torch.Tensor] = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        for mname, m in self.model.named_modules():
            if isinstance(m, Adapter):
                out.update({f"{mname}.{b}": getattr(m, b) for b in m.state_buffers})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self._params().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = self._params()
        if set(params) != set(state):
            diff = sorted(set(params) ^ set(state))
            raise CheckpointError(f"trainable parameters differ from the checkpoint's: {diff[:5]}")
        with torch.no_grad():
            for n, p in params.items():
                if p.shape != state[n].shape:
                    raise CheckpointError(f"parameter '{n}': shape {tuple(p.shape)}, checkpoint {tuple(state[n].shape)}")
                p.copy_(state[n])


class GlobalRNG:
    """Python, NumPy and torch (CPU and CUDA) global RNG states."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        st: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                              "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n[0], n[1].numpy(), *n[2:]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}={saved.get(k)!r} (this run: {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]


class CheckpointManager:
    """Save, list, validate and load ``checkpoint-<step>`` folders under ``root``."""

    def __init__(self, root: Path, identity: dict[str, Any], keep_last: int | None = None, process_index: int = 0,
                 num_processes: int = 1, barrier: Callable[[], None] = lambda: None) -> None:
        self.root = Path(root)
        self.identity = json.loads(json.dumps(identity, default=str))  # what JSON gives back on load
        self.keep_last = keep_last
        self.rank, self.world, self.barrier = process_index, num_processes, barrier
        self.last_saved: tuple[int, Path] | None = None  # (step, folder) of this run's latest save

    # --- listing ---
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name)) and (p / META).is_file()]
        return [p for _, p in sorted(found)]

    def find(self, spec: str) -> Path | None:
        """'latest' -> the newest checkpoint or None; a path -> that folder (validated)."""
        if spec == "latest":
            found = self.checkpoints()
            if found:
                self.validate(found[-1])
            return found[-1] if found else None
        path = Path(spec)
        if not path.is_absolute() and not path.exists() and (self.root / spec).exists():
            path = self.root / spec
        self.validate(path)
        return path

    def validate(self, path: Path) -> dict[str, Any]:
        """The checkpoint's metadata; raises if it is not a complete checkpoint of this run."""
        valid = [p.name for p in self.checkpoints()]
        if not (path / META).is_file():
            raise CheckpointError(f"{path} is not a checkpoint of this trainer (no {META}); "
                                  f"valid checkpoints in {self.root}: {valid or 'none'}")
        meta = json.loads((path / META).read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
        diff = _diff(meta.get("identity", {}), self.identity)
        if diff:
            raise CheckpointError(f"{path} was written by another run; it differs in: " + "; ".join(diff))
        return meta

    # --- saving ---
    def save(self, step: int, shared: dict[str, Stateful], local: dict[str, Stateful],
             extra: Callable[[Path], None] | None = None) -> Path:
        """Write ``checkpoint-<step>`` (every process calls this); returns its path."""
        final = self.root / f"checkpoint-{step}"
        tmp = self.root / f"checkpoint-{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        torch.save({k: s.state_dict() for k, s in local.items()}, tmp / f"local-{self.rank}.pt")
        if self.rank == 0:
            torch.save({k: s.state_dict() for k, s in shared.items()}, tmp / "shared.pt")
            if extra is not None:
                extra(tmp)
        self.barrier()
        if self.rank == 0:
            meta = {"format": FORMAT, "step": step, "num_processes": self.world, "identity": self.identity,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            _fsync_tree(tmp)
            if final.exists():  # a rerun over an old folder: move it aside, then drop it
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old)
            os.replace(tmp, final)
            self._rotate()
            log.info("saved checkpoint %s", final)
        self.barrier()
        self.last_saved = (step, final)
        return final

    def save_once(self, step: int, shared: dict[str, Stateful], local: dict[str, Stateful],
                  extra: Callable[[Path], None] | None = None) -> Path:
        """``save``, unless this run has just written ``checkpoint-<step>`` (a periodic one at the stop step)."""
        if self.last_saved is not None and self.last_saved[0] == step:  # the same answer on every rank
            return self.last_saved[1]
        return self.save(step, shared, local, extra)

    def _rotate(self) -> None:
        found = self.checkpoints()
        if self.keep_last is None or len(found) <= self.keep_last:
            return
        for p in found[: len(found) - self.keep_last]:
            shutil.rmtree(p)
            log.info("removed old checkpoint %s (keeping the last %d)", p, self.keep_last)

    # --- loading ---
    def resume(self, spec: str | None, shared: dict[str, Stateful], local: dict[str, Stateful]) -> int:
        """The step a run starts from: 0 without ``spec`` (--resume_from_checkpoint) or when 'latest' finds nothing
        yet; else that checkpoint's step, with every state restored."""
        if not spec:
            return 0
        path = self.find(spec)
        if path is None:
            log.info("no checkpoint in %s yet: starting from step 0", self.root)
            return 0
        return self.load(path, shared, local)

    def load(self, path: Path, shared: dict[str, Stateful], local: dict[str, Stateful]) -> int:
        """Restore every state from ``path``; returns the step it was written at."""
        meta = self.validate(path)
        data = torch.load(path / "shared.pt", map_location="cpu", weights_only=True)
        for k, s in shared.items():
            s.load_state_dict(data[k])
        local_file = path / f"local-{self.rank}.pt"
        if meta.get("num_processes") != self.world or not local_file.is_file():
            log.warning("%s was written by %s process(es), this run has %d: RNG and data order are reseeded, "
                        "so the run will not retrace the original one exactly", path, meta.get("num_processes"), self.world)
        else:
            data = torch.load(local_file, map_location="cpu", weights_only=False)
            for k, s in local.items():
                s.load_state_dict(data[k])
        log.info("resumed from %s (step %d)", path, meta["step"])
        return int(meta["step"])
