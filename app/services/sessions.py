"""Per-browser-session folders for outputs (generated PNGs, exports): kept apart, removed when the session ends or
grows old."""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

from .errors import AppError

log = logging.getLogger("app")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Sessions:
    def __init__(self, root: Path, ttl_s: float = 3600.0) -> None:
        self.root, self.ttl_s = Path(root), ttl_s
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, session: str | None) -> Path:
        """This session's folder (created); a session id that is not a plain token is refused."""
        sid = session or "anonymous"
        if not _ID.match(sid):
            raise AppError("session: unexpected session id")
        path = self.root / sid
        path.mkdir(parents=True, exist_ok=True)
        return path

    def close(self, session: str | None) -> None:
        if session and _ID.match(session):
            shutil.rmtree(self.root / session, ignore_errors=True)

    def sweep(self) -> int:
        """Remove folders untouched for ``ttl_s``; returns how many."""
        n, now = 0, time.time()
        for d in self.root.iterdir():
            if d.is_dir() and now - d.stat().st_mtime > self.ttl_s:
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        if n:
            log.info("sessions: removed %d old session folder(s)", n)
        return n
