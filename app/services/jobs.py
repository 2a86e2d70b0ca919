"""Training jobs: each a subprocess running ``training.train_tlora`` in its own folder, its state on disk.

    jobs/<id>/job.json        what was asked, the state (queued, running, stopping, stopped, done, failed), pid
    jobs/<id>/images/         the uploaded images, cropped to squares
    jobs/<id>/config.yaml     the trainer's configuration (``--config``)
    jobs/<id>/progress.jsonl  one line per step (the trainer's ``--progress_file``)
    jobs/<id>/run/            the trainer's output_dir: adapter files, checkpoints/, samples/
    jobs/<id>/log.txt         the trainer's output

One job trains at a time (the GPU); later ones wait in a queue and know their place. Stop sends SIGTERM: the trainer
finishes its step, saves a checkpoint of it and exits with ``EXIT_STOPPED`` (the job: "stopped at step N (checkpoint
saved)"); only if it has not within ``Settings.stop_grace_s`` is it killed. Resume continues from the latest
checkpoint. A finished adapter goes to the library. The state is on disk, so a reloaded page or a restarted app finds
every job: a process that outlived the app is followed again, one that died with it is shown stopped and can be resumed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lora_diffusion as ld
from training.loop import EXIT_STOPPED

from .errors import AppError
from .library import LibraryService, safe_name
from .presets import LIBRARY_FAMILY, PRESETS, model_family, trainer_family
from .settings import Settings

log = logging.getLogger("app")
ROOT = Path(__file__).resolve().parents[2]  # the folder holding training/ and lora_diffusion/
ACTIVE = ("queued", "running", "stopping")

@dataclass
class JobRequest:
    images: list[str]  # files (uploads); cropped to squares when the job is created
    token: str = "sks"
    class_word: str = ""
    variant: str = "tlora"
    model: str = "demo"
    steps: int | None = None  # None: the variant's default
    rank: int | None = None
    learning_rate: float | None = None
    prompt_template: str | None = None  # None: the preset's
    sample_prompts: str | None = None
    sample_every: int | None = None  # None: 4 times per run
    checkpoint_every: int | None = None  # None: 10 times per run
    seed: int = 0
    name: str = ""
    sample_steps: int | None = None  # denoising steps of samples (None: the preset's)
    pivotal: bool | None = True  # pivotal tuning: train the placeholder's embedding with the adapter (None: trainer's)
    image_names: list[str] = field(default_factory=list)  # what the user called the images (for messages)


@dataclass
class Job:
    id: str
    name: str
    owner: str
    request: dict[str, Any]
    family: str
    state: str = "queued"
    created: float = field(default_factory=time.time)
    queued_at: float = field(default_factory=time.time)
    pid: int | None = None
    returncode: int | None = None
    error: str = ""
    library_name: str = ""
    runs: int = 0  # starts (1 + resumes)
    kind: str = "diffusion"  # or "llm" (training.train_llm on a JSONL file)
    detail: str = ""  # what the state means, e.g. "stopped at step 12 (checkpoint saved)"


@dataclass
class LLMJobRequest:
    train_file: str  # an uploaded JSONL file
    model: str = "smollm2"  # a name from Settings.llm_models
    variant: str = "lora"
    rank: int | None = None
    steps: int = 100
    learning_rate: float | None = None
    name: str = ""
    file_name: str = ""  # what the user called the file (for messages)


def default_steps(settings: Settings, model: str, variant: str) -> int:
    """The trainer's own default number of steps for this model and variant (its recipe decides)."""
    from training.config import TLoRAConfig, resolve_defaults

    cfg = TLoRAConfig()
    cfg.model.pretrained_model_name_or_path = settings.model_source(model)
    cfg.adapter.variant = variant
    try:
        return int(resolve_defaults(cfg, ld.variant_names()).optim.max_train_steps)
    except Exception:  # an unknown variant is reported by create(); here only the estimate is at stake
        return 500


def _alive(pid: int | None, marker: str) -> bool:
    if not pid:
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return marker in cmd


class JobManager:
    def __init__(self, settings: Settings, library: LibraryService) -> None:
        self.settings, self.library = settings, library
        self.root = settings.jobs_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}
        self.jobs: dict[str, Job] = {}
        for f in sorted(self.root.glob("*/job.json")):
            try:
                job = Job(**json.loads(f.read_text()))
            except (OSError, ValueError, TypeError) as e:
                log.warning("jobs: %s is not a job file (%s); skipped", f, e)
                continue
            self.jobs[job.id] = job
            self._recover(job)
        self._pump()

    # --- files ---
    def dir(self, job: Job) -> Path:
        return self.root / job.id

    def _save(self, job: Job) -> None:
        path = self.dir(job) / "job.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(job), indent=1))
        tmp.replace(path)

    def _recover(self, job: Job) -> None:
        """After an app restart: follow a trainer that is still running; one that died is stopped (resumable)."""
        if job.state in ("running", "stopping"):
            if _alive(job.pid, str(self.dir(job))):
                threading.Thread(target=self._follow, args=(job,), daemon=True).start()
            else:
                job.state, job.error = "stopped", "the app stopped while this job ran; Resume continues it"
                self._save(job)

    # --- creating ---
    def create(self, req: JobRequest, owner: str = "local") -> Job:
        """Check everything the user chose, prepare the folder, queue the job; errors name the field."""
        from training.config import ConfigError, TLoRAConfig, resolve_defaults

        if req.variant not in ld.variant_names():
            raise AppError(f"variant: '{req.variant}' is not one of {ld.variant_names()}")
        token = (req.token or "").strip()
        if not token or any(c.isspace() for c in token):
            raise AppError(f"placeholder token: expected one word without spaces such as 'sks', got {req.token!r}")
        if any(c.isspace() for c in (req.class_word or "").strip()) and len(req.class_word.split()) > 3:
            raise AppError(f"class word: expected a short noun such as 'dog', got {req.class_word!r}")
        for fld, v, lo, hi in (("total steps", req.steps, 1, 100_000), ("rank", req.rank, 1, 1024),
                               ("sample every", req.sample_every, 1, 100_000),
                               ("checkpoint every", req.checkpoint_every, 1, 100_000)):
            if v is not None and not (isinstance(v, int) and lo <= v <= hi):
                raise AppError(f"{fld}: expected an integer in {lo}..{hi}, got {v}")
        if req.learning_rate is not None and not (0 < req.learning_rate < 1):
            raise AppError(f"learning rate: expected a number in (0, 1), got {req.learning_rate}")
        family = model_family(self.settings, req.model)
        preset = PRESETS[family]
        job = Job(uuid.uuid4().hex[:12], safe_name(req.name or f"{token}-{req.variant}", "job name"), owner,
                  asdict(req), family)
        folder = self.dir(job)
        folder.mkdir(parents=True)
        try:
            names = self._prepare_images(req, folder / "images", preset["resolution"])
            cfg = self._config(req, job, preset)
            resolve_defaults(TLoRAConfig(**_sections(cfg)), ld.variant_names())  # a bad choice fails here, not later
        except ConfigError as e:
            _rmtree(folder)
            raise AppError(str(e).replace("--", "")) from None
        except AppError:
            _rmtree(folder)
            raise
        job.request["image_names"] = names
        job.request["caption"] = cfg["prompt_template"]  # what the trainer is told (the page says it)
        import yaml

        (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        with self._lock:
            self.jobs[job.id] = job
            self._save(job)
            log.info("job %s (%s): queued, %d image(s), %s", job.id, job.name, len(names), req.variant)
            self._pump()
        return job

    def create_llm(self, req: LLMJobRequest, owner: str = "local") -> Job:
        """An LLM adapter job on an uploaded JSONL file (``training.train_llm``); errors name the field."""
        from lora_diffusion.llm import llm_variant_names

        label = Path(req.file_name or req.train_file).name
        if req.model not in self.settings.llm_models:
            raise AppError(f"LLM: '{req.model}' is not one of the models this server offers: {sorted(self.settings.llm_models)}")
        if req.variant not in llm_variant_names():
            raise AppError(f"variant: '{req.variant}' is not one of {llm_variant_names()} (LLM variants)")
        if not (isinstance(req.steps, int) and 1 <= req.steps <= 100_000):
            raise AppError(f"total steps: expected an integer in 1..100000, got {req.steps}")
        if req.rank is not None and not 1 <= req.rank <= 1024:
            raise AppError(f"rank: expected an integer in 1..1024, got {req.rank}")
        if req.learning_rate is not None and not 0 < req.learning_rate < 1:
            raise AppError(f"learning rate: expected a number in (0, 1), got {req.learning_rate}")
        n = check_jsonl(req.train_file, label, self.settings.max_upload_mb)
        job = Job(uuid.uuid4().hex[:12], safe_name(req.name or f"llm-{req.variant}", "job name"), owner, asdict(req),
                  "llm", kind="llm")
        folder = self.dir(job)
        (folder / "run").mkdir(parents=True)
        import shutil

        import yaml

        shutil.copyfile(req.train_file, folder / "data.jsonl")
        cfg = {"model": self.settings.llm_models[req.model], "train_file": str(folder / "data.jsonl"),
               "variant": req.variant, "rank": req.rank, "lr": req.learning_rate, "max_train_steps": req.steps,
               "output_dir": str(folder / "run"), "checkpointing_steps": max(1, req.steps // 10),
               "progress_file": str(folder / "progress.jsonl"), "report_to": "none", "progress": False,
               "cpu": self.settings.device == "cpu", "eval_fraction": 0.1 if n >= 10 else 0.0}
        (folder / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
        with self._lock:
            self.jobs[job.id] = job
            self._save(job)
            log.info("job %s (%s): queued, %d record(s), LLM %s", job.id, job.name, n, req.variant)
            self._pump()
        return job

    def _prepare_images(self, req: JobRequest, folder: Path, resolution: int) -> list[str]:
        from PIL import Image, UnidentifiedImageError

        if not req.images:
            raise AppError("images: none; drop one or more photos of the subject")
        if len(req.images) > self.settings.max_images:
            raise AppError(f"images: {len(req.images)}, more than the {self.settings.max_images} this server accepts")
        folder.mkdir(parents=True)
        names = []
        for i, src in enumerate(req.images):
            label = Path(req.image_names[i] if i < len(req.image_names) else src).name
            size = Path(src).stat().st_size
            if size > self.settings.max_image_mb * 2**20:
                raise AppError(f"image {label}: {size / 2**20:.1f} MB, more than the {self.settings.max_image_mb:g} MB "
                               "this server accepts")
            try:
                with Image.open(src) as im:
                    im = im.convert("RGB")
            except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
                raise AppError(f"image {label}: not an image this app can read (expected PNG, JPEG or WebP)") from None
            side = min(im.size)
            if side < resolution:
                raise AppError(f"image {label}: {im.width}x{im.height} px, smaller than the {resolution} px this model "
                               "trains at")
            im = crop_square(im)
            if side > 2 * resolution:
                im = im.resize((2 * resolution, 2 * resolution), Image.Resampling.LANCZOS)
            im.save(folder / f"{i:02d}.png")
            names.append(label)
        return names

    def _config(self, req: JobRequest, job: Job, preset: dict[str, Any]) -> dict[str, Any]:
        steps = req.steps or default_steps(self.settings, req.model, req.variant)
        folder = self.dir(job)
        cfg: dict[str, Any] = {
            "pretrained_model_name_or_path": self.settings.model_source(req.model), "variant": req.variant,
            "lora_rank": req.rank, "learning_rate": req.learning_rate, "max_train_steps": steps,
            "instance_data_dir": str(folder / "images"), "placeholder_token": req.token.strip(),
            "class_name": req.class_word.strip(), "prompt_template": _template(req, preset, folder / "images"),
            "resolution": preset["resolution"], "output_dir": str(folder / "run"),
            "checkpointing_steps": req.checkpoint_every or max(1, steps // 10), "checkpoints_total_limit": 3,
            "validation_prompts": req.sample_prompts or preset["sample_prompts"],
            "validation_steps": req.sample_every or max(1, steps // 4),
            "num_inference_steps": req.sample_steps or preset["num_inference_steps"], "guidance_scale": preset["guidance_scale"],
            "mixed_precision": preset.get("mixed_precision", "no") if self.settings.device != "cpu" else "no",
            "gradient_checkpointing": preset.get("gradient_checkpointing", False), "seed": req.seed,
            "cpu": self.settings.device == "cpu", "progress": False, "report_to": "none",
            "progress_file": str(folder / "progress.jsonl"), "model_family": trainer_family(self.settings, req.model),
            "targets": preset.get("targets")}
        return {k: v for k, v in {**cfg, **_pivotal(req, preset)}.items() if v is not None}

    # --- running ---
    def _pump(self) -> None:
        """Start the oldest queued job when no job is running."""
        with self._lock:
            if any(j.state in ("running", "stopping") for j in self.jobs.values()):
                return
            queued = sorted((j for j in self.jobs.values() if j.state == "queued"), key=lambda j: j.queued_at)
            if queued:
                self._launch(queued[0])

    def _launch(self, job: Job) -> None:
        folder = self.dir(job)
        trainer = "training.train_llm" if job.kind == "llm" else "training.train_tlora"
        args = [sys.executable, "-m", trainer, "--config", str(folder / "config.yaml")]
        if job.runs > 0:
            args += ["--resume_from_checkpoint", "latest"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "PYTHONUNBUFFERED": "1"}
        with open(folder / "log.txt", "a") as logf:
            proc = subprocess.Popen(args, cwd=str(folder), env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[job.id] = proc
        job.state, job.pid, job.returncode, job.error, job.runs = "running", proc.pid, None, "", job.runs + 1
        job.detail = ""
        self._save(job)
        log.info("job %s (%s): started, pid %d%s", job.id, job.name, proc.pid, " (resumed)" if job.runs > 1 else "")
        threading.Thread(target=self._follow, args=(job,), daemon=True).start()

    def _follow(self, job: Job) -> None:
        proc = self._procs.get(job.id)
        if proc is not None:
            rc = proc.wait()
        else:  # a trainer started by an earlier app process
            while _alive(job.pid, str(self.dir(job))):
                time.sleep(0.5)
            rc = None
        self._finished(job, rc)

    def _finished(self, job: Job, rc: int | None) -> None:
        with self._lock:
            self._procs.pop(job.id, None)
            job.returncode = rc
            outputs = self.outputs(job)
            self._record_speed(job)
            if rc == 0 or (rc is None and ("canonical" in outputs or "adapter" in outputs)):
                job.state, job.detail = "done", ""  # finished (a Stop during the last step lets it finish)
                if job.kind == "diffusion":
                    self._to_library(job, outputs["canonical"])
            elif rc == EXIT_STOPPED or job.state == "stopping":
                self._stopped(job, rc)
            else:
                job.state, job.error = "failed", self._failure(job, rc)
            self._save(job)
            log.info("job %s (%s): %s%s", job.id, job.name, job.state, f" ({job.error})" if job.error else "")
        self._pump()

    def _stopped(self, job: Job, rc: int | None) -> None:
        """The trainer ended after a Stop (or any SIGTERM): saved at its last step, or killed before it could."""
        job.state = "stopped"
        ckpt = self.latest_checkpoint(job)
        step = self.progress(job)["step"]
        if ckpt and ckpt[0] == step and rc in (EXIT_STOPPED, None, -signal.SIGTERM):
            job.detail = f"stopped at step {step} (checkpoint saved)"
        elif step == 0 and rc in (None, -signal.SIGTERM):  # still loading: nothing was trained
            job.detail = "stopped before the first step"
        elif rc == -signal.SIGKILL:
            kept = (f": the steps after its last checkpoint (step {ckpt[0]}) are lost; Resume continues from that one"
                    if ckpt else " before its first checkpoint; Resume starts it again")
            job.detail = f"stopped at step {step} (killed)"
            job.error = f"the trainer did not save within {self.settings.stop_grace_s:g} s of Stop and was killed{kept}"
        else:
            job.detail, job.error = f"stopped at step {step}", self._failure(job, rc)

    def _record_speed(self, job: Job) -> None:
        rate = self.progress(job)["it_per_s"]
        if rate > 0:
            hist = self.speed_history()
            hist[f"{job.request['model']}/{job.request['variant']}/{self.settings.device}"] = rate
            (self.root / "speed.json").write_text(json.dumps(hist, indent=1))

    def speed_history(self) -> dict[str, float]:
        """it/s of the last run per 'model/variant/device' on this machine (for the estimate before Start)."""
        try:
            return json.loads((self.root / "speed.json").read_text())
        except (OSError, ValueError):
            return {}

    def _failure(self, job: Job, rc: int | None) -> str:
        lines = _tail(self.dir(job) / "log.txt", 40)
        errs = [ln for ln in lines if ln.startswith("error:") or "Error" in ln.split(":")[0]]
        oom = any("out of memory" in ln.lower() for ln in lines)
        ended = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
        what = errs[-1] if errs else f"the trainer ended unexpectedly ({ended})"
        what = what.replace(str(self.dir(job)) + "/", "")  # no server paths in messages
        ckpt = self.latest_checkpoint(job)
        keep = f"; the last checkpoint (step {ckpt[0]}) is kept: Resume continues from it" if ckpt else ""
        hint = " (out of memory: use a smaller rank, a lower resolution or another device)" if oom else ""
        return f"{what.removeprefix('error: ')}{hint}{keep}"

    def _to_library(self, job: Job, adapter: Path) -> None:
        samples = self.samples(job)
        training = {k: job.request.get(k) for k in ("variant", "token", "class_word", "model", "steps", "rank",
                                                       "learning_rate", "seed")}
        training["steps"], training["family"] = self.progress(job)["step"], LIBRARY_FAMILY.get(job.family, job.family)
        try:
            job.library_name = self.library.import_file(adapter, f"{job.name}.safetensors",
                                                        samples[-1][0] if samples else None, training)
        except AppError as e:
            job.error = f"trained, but not added to the library: {e}"

    # --- user actions ---
    def get(self, job_id: str, owner: str | None = None) -> Job:
        job = self.jobs.get(str(job_id or ""))
        if job is None or (owner is not None and job.owner != owner):
            raise AppError("job: none selected; start one or pick one from the list")
        return job

    def stop(self, job_id: str, owner: str | None = None) -> Job:
        with self._lock:
            job = self.get(job_id, owner)
            if job.state == "queued":
                job.state = "stopped"
            elif job.state == "running":
                job.state = "stopping"
                _signal(job.pid, signal.SIGTERM)
                threading.Thread(target=self._kill_later, args=(job, self.settings.stop_grace_s), daemon=True).start()
            else:
                raise AppError(f"job {job.name}: {job.state}, nothing to stop")
            self._save(job)
            log.info("job %s (%s): stop requested", job.id, job.name)
        return job

    def _kill_later(self, job: Job, grace: float) -> None:
        """SIGKILL as a last resort: the trainer got SIGTERM and has not saved and exited within ``grace`` s."""
        end = time.time() + grace
        while time.time() < end and job.state == "stopping":
            time.sleep(0.2)
        if job.state == "stopping":
            log.warning("job %s (%s): no exit %g s after SIGTERM; killing it", job.id, job.name, grace)
            _signal(job.pid, signal.SIGKILL)

    def resume(self, job_id: str, owner: str | None = None) -> Job:
        with self._lock:
            job = self.get(job_id, owner)
            if job.state not in ("stopped", "failed", "done"):
                raise AppError(f"job {job.name}: {job.state}; only a stopped or failed job can be resumed")
            if job.state == "done" and self.progress(job)["step"] >= self.progress(job)["total"]:
                raise AppError(f"job {job.name}: finished all its steps; start a new job to train more")
            job.state, job.queued_at, job.error, job.detail = "queued", time.time(), "", ""
            self._save(job)
            self._pump()
        return job

    def list(self, owner: str | None = None, kind: str | None = None) -> list[Job]:
        return sorted((j for j in self.jobs.values() if (owner is None or j.owner == owner) and
                       (kind is None or j.kind == kind)), key=lambda j: -j.created)

    def place(self, job: Job) -> int:
        """0 when running; else 1 + the jobs ahead of it (the running one included)."""
        if job.state != "queued":
            return 0
        ahead = [j for j in self.jobs.values() if j.state in ("running", "stopping") or
                 (j.state == "queued" and j.queued_at < job.queued_at)]
        return len(ahead) + 1

    # --- what a job has produced ---
    def progress(self, job: Job) -> dict[str, Any]:
        """Step, total, it/s (over the last 20 steps), ETA in seconds, and the loss of each step."""
        lines = {}
        path = self.dir(job) / "progress.jsonl"
        if path.is_file():
            for ln in path.read_text().splitlines():
                try:
                    d = json.loads(ln)
                except ValueError:
                    continue  # a line being written
                lines[d["step"]] = d  # after a resume, the re-run steps replace the old ones
        steps = sorted(lines)
        total = lines[steps[-1]]["total"] if steps else int(job.request.get("steps") or 0)
        recent = [lines[s] for s in steps[-21:]]
        gaps = sorted(b["time"] - a["time"] for a, b in zip(recent[1:], recent[2:]) if b["step"] == a["step"] + 1)
        rate = 1.0 / gaps[len(gaps) // 2] if gaps and gaps[len(gaps) // 2] > 0 else 0.0  # median: samples excluded
        step = steps[-1] if steps else 0
        return {"step": step, "total": total, "it_per_s": rate,
                "eta_s": (total - step) / rate if rate > 0 and job.state == "running" else None,
                "losses": [(s, lines[s]["loss"]) for s in steps]}

    def samples(self, job: Job) -> list[tuple[Path, str]]:
        """(image, 'step N: prompt') for every sample so far, oldest first."""
        root = self.dir(job) / "run" / "samples"
        out = []
        for d in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else 0):
            for f in sorted(d.glob("*.png")):
                out.append((f, f"step {d.name.split('-')[1]}: {f.stem.rsplit('-', 1)[0].replace('_', ' ')}"))
        return out

    def latest_checkpoint(self, job: Job) -> tuple[int, Path] | None:
        found = []
        root = self.dir(job) / "run" / ("" if job.kind == "llm" else "checkpoints")
        for d in root.glob("checkpoint-*"):
            if d.name.split("-")[1].isdigit() and (d / "checkpoint.json").is_file():
                found.append((int(d.name.split("-")[1]), d / "adapter.safetensors"))
        return max(found) if found else None

    def outputs(self, job: Job) -> dict[str, Path]:
        run, variant = self.dir(job) / "run", job.request["variant"]
        if job.kind == "llm":
            return {"adapter": run / "adapter.safetensors"} if (run / "adapter.safetensors").is_file() else {}
        files = {"canonical": run / f"{variant}.safetensors", "kohya": run / f"{variant}.kohya.safetensors",
                 "diffusers": run / "pytorch_lora_weights.safetensors"}
        return {k: v for k, v in files.items() if v.is_file()}

    def current_adapter(self, job: Job) -> Path:
        """What 'try a prompt' uses: the final adapter when done, else the latest checkpoint's."""
        if job.state in ("running", "stopping", "queued"):
            raise AppError(f"job {job.name}: {job.state}; stop it (or wait for the end) to try prompts with its adapter")
        out = self.outputs(job).get("adapter" if job.kind == "llm" else "canonical")
        if job.state == "done" and out:
            return out
        ckpt = self.latest_checkpoint(job)
        if ckpt is None or not ckpt[1].is_file():
            raise AppError(f"job {job.name}: no checkpoint yet (one is written every "
                           f"{job.request.get('checkpoint_every') or 'tenth of the'} steps); resume it for longer")
        return ckpt[1]

    def log_tail(self, job: Job, n: int = 12) -> str:
        return "\n".join(_tail(self.dir(job) / "log.txt", n))


def _template(req: JobRequest, preset: dict[str, Any], images: Path) -> str:
    """The training caption: the user's, else on a demo model one naming the images' two colors (the recipe measured
    best; the bare template when they are not a flat pair of named colors), else the preset's."""
    if req.prompt_template:
        return req.prompt_template
    if preset.get("describe_colors"):
        from .captions import demo_caption

        return demo_caption(sorted(images.glob("*.png")))
    return preset["prompt_template"]


def _pivotal(req: JobRequest, preset: dict[str, Any]) -> dict[str, Any]:
    """Pivotal tuning as asked where the family has it (not Flux yet). The token is the one the user typed, so a
    vocabulary word such as 'sks' (in the CLIP vocabulary, DreamBooth's classic) has its own row trained."""
    on = bool(req.pivotal) and preset.get("pivotal", True)
    return {"train_embedding": on if req.pivotal is not None else None, "allow_existing_token": True if on else None}


def check_jsonl(path: str, label: str, max_mb: float) -> int:
    """Records of a JSONL training file: each line a JSON object with text, messages, or prompt and response."""
    size = Path(path).stat().st_size
    if size > max_mb * 2**20:
        raise AppError(f"training file {label}: {size / 2**20:.0f} MB, more than the {max_mb:g} MB this server accepts")
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if not isinstance(rec, dict) or not ({"text"} <= rec.keys() or {"messages"} <= rec.keys()
                                                      or {"prompt", "response"} <= rec.keys()):
                    raise AppError(f"training file {label}, line {i}: expected an object with \"text\", \"messages\" "
                                   "or \"prompt\" and \"response\"")
                n += 1
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AppError(f"training file {label}: not JSON lines ({type(e).__name__} near line {n + 1})") from None
    if n == 0:
        raise AppError(f"training file {label}: no records")
    return n


def crop_square(im: Any) -> Any:
    """The centered square of an image."""
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    return im.crop((left, top, left + side, top + side))


def _signal(pid: int | None, sig: int) -> None:
    if pid:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _tail(path: Path, n: int) -> list[str]:
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 20000))
        return [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()][-n:]


def _rmtree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _sections(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat trainer options -> TLoRAConfig sections (to check a job's choices before it is queued)."""
    from training.config import TLoRAConfig, leaf_index, sections

    index, secs = leaf_index(TLoRAConfig), sections(TLoRAConfig)
    values: dict[str, dict[str, Any]] = {s: {} for s in secs}
    for k, v in flat.items():
        sec, name = index[k]
        values[sec][name] = v
    return {s: secs[s](**v) for s, v in values.items()}


def estimate(settings: Settings, model: str, variant: str, steps: int, history: dict[str, float]) -> dict[str, Any]:
    """Before Start: total steps, a time estimate from this machine's last run of the same model and variant, and a
    rough memory estimate (frozen weights + activations) against what the device has."""
    family = model_family(settings, model)
    source = settings.model_source(model)
    from lora_diffusion.demo.model import default_model_path

    folder = Path(source) if source else Path(default_model_path())
    params = _count_params(folder) if folder.is_dir() else 0
    res = PRESETS[family]["resolution"]
    half = settings.device != "cpu" and PRESETS[family].get("mixed_precision", "no") != "no"
    weights = params * (2 if half else 4)
    acts = params * 4 * (res / 512) ** 2 * (0.4 if PRESETS[family].get("gradient_checkpointing") else 1.5)
    need = weights + acts + 2**28  # + 256 MB for the adapter, optimizer and framework
    have = available_memory(settings.device)
    rate = history.get(f"{model}/{variant}/{settings.device}")
    return {"steps": steps, "seconds": steps / rate if rate else None, "it_per_s": rate, "memory": need,
            "available": have, "too_big": bool(have and need > 0.9 * have)}


def _count_params(folder: Path) -> int:
    from lora_diffusion.io.files import read_header

    n = 0
    for f in folder.rglob("*.safetensors"):
        try:
            header, _ = read_header(f)
        except Exception:
            continue
        for v in header.values():
            k = 1
            for d in v["shape"]:
                k *= d
            n += k
    return n


def available_memory(device: str | None) -> int | None:
    try:
        if device and device.startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info()[0])
        for ln in Path("/proc/meminfo").read_text().splitlines():
            if ln.startswith("MemAvailable:"):
                return int(ln.split()[1]) * 1024
    except Exception:
        return None
    return None
