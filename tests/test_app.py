"""The app's services without Gradio or a browser: generation cache and inputs, the library, training jobs."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lora_diffusion as ld
from app.services import (
    AdapterUse,
    AppError,
    AppServices,
    GenerateRequest,
    JobManager,
    JobRequest,
    Settings,
    parse_models,
    parse_seed,
    read_users,
    safe_name,
)
from lora_diffusion.generate import load_pipeline
from training.loop import EXIT_STOPPED

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red star on a blue background"


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> AppServices:
    root = tmp_path_factory.mktemp("app")
    return AppServices(Settings(library=root / "lib", output=root / "out", device="cpu"))


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    """A random LoRA on the demo model's UNet (strong enough to change images)."""
    pipe = load_pipeline(None)
    ld.add_adapter(pipe.unet, ld.AdapterSpec("lora", rank=4, targets="unet-full", seed=0))
    with torch.no_grad():
        for _, p in ld.adapter_parameters(pipe.unet):
            p.normal_(0, 0.2)
    return ld.save_adapter(pipe.unet, tmp_path_factory.mktemp("a") / "tlora.safetensors")


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(int)


def req(*adapters: AdapterUse, **kw) -> GenerateRequest:
    return GenerateRequest(PROMPT, steps=kw.pop("steps", 3), num_images=kw.pop("num_images", 1), adapters=adapters, **kw)


# --- generation ---
def test_generates_with_the_embedded_model_by_default(services) -> None:
    seen: list[float] = []
    images = services.generator.generate(req(num_images=2), progress=lambda f, desc: seen.append(f))
    assert len(images) == 2 and images[0].size == (32, 32)  # native size
    assert seen[-1] == pytest.approx(1.0) and len(seen) == 6
    loads = services.generator.loads
    again = services.generator.generate(req(num_images=2))
    assert services.generator.loads == loads  # cached, not reloaded
    assert (pixels(images) == pixels(again)).all()  # seeded


def test_scales_change_in_place_and_same_content_loads_once(services, lora_file, tmp_path) -> None:
    """Two copies of one file (other names, other folders) are one adapter; a new weight reloads nothing."""
    copy = tmp_path / "other-name.safetensors"
    copy.write_bytes(lora_file.read_bytes())
    gen = services.generator
    base = pixels(gen.generate(req()))
    one = pixels(gen.generate(req(AdapterUse(str(lora_file), 1.0, "tlora.safetensors"))))
    loads = gen.loads
    pipe = next(reversed(gen._pipes.values()))
    half = pixels(gen.generate(req(AdapterUse(str(copy), 0.5, "other-name.safetensors"))))
    off = pixels(gen.generate(req(AdapterUse(str(copy), 1.0, "x", enabled=False))))
    assert gen.loads == loads and next(reversed(gen._pipes.values())) is pipe  # same pipeline, scales set in place
    assert ld.list_adapters(pipe) == [f"a{gen.hashes(lora_file)[:16]}"]  # loaded once, named by content
    assert np.abs(one - base).max() > 10 and np.abs(half - one).max() > 0 and (off == base).all()


def test_two_files_with_the_same_name_blend(services, lora_file, tmp_path) -> None:
    """Every run writes tlora.safetensors: two different ones must load side by side."""
    pipe = load_pipeline(None)
    ld.add_adapter(pipe.unet, ld.AdapterSpec("lora", rank=2, targets="unet-full", seed=1))
    with torch.no_grad():
        for _, p in ld.adapter_parameters(pipe.unet):
            p.normal_(0, 0.2)
    (tmp_path / "b").mkdir()
    other = ld.save_adapter(pipe.unet, tmp_path / "b" / "tlora.safetensors")
    images = services.generator.generate(req(AdapterUse(str(lora_file), 0.7, "tlora.safetensors"),
                                             AdapterUse(str(other), 0.7, "tlora.safetensors")))
    assert len(images) == 1
    assert len(services.generator._pipes) <= services.settings.max_pipelines  # LRU bound


@pytest.mark.parametrize("bad, match", [
    (dict(prompt=" "), "prompt: empty"),
    (dict(steps=0), "steps: expected 1..200"),
    (dict(num_images=99), "number of images"),
    (dict(guidance=float("nan")), "guidance"),
    (dict(seed=2**64), "seed: expected an integer in 0..2\\^64-1"),
    (dict(seed=2**64 - 1, num_images=2), "seed: expected an integer in 0..2\\^64-2 for 2 image"),
    (dict(width=30), "width: expected a multiple of 8"),
    (dict(model="/etc"), "base model: '/etc' is not one of the models this server offers"),
    (dict(model="stabilityai/sdxl-turbo"), "base model"),
])
def test_bad_requests_are_named(services, bad, match) -> None:
    kw = dict(prompt=PROMPT, steps=3, num_images=1) | bad
    with pytest.raises(AppError, match=match):
        services.generator.generate(GenerateRequest(**kw))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 1e6, -1e6])
def test_non_finite_or_huge_scales_are_refused(services, lora_file, scale) -> None:
    with pytest.raises(AppError, match="weight of my.safetensors: expected a finite number in -4..4"):
        services.generator.generate(req(AdapterUse(str(lora_file), scale, "my.safetensors")))


@pytest.mark.parametrize("value, ok", [("", None), (None, None), ("12", 12), (7, 7), (str(2**64 - 1), 2**64 - 1),
                                       (str(2**64), None), ("-1", None), ("1.5", None), ("abc", None), (float("inf"), None)])
def test_seed_field(value, ok) -> None:
    if ok is None:
        with pytest.raises(AppError, match="seed: "):
            parse_seed(value)
    else:
        assert parse_seed(value) == ok


def test_bad_adapter_fails_before_the_base_model_loads(tmp_path) -> None:
    """A broken file is refused from its header, named as the user knows it (not the server's temp path)."""
    services = AppServices(Settings(library=tmp_path / "lib", output=tmp_path / "out", device="cpu"))
    bad = tmp_path / "tmp123" / "upload.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(AppError, match="adapter my-lora.safetensors: not a readable adapter file") as e:
        services.generator.generate(req(AdapterUse(str(bad), 1.0, "my-lora.safetensors")))
    assert str(bad.parent) not in str(e.value) and services.generator.loads == 0


# --- library ---
def test_library_import_list_rename_export_delete(services, lora_file, tmp_path) -> None:
    lib = services.library
    name = lib.import_file(lora_file, "My Style.safetensors")
    again = lib.import_file(lora_file, "My Style.safetensors")
    assert (name, again) == ("My Style", "My Style-2")
    entry = next(e for e in lib.entries() if e["name"] == name)
    assert entry["format"] == "canonical" and entry["variant"] == "lora" and entry["rank"] == 4 and entry["size"] > 0
    assert lib.rename(again, "second") == "second"
    kohya = lib.export("second", "kohya", tmp_path / "exp", lambda: load_pipeline(None))
    assert kohya.is_file() and ld.io.detect.detect_format(list(ld.io.files.read_header(kohya)[0]), {}) == "kohya"
    lib.delete("second")
    assert "second" not in [e["name"] for e in lib.entries()]


def test_library_marks_other_families_without_hiding_them(services, tmp_path) -> None:
    from tests.app_harness import random_lora

    xl = random_lora(tmp_path / "xl-style.safetensors", seed=5)
    tensors, meta = ld.io.files.read_safetensors(xl)
    ld.io.files.write_safetensors(xl, dict(tensors), {**meta, "ss_base_model_version": "sdxl_base_v1-0"})
    name = services.library.import_file(xl, "xl-style.safetensors")
    entries = {e["name"]: e for e in services.library.entries()}
    assert entries[name]["other_family"] and entries[name]["base"] == "SDXL"
    assert not any(e["other_family"] for n, e in entries.items() if n != name)
    services.library.delete(name)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "..", "a/../../b"])
def test_library_refuses_names_that_are_paths(services, name) -> None:
    with pytest.raises(AppError, match="adapter: (no adapter named|expected a file name)"):
        services.library.path(name)


def test_library_import_refuses_bad_files(services, tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AppError, match="adapter file notes.txt: expected a .safetensors file"):
        services.library.import_file(text)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(AppError, match="adapter junk.safetensors: not a readable adapter file"):
        services.library.import_file(junk)
    big = Settings(library=tmp_path / "l2", output=tmp_path / "o2", device="cpu", max_upload_mb=0.00001)
    with pytest.raises(AppError, match="more than the 1e-05 MB"):
        AppServices(big).library.import_file(junk)
    with pytest.raises(AppError, match="does not allow importing files by path"):
        services.library.import_server_path("/etc/passwd")


def test_safe_name() -> None:
    assert safe_name("../../etc/pass wd.safetensors") == "pass wd"
    with pytest.raises(AppError, match="new name"):
        safe_name("..", "new name")


# --- settings ---
def test_settings_models_and_users(tmp_path) -> None:
    from app.services.settings import DEMO_DIT, demo_dit_path

    dit = demo_dit_path()  # the embedded SD3 demo model, offered by default once built
    assert parse_models([]) == {"demo": None, **({DEMO_DIT: str(dit)} if dit else {})}
    assert parse_models(["demo", "sd15=/m/sd15", "/m/xl"]) == {"demo": None, "sd15": "/m/sd15", "xl": "/m/xl"}
    users = tmp_path / "users"
    users.write_text("# team\nbob:pw2\n")
    assert read_users(["alice:pw"], str(users)) == [("alice", "pw"), ("bob", "pw2")]
    with pytest.raises(AppError, match="--auth: expected user:password"):
        read_users(["alice"], None)


# --- training jobs ---
def image(path: Path, size=(48, 40), color=(200, 30, 30)) -> str:
    Image.new("RGB", size, color).save(path)
    return str(path)


def wait(jobs: JobManager, job, states=("done", "failed", "stopped"), timeout=150.0, until=None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if (until and until()) or (until is None and job.state in states):
            return
        time.sleep(0.25)
    raise AssertionError(f"job {job.id}: still {job.state} after {timeout}s; log:\n{jobs.log_tail(job, 30)}")


def test_stop_kills_a_trainer_that_does_not_save_within_the_grace(tmp_path) -> None:
    """SIGKILL only as a last resort: a process that ignores SIGTERM is killed after Settings.stop_grace_s, and the
    job says so (no false "checkpoint saved")."""
    import subprocess
    import sys

    from app.services.jobs import Job

    settings = Settings(library=tmp_path / "lib", output=tmp_path / "out", device="cpu", stop_grace_s=1.0)
    jm = AppServices(settings).jobs
    job = Job("stubborn0001", "stubborn", "local", {"variant": "tlora", "model": "demo", "steps": 10}, "demo")
    jm.dir(job).mkdir(parents=True)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
               f"time.sleep(60)  # {jm.dir(job)}"
    proc = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline() == b"ready\n"  # its SIGTERM handler is in place
    jm._procs[job.id], jm.jobs[job.id], job.state, job.pid = proc, job, "running", proc.pid
    import threading

    threading.Thread(target=jm._follow, args=(job,), daemon=True).start()
    t0 = time.time()
    jm.stop(job.id)
    wait(jm, job, ("stopped",), timeout=30)
    assert 1.0 <= time.time() - t0 < 20 and job.returncode == -9
    assert job.detail == "stopped at step 0 (killed)"
    assert job.error == "the trainer did not save within 1 s of Stop and was killed before its first checkpoint; " \
                        "Resume starts it again"


@pytest.mark.parametrize("kw, match", [
    (dict(token="my dog"), "placeholder token: expected one word without spaces"),
    (dict(token=""), "placeholder token"),
    (dict(variant="nope"), "variant: 'nope' is not one of"),
    (dict(steps=0), "total steps: expected an integer in 1..100000"),
    (dict(learning_rate=5.0), "learning rate"),
    (dict(images=[]), "images: none"),
    (dict(model="/etc"), "base model"),
])
def test_job_inputs_are_named(services, tmp_path, kw, match) -> None:
    kw = {"images": [image(tmp_path / "a.png")], **kw}
    with pytest.raises(AppError, match=match):
        services.jobs.create(JobRequest(**kw))


def test_job_refuses_non_images_small_and_oversized(services, tmp_path) -> None:
    fake = tmp_path / "cat.png"
    fake.write_bytes(b"not a png at all")
    with pytest.raises(AppError, match="image cat.png: not an image this app can read"):
        services.jobs.create(JobRequest([str(fake)], image_names=["cat.png"]))
    with pytest.raises(AppError, match=r"image tiny.png: 16x16 px, smaller than the 32 px"):
        services.jobs.create(JobRequest([image(tmp_path / "tiny.png", (16, 16))], image_names=["tiny.png"]))
    small = AppServices(Settings(library=tmp_path / "l", output=tmp_path / "o", device="cpu", max_image_mb=1e-4))
    with pytest.raises(AppError, match="image a.png: .* MB, more than the 0.0001 MB"):
        small.jobs.create(JobRequest([image(tmp_path / "a.png", (64, 64))]))
    assert not [j for j in services.jobs.list() if j.state == "queued" and not (services.jobs.dir(j) / "config.yaml").exists()]


@pytest.mark.slow
def test_job_trains_stops_resumes_and_survives_a_restart(tmp_path, monkeypatch) -> None:
    """A real trainer subprocess: Stop saves a checkpoint at the step it stopped at (not the last periodic one),
    resume continues from it, the finished adapter reaches the library with a sample, and a new JobManager (an app
    restart) finds everything."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = Settings(library=tmp_path / "lib", output=tmp_path / "out", device="cpu")
    services = AppServices(settings)
    jm = services.jobs
    job = jm.create(JobRequest([image(tmp_path / "ring.png", (64, 48))], steps=60, checkpoint_every=50,
                               sample_every=60, sample_steps=2, name="ring"))
    second = jm.create(JobRequest([image(tmp_path / "b.png")], steps=30, checkpoint_every=2, sample_every=30,
                                  sample_steps=2, name="second"))
    assert job.state == "running" and second.state == "queued" and jm.place(second) == 2  # one job at a time
    from app.ui import UI

    ui = UI(services)
    assert (ui._started(job, "Job"), ui._started(second, "Job")) == (
        "Job ring started · training caption: 'a sks'",  # a flat one-color image: no two colors to name
        "Job second queued: place 2 in the training queue · training caption: 'a sks'")
    wait(jm, job, until=lambda: jm.progress(job)["step"] >= 3)
    ui.status_tick(job.id)  # the page's poll sees "running"
    assert ui.status_tick(job.id)[-1] != ""  # nothing moved: the last action's message stays
    jm.stop(job.id)
    wait(jm, job, ("stopped",))
    assert ui.status_tick(job.id)[-1] == ""  # the state moved on: a stale "queued"/"stopping" message is cleared
    kept, step = jm.latest_checkpoint(job), jm.progress(job)["step"]
    assert kept is not None and kept[0] == step and 3 <= step < 50  # saved at the stop step; no periodic one before
    assert job.returncode == EXIT_STOPPED and job.detail == f"stopped at step {step} (checkpoint saved)" and not job.error
    assert f"stopped at step {step}/60; checkpoint saved to" in jm.log_tail(job, 5)
    assert jm.current_adapter(job) == kept[1]  # 'try a prompt' uses it while stopped
    # the queue moved on; the second trainer crashes (killed): failed, named, its checkpoint kept
    wait(jm, second, until=lambda: (jm.latest_checkpoint(second) or (0,))[0] >= 2)
    os.kill(second.pid, 9)
    wait(jm, second, ("failed",))
    assert second.error.startswith("the trainer ended unexpectedly (killed by signal 9)")
    assert "the last checkpoint (step" in second.error and "Resume continues from it" in second.error
    jm.resume(job.id)
    wait(jm, job, ("done",))
    log_text = (jm.dir(job) / "log.txt").read_text()
    assert f"resumed from {kept[1].parent}" in log_text
    p = jm.progress(job)
    assert p["step"] == 60 and len(p["losses"]) == 60 and all(np.isfinite([v for _, v in p["losses"]]))
    assert job.detail == ""  # the resumed job says "done", not its old stop
    entry = next(e for e in services.library.entries() if e["name"] == "ring")
    assert entry["sample"] and entry["training"]["steps"] == 60 and entry["trigger_words"] == ["sks"]
    assert set(jm.outputs(job)) == {"canonical", "kohya", "diffusers"}
    # an app restart: job state comes from disk; a job whose process died with the app is resumable
    assert jm.latest_checkpoint(second) is not None  # nothing trained was lost
    state = json.loads((jm.dir(second) / "job.json").read_text())
    (jm.dir(second) / "job.json").write_text(json.dumps({**state, "state": "running", "pid": 999999}))
    again = JobManager(settings, services.library)
    assert again.get(job.id).state == "done" and again.get(second.id).state == "stopped"
    assert "Resume continues it" in again.get(second.id).error


def test_handler_turns_a_mistake_into_one_named_message_and_one_log_line(services, caplog) -> None:
    import gradio as gr

    from app.ui import UI

    ui = UI(services)
    with caplog.at_level(logging.INFO, logger="app"), pytest.raises(gr.Error, match="seed: empty"):
        ui.generate(PROMPT, "", "", 3, 4.0, None, 1, "demo", False, "", True, 1.0, "", True, 1.0, "", True, 1.0,
                    "", True, 1.0, progress=lambda *a, **k: None)
    records = [r for r in caplog.records if r.name == "app"]
    assert len(records) == 1 and records[0].exc_info is None and "seed: empty" in records[0].getMessage()
    with pytest.raises(gr.Error, match="weight of nope: expected a finite number|adapter: no adapter named 'nope'"):
        ui.generate(PROMPT, "", "0", 3, 4.0, None, 1, "demo", False, "nope", True, float("nan"), "", True, 1.0,
                    "", True, 1.0, "", True, 1.0, progress=lambda *a, **k: None)


def test_blend_fuses_chosen_or_retrieved_loras(services, lora_file, tmp_path) -> None:
    """Manual K-LoRA over two library adapters; automatic mode retrieves from the library, with a gate plot."""
    from tests.app_harness import random_lora

    lib = services.library
    a = lib.import_file(lora_file, "dots.safetensors")
    b = lib.import_file(random_lora(tmp_path / "stripes.safetensors", seed=3), "stripes.safetensors")
    uses = (AdapterUse(str(lib.path(a)), 0.8, a), AdapterUse(str(lib.path(b)), 0.5, b))
    r = services.generator.blend(req(*uses), "klora", plot_to=tmp_path / "k.png")
    assert [c["name"] for c in r["chosen"]] == [a, b] and [c["weight"] for c in r["chosen"]] == [0.8, 0.5]
    auto = services.generator.blend(req(), "gated", lib.folder, 2, tmp_path / "g.png")
    assert len(auto["chosen"]) == 2 and all(c["score"] is not None for c in auto["chosen"])
    assert auto["plot"] is not None and auto["plot"].is_file() and auto["images"][0].size == (32, 32)
    with pytest.raises(AppError, match="fusion method: expected one of"):
        services.generator.blend(req(), "nope", lib.folder)


@pytest.mark.slow
def test_llm_job_trains_then_both_models_answer(tmp_path, monkeypatch) -> None:
    """The LLM tab's services: a JSONL job on a tiny Llama folder (stands in for SmolLM2), then base vs adapted."""
    from app.services import LLMJobRequest
    from tests.test_llm_train import TRAIN, make_tiny_folder

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    folder = make_tiny_folder(tmp_path / "tiny")
    services = AppServices(Settings(library=tmp_path / "lib", output=tmp_path / "out", device="cpu",
                                    llm_models={"tiny": str(folder)}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"question": "no"}\n')
    with pytest.raises(AppError, match="training file bad.jsonl, line 2: expected an object with"):
        services.jobs.create_llm(LLMJobRequest(str(bad), "tiny", file_name="bad.jsonl"))
    bad.write_text("not json\n")
    with pytest.raises(AppError, match="training file bad.jsonl: not JSON lines"):
        services.jobs.create_llm(LLMJobRequest(str(bad), "tiny", file_name="bad.jsonl"))
    with pytest.raises(AppError, match="variant: 'tlora' is not one of"):
        services.jobs.create_llm(LLMJobRequest(str(TRAIN), "tiny", variant="tlora"))
    job = services.jobs.create_llm(LLMJobRequest(str(TRAIN), "tiny", steps=8, learning_rate=1e-2))
    wait(services.jobs, job, timeout=120)
    assert job.state == "done", services.jobs.log_tail(job, 30)
    p = services.jobs.progress(job)
    assert p["step"] == 8 and len(p["losses"]) == 8
    base, adapted = services.llm.reply_both("tiny", services.jobs.current_adapter(job), job.name,
                                            [{"role": "user", "content": "hello"}], 8)
    assert isinstance(base, str) and isinstance(adapted, str)
    with pytest.raises(AppError, match="message: empty"):
        services.llm.reply_both("tiny", services.jobs.current_adapter(job), job.name, [{"role": "user", "content": ""}])


def test_stop_ends_a_generation_and_the_next_one_runs(services) -> None:
    import gradio as gr

    from app.ui import UI

    ui = UI(services)
    calls: list[float] = []

    def press_stop(f, desc=None):  # the user presses Stop during the first denoising step
        calls.append(f)
        ui.stop_generation()

    with pytest.raises(gr.Error, match="stopped"):
        ui.generate(PROMPT, "", "0", 50, 4.0, None, 4, "demo", False, *["", True, 1.0] * 4, progress=press_stop)
    assert len(calls) == 1  # stopped at the next step, not after 200
    gallery, big, files = ui.generate(PROMPT, "", "0", 2, 4.0, None, 1, "demo", False, *["", True, 1.0] * 4,
                                      progress=lambda *a, **k: None)
    assert len(files) == 1


def test_cli_flags_become_settings(tmp_path) -> None:
    from app.__main__ import parse, settings_from

    a = parse(["--port", "7999", "--auth", "alice:pw", "--model", "demo", "--model", "sd15=/m/sd15", "--library",
               str(tmp_path / "lib"), "--output", str(tmp_path / "out"), "--device", "cpu", "--max-concurrent", "2"])
    s = settings_from(a)
    assert a.port == 7999 and a.auth == ["alice:pw"] and s.models == {"demo": None, "sd15": "/m/sd15"}
    assert s.library == (tmp_path / "lib").resolve() and s.device == "cpu" and s.max_concurrent_generations == 2
    assert not s.allow_server_paths  # importing by server path is off unless the operator turns it on


def test_session_folders_are_apart_and_cleaned(tmp_path) -> None:
    from app.services import Sessions

    sessions = Sessions(tmp_path / "s", ttl_s=0)
    a, b = sessions.folder("abc123"), sessions.folder("xyz789")
    (a / "x.png").write_bytes(b"1")
    assert a != b and not (b / "x.png").exists()
    for bad in ("../etc", "a/b", ".."):
        with pytest.raises(AppError, match="session"):
            sessions.folder(bad)
    sessions.close("abc123")
    assert not a.exists() and b.exists()
    time.sleep(0.01)
    assert sessions.sweep() == 1 and not b.exists()


def test_library_table_and_inspector_name_the_same_base(services, lora_file) -> None:
    from app.ui import UI

    ui = UI(services)
    name = services.library.import_file(lora_file, "demo-style.safetensors")
    try:
        shown, _ = ui.library_inspect(name)
        row = ui.library_table().set_index("name").loc[name]
        assert shown["base"] == row["base"] and shown["base"] != "unknown"
    finally:
        services.library.delete(name)


def test_library_squeeze_makes_a_smaller_plain_lora_entry(services, lora_file) -> None:
    """The Library tab's Squeeze button (ui.library_squeeze -> LibraryService.squeeze): a demo-model file, read through
    the served model, becomes a new plain-LoRA entry of the asked rank; bad targets are one clear error."""
    lib = services.library
    name = lib.import_file(lora_file, "to-squeeze.safetensors")
    new, summary = lib.squeeze(name, rank=2, pipe_factory=lambda: load_pipeline(None))
    entry = next(e for e in lib.entries() if e["name"] == new)
    assert new == "to-squeeze-r2" and entry["variant"] == "lora" and entry["rank"] == 2
    assert entry["training"]["squeezed_from"] == name and "total relative error" in summary
    assert entry["size"] < next(e for e in lib.entries() if e["name"] == name)["size"]
    e_new, _ = lib.squeeze(name, energy=1.0, pipe_factory=lambda: load_pipeline(None))
    assert next(e for e in lib.entries() if e["name"] == e_new)["training"]["total_error"] < 1e-5  # all energy: exact
    with pytest.raises(AppError, match=r"squeeze to-squeeze: squeeze --energy: expected a fraction in \(0, 1\]"):
        lib.squeeze(name, energy=1.5, pipe_factory=lambda: load_pipeline(None))
    for n in (name, new, e_new):
        lib.delete(n)


def test_demo_caption_names_the_images_two_colors(tmp_path) -> None:
    """On a demo model the training caption names the subject's and background's colors when the images are a flat
    pair of the demo world's colors (so the trainer's repainting, recolor_p, works), else it is the bare 'a {0}':
    never colors the image does not have."""
    import numpy as np
    from PIL import ImageDraw

    from app.services.captions import BARE, demo_caption, image_colors

    def ring(name: str, fg: tuple, bg: tuple) -> Path:
        im = Image.new("RGB", (48, 40), bg)
        ImageDraw.Draw(im).ellipse((10, 6, 38, 34), outline=fg, width=5)
        im.save(tmp_path / name)
        return tmp_path / name

    assert image_colors(Path(__file__).parents[1] / "assets/examples/ring/ring.png") == ("red", "blue")
    assert image_colors(ring("a.png", (220, 30, 30), (30, 60, 200))) == ("red", "blue")  # near, not exact: named
    assert demo_caption([ring("b.png", (35, 165, 55), (245, 245, 245))]) == "a green {0} on a white background"
    assert demo_caption([ring("c.png", (245, 135, 15), (20, 20, 20))]) == "an orange {0} on a black background"
    assert image_colors(ring("d.png", (120, 200, 240), (20, 20, 20))) is None  # light blue: no color word names it
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(tmp_path / "e.png")
    assert image_colors(tmp_path / "e.png") is None  # a photo-like image
    assert image_colors(image(tmp_path / "f.png")) is None  # one flat color: no subject
    assert demo_caption([tmp_path / "a.png", tmp_path / "b.png"]) == BARE  # two pairs: no one caption is true


def test_each_action_reports_in_its_own_status_box(tmp_path, lora_file) -> None:
    """A failed action's message goes into its tab's status box (not a toast, which outlived the next, successful
    action), with the action's other outputs kept (no 'Error' badge over the library table); the next action's
    result replaces it, and the message is handed out once (it never reappears). Every handled action of the page
    has such a failure event."""
    import gradio as gr

    from app.ui import UI, build_app

    services = AppServices(Settings(library=tmp_path / "lib", output=tmp_path / "out", device="cpu",
                                    allow_server_paths=True))
    ui = UI(services)
    with pytest.raises(gr.Error, match="server path: no such file") as err:
        ui.library_import_path(str(tmp_path / "missing.safetensors"))
    assert err.value.visible is False  # no toast
    *kept, box = ui.failed(7)
    assert all(k == gr.skip() for k in kept) and box.startswith("⚠") and "no such file" in box
    *_, said = ui.library_import_path(str(lora_file))
    assert said.startswith("Imported") and "⚠" not in said
    assert "no such file" not in ui.failed(2)[-1]  # handed out once: it does not come back
    with pytest.raises(gr.Error):
        ui.library_rename("", "x")
    assert ui.failed(2)[-1] == "⚠ **adapter: none selected**"

    demo = build_app(services)
    failures = {f.trigger_after: f for f in demo.fns.values() if f.trigger_only_on_failure}
    actions = [(i, f) for i, f in demo.fns.items() if hasattr(getattr(f.fn, "__func__", f.fn), "__wrapped__")]
    assert len(actions) >= 17
    for i, f in actions:
        assert i in failures, f"{f.name}: no failure event writes its message into a status box"
        out = failures[i].outputs
        assert {o._id for o in f.outputs} <= {o._id for o in out} and isinstance(out[-1], gr.Markdown), f.name


def test_no_job_status_names_what_each_tab_needs(services) -> None:
    from app.ui import UI

    ui = UI(services)
    assert ui.status(None)[0] == "No job yet: add the images of the subject and press Start."
    assert ui.llm_status(None)[0] == ui.llm_status_tick(None)[0] == \
        "No job yet: add the training file (.jsonl) and press Start."
