"""Stop (SIGTERM, as the app sends it) during a real trainer subprocess: the step under way finishes, a checkpoint of
that step is written, the exit code is ``EXIT_STOPPED``, no final adapter; resuming from it ends exactly where an
uninterrupted run ends.

The stopped runs ask for many steps so that the signal surely lands mid-run; the LR schedule is constant (the
default), so the comparison runs may ask for fewer steps and still follow the same trajectory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from training import train_llm, train_tlora
from training.loop import EXIT_STOPPED

from .conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def stop_mid_run(args: list[str], progress: Path, log_file: Path, after: int = 3) -> tuple[int, int, str]:
    """Start ``python -m <args>``, SIGTERM it once ``progress`` shows step >= ``after``; (exit code, last step, log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with open(log_file, "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=logf, stderr=subprocess.STDOUT)
        try:
            end = time.time() + 120
            while _last_step(progress) < after and proc.poll() is None and time.time() < end:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
    return rc, _last_step(progress), log_file.read_text()


def _last_step(progress: Path) -> int:
    if not progress.is_file():
        return 0
    lines = [ln for ln in progress.read_text().splitlines() if ln.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), "resumed run differs"


def test_tlora_cli_stops_on_sigterm_with_a_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(images / "a.png")
    common = ["--instance_data_dir", str(images), "--placeholder_token", "sks", "--resolution", "32", "--lora_rank",
              "8", "--min_rank", "4", "--cpu", "--no-progress", "--report_to", "none", "--validation_steps", "0",
              "--checkpointing_steps", "0", "--lora_dropout", "0.1", "--random_flip"]
    out = tmp_path / "stopped"
    rc, step, text = stop_mid_run(["training.train_tlora", *common, "--max_train_steps", "5000", "--output_dir",
                                   str(out), "--progress_file", str(tmp_path / "p.jsonl")], tmp_path / "p.jsonl",
                                  tmp_path / "log.txt")
    ckpt = out / "checkpoints" / f"checkpoint-{step}"
    assert rc == EXIT_STOPPED, text[-3000:]
    assert 3 <= step < 5000 and f"stopped at step {step}/5000; checkpoint saved to {ckpt}; resume with " \
                                  "--resume_from_checkpoint latest" in text
    assert [p.name for p in (out / "checkpoints").iterdir()] == [ckpt.name]  # no periodic ones: the stop wrote it
    assert (ckpt / "adapter.safetensors").is_file() and not (out / "tlora.safetensors").exists()  # not "finished"
    n = str(step + 3)
    train_tlora.main([*common, "--max_train_steps", n, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    train_tlora.main([*common, "--max_train_steps", n, "--output_dir", str(tmp_path / "straight")])
    assert_same_tensors(out / "tlora.safetensors", tmp_path / "straight" / "tlora.safetensors")


def test_llm_cli_stops_on_sigterm_with_a_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    from .test_llm_train import make_tiny_folder

    model = make_tiny_folder(tmp_path / "llama")
    common = ["--model", str(model), "--train_file", str(FIXTURES / "llm_shout_train.jsonl"), "--eval_fraction", "0",
              "--max_length", "64", "--lr", "1e-2", "--train_batch_size", "4", "--lora_dropout", "0.1",
              "--checkpointing_steps", "0", "--report_to", "none", "--no-progress"]
    out = tmp_path / "stopped"
    rc, step, text = stop_mid_run(["training.train_llm", *common, "--max_train_steps", "100000", "--output_dir",
                                   str(out), "--progress_file", str(tmp_path / "p.jsonl")], tmp_path / "p.jsonl",
                                  tmp_path / "log.txt")
    assert rc == EXIT_STOPPED, text[-3000:]
    assert f"stopped at step {step}/100000; checkpoint saved to {out / f'checkpoint-{step}'}" in text
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert not (out / "adapter.safetensors").exists()
    n = str(step + 3)
    train_llm.main([*common, "--max_train_steps", n, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    train_llm.main([*common, "--max_train_steps", n, "--output_dir", str(tmp_path / "straight")])
    assert_same_tensors(out / "adapter.safetensors", tmp_path / "straight" / "adapter.safetensors")
