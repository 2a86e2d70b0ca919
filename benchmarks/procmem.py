"""Process memory on Linux for the benchmarks: RSS fields of /proc/self/status, peak-RSS reset, heap trim."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
from pathlib import Path


def rss_kib(field: str) -> int | None:
    """``VmRSS``, ``VmHWM``, ... of this process in KiB, or None where /proc is not there."""
    try:
        m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_hwm() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return rss_kib("VmHWM") is not None


def trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS shows what is live."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
