"""The model-agnostic pieces: ``training.loop.fit`` and ``training.checkpoint`` on a tiny regression."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from training.checkpoint import CheckpointError, CheckpointManager, GlobalRNG, TrainableParams
from training.loop import LoopConfig, NonFiniteLossError, StopSignals, TrainingStopped, fit


class Stream:
    """Random regression batches from a saved generator."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(4, 3, generator=self.gen)
        return x, x.sum(-1, keepdim=True) + 0.01 * torch.randn(4, 1, generator=self.gen)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])


def setup(tmp: Path, keep: int | None = None, identity: dict | None = None):
    from accelerate import Accelerator

    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.1), nn.Linear(8, 1))  # dropout: global RNG matters
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.9)
    model, opt = acc.prepare(model, opt)
    stream = Stream()
    mgr = CheckpointManager(tmp / "ckpt", identity or {"variant": "x"}, keep)
    shared = {"params": TrainableParams(model), "optimizer": opt, "sched": sched}
    local = {"rng": GlobalRNG(), "data": stream}
    return acc, model, opt, sched, stream, mgr, shared, local


def loss_fn(model: nn.Module):
    return lambda b: nn.functional.mse_loss(model(b[0]), b[1])


def run(tmp: Path, steps: int, every: int = 0, start: int = 0, resume: bool = False, keep: int | None = None,
        crash_at: int | None = None, nan_at: int | None = None, signal_at: dict[int, list[int]] | None = None):
    acc, model, opt, sched, stream, mgr, shared, local = setup(tmp, keep)
    if resume:
        start = mgr.load(mgr.find("latest"), shared, local)

    def hook(step: int, logs: dict) -> None:
        if every and step % every == 0:
            mgr.save(step, shared, local)
        if step == crash_at:
            raise KeyboardInterrupt  # a kill after this step's checkpoint
        if signal_at and step in signal_at:
            for sig in signal_at[step]:  # Stop in the app / Ctrl-C, delivered during this step
                os.kill(os.getpid(), sig)

    base = loss_fn(model)

    def lf(b):
        loss = base(b)
        return loss * float("nan") if nan_at is not None and len(seen) == nan_at - 1 else loss

    seen: list[int] = []
    hooks = [hook, lambda s, logs: seen.append(s)]
    on_stop = (lambda step: mgr.save_once(step, shared, local)) if signal_at is not None else None
    res = fit(acc, model, opt, sched, stream, lf, LoopConfig(steps, progress=False), start, hooks, on_stop)
    return res, mgr


def test_resume_after_kill_retraces_losses(tmp_path: Path) -> None:
    full, _ = run(tmp_path / "a", 8)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 8, every=3, crash_at=5)
    resumed, mgr = run(tmp_path / "b", 8, every=3, resume=True)
    assert resumed.first_step == 4  # checkpoint-3, steps 4-5 were lost with the kill
    assert resumed.losses == full.losses[3:]  # exactly, not approximately


def test_rotation_keeps_last_k_and_writes_atomically(tmp_path: Path) -> None:
    _, mgr = run(tmp_path, 7, every=2, keep=2)
    assert [p.name for p in mgr.checkpoints()] == ["checkpoint-4", "checkpoint-6"]
    assert not list(mgr.root.glob("*.tmp"))
    (mgr.root / "checkpoint-9.tmp").mkdir()  # an interrupted write: never listed, never resumed
    assert mgr.find("latest").name == "checkpoint-6"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match="step 5"):
        run(tmp_path, 8, every=2, nan_at=5)
    acc, model, opt, sched, stream, mgr, shared, local = setup(tmp_path)
    assert mgr.find("latest").name == "checkpoint-4"
    state = torch.load(mgr.find("latest") / "shared.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["params"].values())


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    _, mgr = run(tmp_path, 2, every=2)
    other = CheckpointManager(mgr.root, {"variant": "lora"})
    with pytest.raises(CheckpointError, match=r"variant='x' \(this run: 'lora'\)"):
        other.find("latest")
    with pytest.raises(CheckpointError, match="not a checkpoint of this trainer"):
        mgr.find(str(tmp_path))
    meta = json.loads((mgr.root / "checkpoint-2" / "checkpoint.json").read_text())
    assert meta["step"] == 2 and meta["identity"] == {"variant": "x"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_the_current_step_and_resume_retraces(tmp_path: Path, sig: int) -> None:
    """The first SIGTERM/SIGINT: the step under way finishes, checkpoint-<that step> is written (not the last periodic
    one), TrainingStopped; the handlers in place before are back; resuming from it retraces the uninterrupted run."""
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    full, _ = run(tmp_path / "a", 8)
    with pytest.raises(TrainingStopped, match=r"stopped at step 5/8; checkpoint saved to .*checkpoint-5; resume with "
                                              r"--resume_from_checkpoint latest") as stop:
        run(tmp_path / "b", 8, every=3, signal_at={5: [sig]})
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before
    assert stop.value.step == 5 and stop.value.checkpoint.name == "checkpoint-5"
    resumed, mgr = run(tmp_path / "b", 8, every=3, resume=True)
    assert resumed.first_step == 6 and resumed.losses == full.losses[5:]  # nothing lost, exactly


def test_stop_at_a_periodic_checkpoint_is_not_written_twice(tmp_path: Path, caplog) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="training.checkpoint"), pytest.raises(TrainingStopped) as stop:
        run(tmp_path, 8, every=3, signal_at={3: [signal.SIGTERM]})
    assert stop.value.checkpoint.name == "checkpoint-3"
    assert sum("saved checkpoint" in r.message for r in caplog.records) == 1


def test_a_second_signal_aborts_at_once(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):  # SIGINT's previous handler: Python's KeyboardInterrupt
        run(tmp_path, 8, every=0, signal_at={2: [signal.SIGINT, signal.SIGINT]})
    assert not (tmp_path / "ckpt").exists()  # aborted: nothing saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_during_the_last_step_finishes_normally(tmp_path: Path) -> None:
    res, mgr = run(tmp_path, 4, signal_at={4: [signal.SIGTERM]})
    assert res.last_step == 4 and not mgr.checkpoints()  # complete: the trainer writes its final outputs
