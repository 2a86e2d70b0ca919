"""A small run of benchmarks/app_load.py: concurrent sessions generating while one job trains (loopback)."""

from __future__ import annotations

import pytest

from benchmarks.app_load import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_concurrent_sessions_while_training(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    r = run(sessions=5, requests=1, train_steps=8, time_limit=240, root=tmp_path)
    assert r["served"] == r["expected"] == 5 and not r["errors"], r
    assert r["distinct_files"] and r["own_images"]  # each session got only its own images
    t = r["training"]
    assert t["state"] == "done" and t["steps"] == t["total"] == 8 and t["finite_losses"], t
