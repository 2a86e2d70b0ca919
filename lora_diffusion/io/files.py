"""The one place that reads and writes adapter files. Only safetensors; pickles are refused.

Writes are atomic: a temporary file in the same folder, fsync, then ``os.replace``, so a crash
never leaves a half-written adapter where a good one was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import AdapterFileError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
MAX_HEADER = 100 * 1024 * 1024


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(f"{path}: '{path.suffix}' files are pickles, which can run code when loaded; "
                               "only .safetensors files are read (convert it with a trusted tool first)")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: u64 header length, then a JSON object
        return
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise AdapterFileError(f"{path}: this is a pickle/zip (torch.save) file, not safetensors; "
                               "only .safetensors files are read")


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(tensor index {key: {dtype, shape, data_offsets}}, metadata) without loading any tensor."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such file")
    _refuse_pickle(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise AdapterFileError(f"{path}: file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or n + 8 > size:
            raise AdapterFileError(f"{path}: header claims {n} bytes but the file has {size}; "
                                   "the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterFileError(f"{path}: header is not valid JSON ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise AdapterFileError(f"{path}: tensors need {8 + n + end} bytes but the file has {size}; the file is truncated")
    return header, meta


def read_safetensors(path: str | os.PathLike, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    _, meta = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for bad offsets, dtypes, ...
        raise AdapterFileError(f"{path}: not a valid safetensors file ({e})") from None
    if check_finite:
        with single_thread():
            for k, t in tensors.items():
                if t.is_floating_point() and not all_finite(t):
                    raise AdapterFileError(f"{path}: tensor '{k}' contains NaN or Inf values")
    return tensors, meta


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run many small tensor ops on one intra-op thread.

    A LoRA file is thousands of small tensors; with several OpenMP threads each op ends in a barrier, and on a
    machine whose cores are busy that barrier waits for a time slice (measured: 4.5 ms per 40k-element op,
    22 s for an SDXL LoRA, instead of 0.1 s single-threaded)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf. A NaN/Inf element makes the sum NaN/Inf, so a finite sum proves the tensor finite in one
    cheap reduction; only a non-finite sum (bad values, or a huge sum overflowing) runs the full elementwise test.
    (CPU ``isfinite`` on half tensors is ~10x slower than the sum.)"""
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[str]:
    """Yield a temporary name in ``path``'s folder; on success fsync it and move it over ``path`` in one step,
    on any error remove it (``path`` is never left half written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())  # mkstemp makes it owner-only; a plain open() would give 0o666 & ~umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically, byte for byte the same for the same tensors and metadata (see ``_sort_metadata``)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with _atomic(Path(path)) as tmp:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
        _sort_metadata(tmp)


def _sort_metadata(path: str) -> None:
    """Put the header's ``__metadata__`` keys in sorted order, in place. safetensors writes them in its hash map's
    order, which changes from process to process: the same LoRA saved twice got another sha256 each time, so gates
    (which record their LoRAs' sha256) refused a byte-for-byte rebuild and duplicate detection missed copies.
    The sorted header has the same length (the same JSON, reordered); were it ever longer, the file is left as
    written (still valid, only not reproducible)."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(n)
        header = json.loads(raw)
        if not isinstance(header.get("__metadata__"), dict):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) <= n:  # padded with spaces, as safetensors pads its header to 8-byte alignment
            f.seek(8)
            f.write(new + b" " * (n - len(new)))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with _atomic(Path(path)) as tmp:
        Path(tmp).write_text(text)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Write strict JSON atomically: a non-finite float (an ε of a run without privacy, a diverged loss) becomes
    ``null``, because ``Infinity``/``NaN`` are not JSON and break other readers (browsers, jq)."""
    write_text(path, json.dumps(_finite(obj), indent=indent, allow_nan=False, default=str))
