"""Load test of the app on loopback: N concurrent browser sessions generate while one training job runs.

    python benchmarks/app_load.py --sessions 20 --requests 2 --train-steps 40     # prints a table and JSON

Each session is a gradio_client ``Client`` (its own session hash) calling ``/generate`` with its own seed; the
queue runs one generation at a time (``--max-concurrent``), the others wait their turn. Checked: every request is
served, each session gets only its own images (distinct files, the pixels of its own seed), and the training job
finishes all its steps with finite losses. Reported: latency p50/p95/max, throughput, the training job's time.
Stops by itself (a time limit for everything).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PROMPT = "a red star on a blue background"


def _session(url: str, k: int, requests: int, out: dict[int, Any]) -> None:
    import numpy as np
    from gradio_client import Client
    from PIL import Image

    rec: dict[str, Any] = {"latency": [], "files": [], "pixels": [], "errors": [], "connect_retries": 0}
    out[k] = rec
    for attempt in range(3):  # connecting (GET config and API info) can time out on a loaded machine: recorded, retried
        try:
            c = Client(url, verbose=False)
            break
        except Exception as e:  # noqa: BLE001
            rec["connect_retries"] += 1
            if attempt == 2:
                rec["errors"].append(f"connect: {type(e).__name__}: {e}")
                return
    for r in range(requests):
        seed = 1000 * k + r
        t = time.perf_counter()
        try:
            _, _, files = c.predict(PROMPT, "", str(seed), 4, 4.0, None, 1, "demo", False,
                                    *["", True, 1.0] * 4, api_name="/generate")
            rec["latency"].append(time.perf_counter() - t)
            rec["files"] += files
            rec["pixels"].append((seed, np.asarray(Image.open(files[0])).copy()))
        except Exception as e:  # noqa: BLE001 - recorded and reported, the run goes on
            rec["errors"].append(f"{type(e).__name__}: {e}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ring(path: Path) -> Path:
    """The training image: a red ring on blue."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (48, 40), (30, 60, 200))
    ImageDraw.Draw(im).ellipse((10, 6, 38, 34), outline=(220, 30, 30), width=5)
    im.save(path)
    return path


def _sessions(url: str, sessions: int, requests: int, deadline: float) -> tuple[dict[int, Any], float]:
    """Every session in its own thread, joined by ``deadline`` (perf_counter); (results by session, wall s)."""
    results: dict[int, Any] = {}
    threads = [threading.Thread(target=_session, args=(url, k, requests, results), daemon=True)
               for k in range(sessions)]
    t1 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(max(1.0, deadline - time.perf_counter()))
    return results, time.perf_counter() - t1


def _own_images(services: Any, results: dict[int, Any]) -> dict[int, bool]:
    """Isolation: each session's first image is the one its own seed draws."""
    import numpy as np

    from app.services import GenerateRequest

    reference = {}
    for k, rec in results.items():
        for seed, px in rec["pixels"][:1]:
            ref = services.generator.generate(GenerateRequest(PROMPT, steps=4, seed=seed, num_images=1))[0]
            reference[k] = bool((np.asarray(ref) == px).all())
    return reference


def run(sessions: int = 20, requests: int = 2, train_steps: int = 40, max_concurrent: int = 1,
        time_limit: float = 900.0, root: Path | None = None) -> dict[str, Any]:
    from app.__main__ import launch
    from app.services import AppServices, GenerateRequest, JobRequest, Settings
    from app.ui import build_app

    root = Path(root or tempfile.mkdtemp(prefix="app-load-"))
    settings = Settings(library=root / "lib", output=root / "out", device="cpu", max_concurrent_generations=max_concurrent)
    services = AppServices(settings)
    demo = build_app(services)
    port = _free_port()
    launch(demo, settings, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        tw = time.perf_counter()  # warm-up: the base model loads once, before the sessions start (cold start)
        services.generator.generate(GenerateRequest(PROMPT, steps=4, num_images=1))
        cold = time.perf_counter() - tw
        t0 = time.perf_counter()
        job = services.jobs.create(JobRequest([str(_ring(root / "ring.png"))], steps=train_steps, sample_every=train_steps,
                                              sample_steps=4, checkpoint_every=max(1, train_steps // 4), name="load"))
        results, gen_wall = _sessions(f"http://127.0.0.1:{port}/", sessions, requests, t0 + time_limit)
        while job.state in ("queued", "running") and time.perf_counter() - t0 < time_limit:
            time.sleep(0.5)
        train_wall = time.perf_counter() - t0
        reference = _own_images(services, results)
    finally:
        demo.close()
    lat = sorted(x for rec in results.values() for x in rec["latency"])
    files = [f for rec in results.values() for f in rec["files"]]
    p = services.jobs.progress(job)
    return {"sessions": sessions, "requests_per_session": requests, "max_concurrent": max_concurrent,
            "served": len(lat), "expected": sessions * requests,
            "errors": [e for rec in results.values() for e in rec["errors"]][:5],
            "unfinished_sessions": sessions - len(results),
            "connect_retries": sum(rec["connect_retries"] for rec in results.values()),
            "distinct_files": len(set(files)) == len(files),
            "own_images": all(reference.values()) and len(reference) == sessions,
            "latency_s": {"p50": _q(lat, 0.5), "p95": _q(lat, 0.95), "max": lat[-1] if lat else math.nan},
            "cold_start_s": cold, "throughput_per_s": len(lat) / gen_wall if gen_wall else math.nan,
            "generation_wall_s": gen_wall,
            "training": {"state": job.state, "steps": p["step"], "total": p["total"], "wall_s": train_wall,
                         "finite_losses": all(math.isfinite(v) for _, v in p["losses"])}}


def _q(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, int(q * len(values)))] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--sessions", type=int, default=20)
    a.add_argument("--requests", type=int, default=2)
    a.add_argument("--train-steps", type=int, default=40)
    a.add_argument("--max-concurrent", type=int, default=1)
    a.add_argument("--time-limit", type=float, default=900.0)
    args = a.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = run(args.sessions, args.requests, args.train_steps, args.max_concurrent, args.time_limit)
    lat = r["latency_s"]
    print(f"{r['served']}/{r['expected']} requests served from {r['sessions']} sessions (concurrency "
          f"{r['max_concurrent']}); latency p50 {lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, max {lat['max']:.2f} s; "
          f"{r['throughput_per_s']:.2f} req/s (cold start {r['cold_start_s']:.1f} s before); own images only: "
          f"{r['own_images']}, distinct files: {r['distinct_files']}; connection retries: {r['connect_retries']}; "
          f"training {r['training']['state']} {r['training']['steps']}/{r['training']['total']} steps in "
          f"{r['training']['wall_s']:.0f} s, finite losses: {r['training']['finite_losses']}")
    print(json.dumps(r, indent=1, default=str))


if __name__ == "__main__":
    main()
