"""The Gradio front end: Personalize, Generate & Blend and Library tabs over ``app.services``.

Every handler goes through ``handled``: a user mistake (``AppError``) becomes one ``gr.Error`` naming the field and
one log line; the app keeps serving. Generation shares one queue (``concurrency_id="gpu"``), so one GPU job runs at
a time and the others see their place. Jobs live on disk: a reloaded page finds them again.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

import gradio as gr

import lora_diffusion as ld

from .services import (
    DEMO_EXAMPLES,
    EXPORT_FORMATS,
    PRESETS,
    AdapterUse,
    AppError,
    AppServices,
    GenerateRequest,
    JobRequest,
    LLMJobRequest,
    estimate,
    parse_seed,
)
from .services.presets import LABELS, is_dit, model_family


def fusion_names() -> list[str]:
    from lora_diffusion.fusion import FUSION_METHODS

    return [n for n, c in FUSION_METHODS.items() if "diffusion" in c.models]  # X-LoRA is for LLMs

log = logging.getLogger("app")
SLOTS = 4  # adapters blended at once in the Generate & Blend tab
GPU = "gpu"


class Cancelled(Exception):
    """The user pressed Stop during a generation."""


def handled(fn: Any) -> Any:
    """AppError -> gr.Error with its message, logged as one line; a bug -> logged with its traceback."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AppError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise gr.Error(str(e), print_exception=False) from None
        except Cancelled:
            log.info("%s: stopped by the user", fn.__name__)
            raise gr.Error("stopped", print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            raise gr.Error(f"internal error ({type(e).__name__}); the server log has the details",
                           print_exception=False) from None

    return run


def owner(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or "local") if request is not None else "local"


def session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def enlarge(image: Any, min_side: int = 256) -> Any:
    """A small image enlarged with hard pixel edges for viewing (downloads stay at native size)."""
    factor = -(-min_side // max(1, min(image.size)))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), 0)  # 0: NEAREST


def _int_or_none(v: Any, field: str) -> int | None:
    if v is None or v == "" or v == 0:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise AppError(f"{field}: expected an integer, got {v!r}") from None
    if f != int(f):
        raise AppError(f"{field}: expected an integer, got {v!r}")
    return int(f)


def _base_label(entry: dict[str, Any]) -> str:
    """The base family as the Library tab shows it: the detected family, else the file's own hint ("demo model")."""
    if entry.get("llm_base"):
        return f"LLM ({Path(entry['llm_base']).name})"
    base = entry.get("base", "?")
    return f"{entry['family_hint']} model" if base == "unknown" and entry.get("family_hint") else base


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "unknown"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class UI:
    """The handlers, bound to the services (kept apart from the layout so tests can call them)."""

    def __init__(self, services: AppServices) -> None:
        self.s = services
        self._stops: dict[str, threading.Event] = {}
        self._shown: dict[tuple[str, str], tuple[int, str]] = {}  # (session, job) -> (samples, state) last sent

    # --- personalize ---
    def preview(self, files: list[Any] | None) -> list[Any]:
        from PIL import Image

        from .services.jobs import crop_square

        out = []
        for f in files or []:
            try:
                with Image.open(f) as im:
                    out.append((enlarge(crop_square(im.convert("RGB")), 128), Path(f).name))
            except Exception:
                gr.Warning(f"images: {Path(f).name} is not an image this app can read")
        return out

    def estimate_text(self, model: str, variant: str, steps: Any) -> str:
        from .services.jobs import default_steps

        try:
            n = _int_or_none(steps, "total steps") or default_steps(self.s.settings, model, variant)
            e = estimate(self.s.settings, model, variant, n, self.s.jobs.speed_history())
        except AppError as err:
            return f"⚠ {err}"
        mem = f"~{e['memory'] / 2**30:.2f} GiB (rough)"
        avail = f" of {e['available'] / 2**30:.1f} GiB free" if e["available"] else ""
        time_s = (f"~{_fmt_seconds(e['seconds'])} at {e['it_per_s']:.2f} it/s (this machine's last run)" if e["seconds"]
                  else "measured during the first steps (no earlier run of this model and variant here)")
        warn = ("\n\n**⚠ This would likely run out of memory**: lower the rank or resolution, or use another device."
                if e["too_big"] else "")
        fam = model_family(self.s.settings, model)
        p = PRESETS[fam]
        gpu = self.s.settings.device != "cpu"
        extra = f" · {p['mixed_precision']}" if gpu and p.get("mixed_precision") else " · fp32" if not gpu else ""
        extra += " · gradient checkpointing" if p.get("gradient_checkpointing") else ""
        note = (f"\n\nPivotal tuning is not available on {LABELS[fam]} yet: the adapter alone is trained."
                if not p.get("pivotal", True) else "")
        return (f"**{n} steps** · time {time_s} · memory {mem}{avail} on {self.s.settings.device} · preset "
                f"'{fam}': {LABELS[fam]}, {p['resolution']} px{extra}{warn}{note}")

    def model_controls(self, model: str) -> tuple[Any, Any]:
        """The pivotal-tuning box (off and locked where the trainer has no pivotal tuning) and the 'try' prompt follow
        the base model."""
        try:
            p = PRESETS[model_family(self.s.settings, model)]
        except AppError:
            return gr.skip(), gr.skip()
        ok = p.get("pivotal", True)
        try_prompt = "a yellow sks on a black background" if p["resolution"] <= 64 else "a photo of sks"
        return gr.update(value=ok, interactive=ok), gr.update(value=try_prompt)

    def generate_defaults(self, model: str) -> tuple[Any, ...]:
        """Steps, guidance and the note under the model when the base model changes: the preset's."""
        try:
            fam = model_family(self.s.settings, model)
        except AppError as e:
            return gr.skip(), gr.skip(), f"⚠ {e}"
        p = PRESETS[fam]
        note = f"{LABELS[fam]}: {p['resolution']} px, {p['num_inference_steps']} steps, guidance {p['guidance_scale']:g}"
        if is_dit(fam):
            note += " · fusion: static (the weighted sum) only"
        return gr.update(value=p["num_inference_steps"]), gr.update(value=p["guidance_scale"]), note

    @handled
    def start(self, files: list[Any] | None, token: str, class_word: str, variant: str, model: str, steps: Any,
              rank: Any, lr: Any, template: str, sample_prompts: str, sample_every: Any, ckpt_every: Any, seed: Any,
              name: str, sample_steps: Any = None, pivotal: bool = True, request: gr.Request = None) -> tuple[Any, str]:
        paths = [str(f) for f in files or []]
        req = JobRequest(paths, token, class_word, variant, model, _int_or_none(steps, "total steps"),
                         _int_or_none(rank, "rank"), float(lr) if lr else None, template.strip() or None,
                         sample_prompts.strip() or None, _int_or_none(sample_every, "sample every"),
                         _int_or_none(ckpt_every, "checkpoint every"), parse_seed(seed), name.strip(),
                         _int_or_none(sample_steps, "sample denoising steps"), bool(pivotal),
                         [Path(p).name for p in paths])
        job = self.s.jobs.create(req, owner(request))
        plan = self.estimate_text(model, variant, steps)
        if "run out of memory" in plan:
            gr.Warning("This job would likely run out of memory on this device (see the estimate); Stop it and lower "
                       "the rank or the resolution if it fails", duration=None)
        return self.job_choices(request, job.id), self._started(job, "Job")

    def _started(self, job: Any, what: str) -> str:
        """What Start did: the job runs now, or waits for the running one (one training at a time)."""
        if job.state == "queued":
            return f"{what} {job.name} queued: place {self.s.jobs.place(job)} in the training queue"
        return f"{what} {job.name} started"

    def job_choices(self, request: gr.Request | None, selected: str | None = None, kind: str = "diffusion") -> Any:
        jobs = self.s.jobs.list(owner(request), kind)
        choices = [(f"{j.name} · {j.state} · {j.id}", j.id) for j in jobs]
        if selected is None:
            active = [j for j in jobs if j.state in ("queued", "running", "stopping")]
            selected = (active or jobs)[0].id if jobs else None
        return gr.update(choices=choices, value=selected)

    def job_choices_for(self, selected: str | None = None, request: gr.Request = None) -> Any:
        return self.job_choices(request, selected or None)

    def llm_job_choices_for(self, selected: str | None = None, request: gr.Request = None) -> Any:
        return self.job_choices(request, selected or None, "llm")

    @handled
    def llm_start(self, file: Any, model: str, variant: str, steps: Any, rank: Any, lr: Any,
                  request: gr.Request = None) -> tuple[Any, str]:
        if not file:
            raise AppError("training file: none; upload a .jsonl file")
        req = LLMJobRequest(str(file), model, variant, _int_or_none(rank, "rank"), _int_or_none(steps, "total steps") or 100,
                            float(lr) if lr else None, file_name=Path(str(file)).name)
        job = self.s.jobs.create_llm(req, owner(request))
        return self.job_choices(request, job.id, "llm"), self._started(job, "LLM job")

    @handled
    def llm_chat(self, job_id: str, message: str, max_new: float, base_hist: list | None, adapted_hist: list | None,
                 lib_name: str = "", llm: str = "", request: gr.Request = None) -> tuple[list, list, str]:
        """Both answers; the adapter is the library entry ``lib_name`` (on the tab's LLM) or the selected job's."""
        if lib_name:
            adapter, label, model = self.s.library.path(lib_name), lib_name, llm
        else:
            job = self.s.jobs.get(job_id, owner(request))
            if job.kind != "llm":
                raise AppError("job: choose an LLM job, or a library adapter to chat with")
            adapter, label, model = self.s.jobs.current_adapter(job), job.name, job.request["model"]
        user = {"role": "user", "content": message}
        history = [m for m in (adapted_hist or []) if m.get("role") in ("user", "assistant")]
        base_msgs = [{"role": m["role"], "content": m["content"]} for m in (base_hist or [])]
        adapted_msgs = [{"role": m["role"], "content": m["content"]} for m in history]
        base, adapted = self.s.llm.reply_both(model, adapter, label, [*adapted_msgs, user], int(max_new))
        return ([*base_msgs, user, {"role": "assistant", "content": base}],
                [*adapted_msgs, user, {"role": "assistant", "content": adapted}], "")

    # --- generated adapters (Text-to-LoRA, Doc-to-LoRA) ---
    def chat_adapters(self, selected: str = "") -> Any:
        """What the chat compares with the base: the selected LLM job's adapter, or an LLM adapter of the library."""
        names = [e["name"] for e in self.s.library.entries() if e.get("llm_base") and "error" not in e]
        return gr.update(choices=[("the selected LLM job's adapter", ""), *[(f"library: {n}", n) for n in names]],
                         value=selected if selected in names else "")

    def hyper_refresh(self) -> tuple[Any, ...]:
        """The hypernetwork pickers and their notes (how to train one when there is none)."""
        out: list[Any] = []
        for kind in ("t2l", "d2l"):
            found = self.s.hyper.list(kind)
            out += [gr.update(choices=[(h.label, h.name) for h in found], value=found[0].name if found else None),
                    "" if found else f"⚠ {self.s.hyper.missing(kind)}"]
        return tuple(out)

    @handled
    def text_to_lora(self, hyper: str | None, task: str, llm: str, name: str) -> tuple[Any, str]:
        entry = self.s.hyper.text_to_lora(hyper, task, llm, name.strip())
        return self._generated(entry)

    @handled
    def doc_to_lora(self, hyper: str | None, text: str, llm: str, name: str) -> tuple[Any, str]:
        entry = self.s.hyper.doc_to_lora(hyper, text, llm, name.strip())
        return self._generated(entry)

    def _generated(self, entry: str) -> tuple[Any, str]:
        if self.s.library.entry(entry).get("llm_base"):
            return self.chat_adapters(entry), (f"Saved to the library as **{entry}** and chosen for the chat: send a "
                                               "message to compare the base and the adapted model.")
        return self.chat_adapters(), (f"Saved to the library as **{entry}**: a diffusion LoRA; use it in the Generate & "
                                      "Blend tab.")

    @handled
    def stop(self, job_id: str, request: gr.Request = None) -> str:
        job = self.s.jobs.stop(job_id, owner(request))
        return f"Stopping {job.name}: it finishes the current step and saves a checkpoint; Resume continues from it"

    @handled
    def resume(self, job_id: str, request: gr.Request = None) -> str:
        job = self.s.jobs.resume(job_id, owner(request))
        return f"{job.name} queued to resume from its latest checkpoint"

    def status_tick(self, job_id: str | None, request: gr.Request = None) -> tuple[Any, ...]:
        """``status`` for the page's one-second poll: samples, downloads and the job list (whose labels show the
        states) only when something changed; the last action's message ("queued", "stopping") is cleared once the
        job's state moves on, so it never contradicts the status line."""
        key = (session(request) or "", str(job_id))
        before = self._shown.get(key)
        out = self.status(job_id, request, only_changes=True)
        after = self._shown.get(key)
        kind = self.s.jobs.jobs[job_id].kind if job_id in self.s.jobs.jobs else "diffusion"
        jobs = self.job_choices(request, job_id, kind) if after is not None and before != after else gr.skip()
        moved = before is not None and after is not None and before[1] != after[1]
        return (*out, jobs, "" if moved else gr.skip())

    def status(self, job_id: str | None, request: gr.Request = None,
               only_changes: bool = False) -> tuple[str, Any, Any, Any]:
        """(status text, loss table, samples, downloads) of the selected job."""
        import pandas as pd

        empty = pd.DataFrame({"step": [], "loss": []})
        try:
            job = self.s.jobs.get(job_id, owner(request))
        except AppError:
            return "No job yet: add the training images (LLM tab: a JSONL file) and press Start.", empty, [], None
        jm = self.s.jobs
        p = jm.progress(job)
        parts = [f"**{job.name}** — {job.detail or job.state}", f"step {p['step']}/{p['total']}"]
        if p["it_per_s"]:
            parts.append(f"{p['it_per_s']:.2f} it/s")
        if p["eta_s"] is not None:
            parts.append(f"ETA {_fmt_seconds(p['eta_s'])}")
        if job.state == "queued":
            parts.append(f"place {jm.place(job)} in the training queue")
        ckpt = jm.latest_checkpoint(job)
        if ckpt:
            parts.append(f"last checkpoint: step {ckpt[0]}")
        text = " · ".join(parts)
        if job.library_name:
            text += f"\n\nSaved to the library as **{job.library_name}**."
        if job.error:
            text += f"\n\n⚠ {job.error}"
        losses = pd.DataFrame(p["losses"], columns=["step", "loss"]) if p["losses"] else empty
        found = jm.samples(job)[-12:]
        key = (session(request) or "", job.id)
        if only_changes and self._shown.get(key) == (len(found), job.state):  # the browser keeps what it has
            return text, losses, gr.skip(), gr.skip()
        self._shown[key] = (len(found), job.state)
        samples = [(enlarge(_open(f)), cap) for f, cap in found]
        files = [str(v) for v in jm.outputs(job).values()] if job.state == "done" else None
        return text, losses, samples, self._session_copies(files, request)

    def _session_copies(self, files: list[str] | None, request: gr.Request | None) -> list[str] | None:
        """Files handed to the browser are copied into this session's folder first (no app folder is served)."""
        if not files:
            return None
        import shutil

        folder = self.s.sessions.folder(session(request)) / "downloads"
        folder.mkdir(exist_ok=True)
        out = []
        for f in files:
            dst = folder / Path(f).name
            if not dst.exists() or dst.stat().st_mtime < Path(f).stat().st_mtime:
                shutil.copyfile(f, dst)
            out.append(str(dst))
        return out

    @handled
    def try_prompt(self, job_id: str, prompt: str, seed: Any, request: gr.Request = None) -> list[Any]:
        job = self.s.jobs.get(job_id, owner(request))
        adapter = self.s.jobs.current_adapter(job)
        req = GenerateRequest(prompt, seed=parse_seed(seed), num_images=2, model=job.request["model"],
                              adapters=(AdapterUse(str(adapter), 1.0, job.name),),
                              steps=PRESETS[job.family]["num_inference_steps"],
                              guidance=PRESETS[job.family]["guidance_scale"])
        return [enlarge(im) for im in self.s.generator.generate(req)]

    # --- generate & blend ---
    def library_choices(self, diffusion: bool = False) -> Any:
        """The readable adapters; with ``diffusion``, not the LLM ones (those are offered in the LLM tab's chat)."""
        return [e["name"] for e in self.s.library.entries() if "error" not in e and not (diffusion and e.get("llm_base"))]

    @handled
    def generate(self, prompt: str, negative: str, seed: Any, steps: float, guidance: float, size: float, n: float,
                 model: str, insert_triggers: bool, a1: str, on1: bool, w1: float, a2: str, on2: bool, w2: float,
                 a3: str, on3: bool, w3: float, a4: str, on4: bool, w4: float, request: gr.Request = None,
                 progress: gr.Progress = gr.Progress()) -> tuple[list[Any], Any, list[str]]:  # noqa: B008
        """SLOTS (4) adapter slots, each (library name, on, weight), spelled out so Gradio can pass the request."""
        slots = (a1, on1, w1, a2, on2, w2, a3, on3, w3, a4, on4, w4)
        uses, triggers = [], []
        for k in range(SLOTS):
            name, on, weight = slots[3 * k: 3 * k + 3]
            if not name:
                continue
            path = self.s.library.path(name)
            uses.append(AdapterUse(str(path), _finite(weight, f"weight of {name}"), name, bool(on)))
            if on and insert_triggers:
                triggers += [w for w in self.s.library.entry(name).get("trigger_words", []) if w not in prompt]
        text = " ".join([*dict.fromkeys(triggers), prompt]) if triggers else prompt
        side = _int_or_none(size, "size")
        req = GenerateRequest(text, negative, int(steps), _finite(guidance, "guidance"), parse_seed(seed), int(n), model,
                              tuple(uses), side, side)
        stop = self._stops.setdefault(session(request) or "", threading.Event())
        stop.clear()

        def tick(f: float, desc: str) -> None:
            if stop.is_set():
                raise Cancelled()
            progress(f, desc=desc)

        images = self.s.generator.generate(req, progress=tick)
        folder = self.s.sessions.folder(session(request)) / "images"
        folder.mkdir(exist_ok=True)
        files = []
        for i, im in enumerate(images):
            path = folder / f"seed{req.seed + i}-{len(list(folder.iterdir()))}.png"
            im.save(path)  # lossless, native size
            files.append(str(path))
        log.info("generated %d image(s) for session %s", len(images), (session(request) or "-")[:8])
        return [(f, f"seed {req.seed + i}") for i, f in enumerate(files)], enlarge(images[0], 512), files

    @handled
    def blend(self, prompt: str, negative: str, seed: Any, steps: float, guidance: float, size: float, n: float,
              model: str, insert_triggers: bool, a1: str, on1: bool, w1: float, a2: str, on2: bool, w2: float,
              a3: str, on3: bool, w3: float, a4: str, on4: bool, w4: float, mode: str, method: str, top_k: float,
              request: gr.Request = None, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
        """Generate & Blend: 'manual' with 'static' is the plain weighted sum (``generate``); otherwise the fusion
        method over the chosen adapters, or in 'automatic' mode over the LoRAs retrieved for the prompt."""
        import pandas as pd

        slots = (a1, on1, w1, a2, on2, w2, a3, on3, w3, a4, on4, w4)
        if mode == "manual" and method == "static":
            gallery, big, files = self.generate(prompt, negative, seed, steps, guidance, size, n, model, insert_triggers,
                                                *slots, request=request, progress=progress)
            return gallery, big, files, None, None, "static: the weighted sum of the adapters that are on"
        uses = []
        if mode == "manual":
            for k in range(SLOTS):
                name, on, weight = slots[3 * k: 3 * k + 3]
                if name and on:
                    uses.append(AdapterUse(str(self.s.library.path(name)), _finite(weight, f"weight of {name}"), name))
        side = _int_or_none(size, "size")
        req = GenerateRequest(prompt, negative, int(steps), _finite(guidance, "guidance"), parse_seed(seed), int(n), model,
                              tuple(uses), side, side)
        folder = self.s.sessions.folder(session(request)) / "images"
        folder.mkdir(exist_ok=True)
        k = len(list(folder.iterdir()))
        r = self.s.generator.blend(req, method, self.s.settings.library, int(top_k), folder / f"gates-{k}.png",
                                   lambda f, desc: progress(f, desc=desc))
        files = []
        for i, im in enumerate(r["images"]):
            path = folder / f"seed{req.seed + i}-{k}-{i}.png"
            im.save(path)
            files.append(str(path))
        table = pd.DataFrame(r["chosen"], columns=["name", "score", "weight", "role"])
        notes = f"**{r['method']}**" + "".join(f"\n- {n}" for n in r["notes"])
        return ([(f, f"seed {req.seed + i}") for i, f in enumerate(files)], enlarge(r["images"][0], 512), files, table,
                str(r["plot"]) if r["plot"] else None, notes)

    def stop_generation(self, request: gr.Request = None) -> None:
        self._stops.setdefault(session(request) or "", threading.Event()).set()

    # --- library ---
    def library_table(self) -> Any:
        import pandas as pd

        rows = []
        for e in self.s.library.entries():
            t = e.get("training", {})
            base = _base_label(e)
            rows.append({"name": e["name"], "format": e.get("format", "?"), "base": base +
                         (" (other family)" if e.get("other_family") else ""), "variant": e.get("variant", "?"),
                         "rank": e.get("rank"), "trigger words": ", ".join(e.get("trigger_words", [])),
                         "trained": f"{t['steps']} steps, {t.get('variant')}" if t.get("steps") else "",
                         "size MB": round(e.get("size", 0) / 2**20, 2), "sample": "yes" if e.get("sample") else "",
                         "error": e.get("error", "")})
        return pd.DataFrame(rows, columns=["name", "format", "base", "variant", "rank", "trigger words", "trained",
                                           "size MB", "sample", "error"])

    def library_refresh(self, selected: str | None = None) -> tuple[Any, ...]:
        names = self.library_choices()
        sel = selected if selected in names else (names[0] if names else None)
        slot = gr.update(choices=[""] + self.library_choices(diffusion=True))
        return (self.library_table(), gr.update(choices=names, value=sel), *[slot] * SLOTS)

    @handled
    def library_upload(self, files: list[Any] | None) -> tuple[Any, ...]:
        if not files:
            raise AppError("adapter files: none; choose one or more .safetensors files")
        names = [self.s.library.import_file(f, Path(f).name) for f in files]
        gr.Info(f"Imported {', '.join(names)}")
        return self.library_refresh(names[-1])

    @handled
    def library_import_path(self, path: str) -> tuple[Any, ...]:
        name = self.s.library.import_server_path(path)
        return self.library_refresh(name)

    @handled
    def library_inspect(self, name: str | None) -> tuple[Any, Any]:
        if not name:
            return None, None
        e = self.s.library.entry(name)
        sample = enlarge(_open(e["sample"]), 256) if e.get("sample") else None
        shown = {k: v for k, v in e.items() if k not in ("sha256", "stamp")}
        return {**shown, "base": _base_label(e)} if "base" in e else shown, sample

    @handled
    def library_rename(self, name: str, new: str) -> tuple[Any, ...]:
        if not name:
            raise AppError("adapter: none selected")
        return self.library_refresh(self.s.library.rename(name, new))

    @handled
    def library_delete(self, name: str) -> tuple[Any, ...]:
        if not name:
            raise AppError("adapter: none selected")
        self.s.library.delete(name)
        return self.library_refresh()

    @handled
    def library_export(self, name: str, fmt: str, request: gr.Request = None) -> str:
        if not name:
            raise AppError("adapter: none selected")
        folder = self.s.sessions.folder(session(request)) / "exports"
        return str(self.s.library.export(name, fmt, folder, lambda: self._fresh_pipe(name)))

    @handled
    def library_squeeze(self, name: str, rank: Any, energy: Any) -> tuple[Any, ...]:
        """LoRA-Squeeze the selected adapter to a plain LoRA of ``rank`` (or of the ``energy`` fraction, if given)."""
        if not name:
            raise AppError("adapter: none selected")
        e = None if energy in (None, "") else _finite(energy, "squeeze energy")
        r = None if e is not None else _int_or_none(rank, "squeeze rank")
        if e is None and r is None:
            raise AppError("squeeze: expected a rank >= 1, or an energy fraction in (0, 1]")
        new, summary = self.s.library.squeeze(name, rank=r, energy=e, pipe_factory=lambda: self._fresh_pipe(name))
        gr.Info(f"{new}: {summary}")
        return self.library_refresh(new)

    def _fresh_pipe(self, name: str) -> Any:
        """The served base model that library entry ``name`` was made for (its family), loaded afresh."""
        from lora_diffusion.generate import load_pipeline

        from .services.presets import model_for

        e = self.s.library.entry(name)
        model = model_for(self.s.settings, e.get("base_family") or e.get("family_hint"))
        return load_pipeline(self.s.settings.model_source(model))

    def close_session(self, request: gr.Request) -> None:
        self.s.sessions.close(session(request))
        self.s.sessions.sweep()
        self._stops.pop(session(request) or "", None)
        for key in [k for k in self._shown if k[0] == (session(request) or "")]:
            self._shown.pop(key, None)


def _open(path: str | Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _finite(v: Any, field: str) -> float:
    import math

    try:
        f = float(v)
    except (TypeError, ValueError):
        raise AppError(f"{field}: expected a number, got {v!r}") from None
    if not math.isfinite(f):
        raise AppError(f"{field}: expected a finite number, got {v!r}")
    return f


def build_app(services: AppServices | None = None) -> gr.Blocks:
    services = services or AppServices()
    ui = UI(services)
    st = services.settings
    models = list(st.models)
    # delete_cache: Gradio's copies of served files older than a day are removed hourly
    with gr.Blocks(title="lora-diffusion", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# lora-diffusion\nTrain an adapter from one photo, keep a library of LoRAs, blend them. "
                    f"Models on this server: {', '.join(models)} (device: {st.device}).")
        with gr.Tab("Personalize", id="personalize"):
            _personalize_tab(ui, models)
        with gr.Tab("Generate & Blend", id="generate"):
            gen_slots = _generate_tab(ui, models)
        with gr.Tab("Library", id="library"):
            _library_tab(ui, gen_slots, demo)
        with gr.Tab("LLM", id="llm"):
            _llm_tab(ui, demo)
        demo.unload(ui.close_session)
    return demo


def _personalize_tab(ui: UI, models: list[str]) -> None:
    variants = ld.variant_names()
    with gr.Row():
        with gr.Column(scale=1):
            images = gr.File(label="Images of the subject (one is enough)", file_count="multiple", file_types=["image"],
                             type="filepath", elem_id="train-images")
            preview = gr.Gallery(label="Training crops (center square)", columns=6, height=150, format="png",
                                 object_fit="contain", allow_preview=False, fit_columns=False)
            with gr.Row():
                token = gr.Textbox(value="sks", label="Placeholder token", info="one rare word; no spaces")
                class_word = gr.Textbox(value="", label="Class word", info="e.g. dog; empty for none")
            with gr.Row():
                variant = gr.Dropdown(variants, value="tlora" if "tlora" in variants else variants[0], label="Variant")
                model = gr.Dropdown(models, value=models[0], label="Base model", elem_id="train-model")
            pivotal_ok = PRESETS[model_family(ui.s.settings, models[0])].get("pivotal", True)
            pivotal = gr.Checkbox(value=pivotal_ok, interactive=pivotal_ok, elem_id="train-pivotal",
                                  label="Pivotal tuning: also learn the token's embedding (recommended; not on Flux yet)")
            steps, rank, lr, template, sample_prompts, sample_every, ckpt_every, seed, sample_steps, name = _advanced()
            plan = gr.Markdown(ui.estimate_text(models[0], "tlora", None), elem_id="train-estimate")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", elem_id="train-stop")
                resume = gr.Button("Resume", elem_id="train-resume")
        with gr.Column(scale=1):
            job = gr.Dropdown([], label="Job", elem_id="job-select", allow_custom_value=True)
            status = gr.Markdown("No job yet.", elem_id="job-status")
            loss = gr.LinePlot(x="step", y="loss", title="Loss", height=220, elem_id="loss-plot")
            samples = gr.Gallery(label="Samples", columns=4, height=260, format="png", elem_id="job-samples")
            downloads = gr.File(label="Adapter files (canonical, kohya for A1111/ComfyUI, diffusers)", file_count="multiple",
                                elem_id="job-downloads", interactive=False)
            with gr.Row():
                try_prompt = gr.Textbox(label="Try a prompt with this job's adapter (while stopped or when done)",
                                        value="a yellow sks on a black background", scale=3)
                try_seed = gr.Textbox(value="0", label="Seed", scale=1)
            try_btn = gr.Button("Try", elem_id="try-btn")
            tried = gr.Gallery(label="Tried", columns=2, height=200, format="png", elem_id="tried")
    msg = gr.Markdown(elem_id="train-msg")
    for c in (model, variant, steps):
        c.change(ui.estimate_text, [model, variant, steps], plan, queue=False, show_progress="hidden")
    model.change(ui.model_controls, model, [pivotal, try_prompt], queue=False, show_progress="hidden")
    images.change(ui.preview, images, preview, queue=False)
    start.click(ui.start, [images, token, class_word, variant, model, steps, rank, lr, template, sample_prompts,
                           sample_every, ckpt_every, seed, name, sample_steps, pivotal], [job, msg], api_name="train_start",
                concurrency_limit=None)
    stop.click(ui.stop, job, msg, api_name="train_stop", concurrency_limit=None)
    resume.click(ui.resume, job, msg, api_name="train_resume", concurrency_limit=None)
    timer = gr.Timer(1.0)
    outs = [status, loss, samples, downloads]
    timer.tick(ui.status_tick, job, [*outs, job, msg], queue=False, show_progress="hidden")
    job.change(ui.status, job, outs, queue=False, show_progress="hidden", api_name="train_status")
    job.focus(ui.job_choices_for, job, job, queue=False)
    try_prompt.submit(ui.try_prompt, [job, try_prompt, try_seed], tried, concurrency_id=GPU, api_name="train_try")
    try_btn.click(ui.try_prompt, [job, try_prompt, try_seed], tried, concurrency_id=GPU)
    # a reloaded page selects the user's running (or latest) job again
    gr.context.Context.root_block.load(ui.job_choices_for, None, job, queue=False)


def _advanced() -> tuple[Any, ...]:
    """Personalize's Advanced accordion: steps, rank, lr, prompts, sample/checkpoint intervals, seed, job name."""
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            steps = gr.Number(value=0, precision=0, label="Total steps (0: the recipe's default)",
                              elem_id="train-steps")
            rank = gr.Number(value=0, precision=0, label="Rank (0: default)")
            lr = gr.Number(value=0, label="Learning rate (0: default)")
        template = gr.Textbox(label="Training prompt ('{0}' = token + class; empty: the preset's)", value="")
        sample_prompts = gr.Textbox(label="Sample prompts, '#'-separated (empty: the preset's)", value="")
        with gr.Row():
            sample_every = gr.Number(value=0, precision=0, label="Sample every N steps (0: 4 times)",
                                     elem_id="sample-every")
            ckpt_every = gr.Number(value=0, precision=0, label="Checkpoint every N steps (0: 10 times)",
                                   elem_id="ckpt-every")
            seed = gr.Textbox(value="0", label="Seed")
            sample_steps = gr.Number(value=0, precision=0, label="Sample denoising steps (0: preset)",
                                     elem_id="sample-steps")
        name = gr.Textbox(label="Job name (empty: token-variant)", value="")
    return steps, rank, lr, template, sample_prompts, sample_every, ckpt_every, seed, sample_steps, name


def _generate_tab(ui: UI, models: list[str]) -> list[Any]:
    names = [""] + ui.library_choices(diffusion=True)
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt (Enter generates)", value=DEMO_EXAMPLES[0], lines=1, elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", value="")
            gr.Examples([[p] for p in DEMO_EXAMPLES], inputs=[prompt], label="Prompts the demo model knows")
            with gr.Row():
                p0 = PRESETS[model_family(ui.s.settings, models[0])]
                steps = gr.Slider(1, 100, value=p0["num_inference_steps"], step=1, label="Steps", elem_id="gen-steps")
                guidance = gr.Slider(0, 15, value=p0["guidance_scale"], step=0.5, label="Guidance",
                                     elem_id="gen-guidance")
            with gr.Row():
                seed = gr.Textbox(value="0", label="Seed (0..2^64-1)")
                size = gr.Number(value=0, precision=0, label="Size px (0: the model's)", elem_id="gen-size")
                n = gr.Slider(1, 16, value=4, step=1, label="Images", elem_id="gen-n")
            model = gr.Dropdown(models, value=models[0], label="Base model", elem_id="gen-model")
            model_note = gr.Markdown(ui.generate_defaults(models[0])[2], elem_id="gen-model-note")
            gr.Markdown("**Adapters from the library** (import files in the Library tab)")
            slots: list[Any] = []
            for k in range(SLOTS):
                with gr.Row():
                    pick = gr.Dropdown(names, value="", label=f"Adapter {k + 1}", scale=3, elem_id=f"slot-{k}",
                                       allow_custom_value=True)
                    on = gr.Checkbox(value=False, label="on", scale=1, elem_id=f"slot-on-{k}")
                    slots += [pick, on, gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", scale=3,
                                                  elem_id=f"slot-w-{k}")]
                # an empty slot reads "off"; choosing an adapter turns its slot on, clearing it turns it off
                pick.input(bool, pick, on, queue=False, api_visibility="private")
            triggers = gr.Checkbox(value=False, label="Insert the adapters' trigger words into the prompt")
            with gr.Row():
                mode = gr.Radio(["manual", "automatic"], value="manual", label="Adapters",
                                info="automatic: the LoRAs of the library that fit the prompt", elem_id="blend-mode")
                method = gr.Dropdown(fusion_names(), value="static", label="Fusion", elem_id="blend-method",
                                     info="static: weighted sum; gated (AutoLoRA), K-LoRA, scheduled: per layer/step")
                top_k = gr.Slider(1, 4, value=2, step=1, label="LoRAs to retrieve (automatic)")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="gen-go")
                stop = gr.Button("Stop", elem_id="gen-stop")
        with gr.Column():
            gallery = gr.Gallery(label="Images (PNG, native size)", columns=4, height="auto", format="png",
                                 elem_id="gen-gallery")
            big = gr.Image(label="Enlarged view", format="png", elem_id="gen-big", height=320)
            files = gr.File(label="Download PNGs (lossless, native size)", file_count="multiple", elem_id="gen-files",
                            interactive=False)
            notes = gr.Markdown(elem_id="blend-notes")
            chosen = gr.Dataframe(headers=["name", "score", "weight", "role"], label="LoRAs used (score: retrieval)",
                                  interactive=False, elem_id="blend-chosen")
            gates = gr.Image(label="Gate strength per layer and timestep", format="png", elem_id="blend-gates")
    model.change(ui.generate_defaults, model, [steps, guidance, model_note], queue=False, show_progress="hidden")
    inputs = [prompt, negative, seed, steps, guidance, size, n, model, triggers, *slots]
    ev = go.click(ui.blend, [*inputs, mode, method, top_k], [gallery, big, files, chosen, gates, notes], api_name="blend",
                  concurrency_id=GPU, concurrency_limit=ui.s.settings.max_concurrent_generations)
    ev2 = prompt.submit(ui.blend, [*inputs, mode, method, top_k], [gallery, big, files, chosen, gates, notes],
                        concurrency_id=GPU)
    ev3 = gr.Button(visible=False).click(ui.generate, inputs, [gallery, big, files], api_name="generate",
                                         concurrency_id=GPU)
    stop.click(ui.stop_generation, None, None, queue=False, cancels=[ev, ev2, ev3])
    return [s for i, s in enumerate(slots) if i % 3 == 0]


def _library_tab(ui: UI, gen_slots: list[Any], demo: gr.Blocks) -> None:
    st = ui.s.settings
    with gr.Row():
        upload = gr.File(label="Import adapter files (.safetensors)", file_count="multiple", file_types=[".safetensors"],
                         type="filepath", elem_id="lib-upload")
        with gr.Column(visible=st.allow_server_paths):
            server_path = gr.Textbox(label="…or a file on the server (allowed by the operator)")
            import_path = gr.Button("Import from server path")
    table = gr.Dataframe(ui.library_table(), label="Library", interactive=False, elem_id="lib-table", wrap=True)
    with gr.Row():
        selected = gr.Dropdown(ui.library_choices(), label="Adapter", elem_id="lib-select", allow_custom_value=True)
        refresh = gr.Button("Refresh", elem_id="lib-refresh")
    with gr.Row():
        info = gr.JSON(label="Inspect (header and metadata)", elem_id="lib-info")
        sample = gr.Image(label="Sample", format="png", height=256, elem_id="lib-sample")
    with gr.Row():
        new_name = gr.Textbox(label="New name")
        rename = gr.Button("Rename")
        fmt = gr.Radio(list(EXPORT_FORMATS), value="kohya", label="Export as")
        export = gr.Button("Export")
        delete = gr.Button("Delete", variant="stop")
    with gr.Row():
        sq_rank = gr.Number(16, label="Squeeze to rank", precision=0, minimum=1, elem_id="lib-squeeze-rank")
        sq_energy = gr.Number(None, label="…or keep this energy fraction (0-1], ranks chosen per layer",
                              elem_id="lib-squeeze-energy")
        squeeze = gr.Button("Squeeze (LoRA-Squeeze: SVD to a smaller plain LoRA)", elem_id="lib-squeeze")
    exported = gr.File(label="Exported file", elem_id="lib-exported", interactive=False)
    outs = [table, selected, *gen_slots]
    upload.upload(ui.library_upload, upload, outs, api_name="library_upload")
    import_path.click(ui.library_import_path, server_path, outs, api_name="library_import_path")
    refresh.click(lambda s: ui.library_refresh(s), selected, outs, queue=False, api_name="library_refresh")
    selected.change(ui.library_inspect, selected, [info, sample], queue=False)
    rename.click(ui.library_rename, [selected, new_name], outs, api_name="library_rename")
    delete.click(ui.library_delete, selected, outs, api_name="library_delete")
    export.click(ui.library_export, [selected, fmt], exported, api_name="library_export")
    squeeze.click(ui.library_squeeze, [selected, sq_rank, sq_energy], outs, api_name="library_squeeze")
    demo.load(lambda: ui.library_refresh(), None, outs, queue=False)


def _llm_tab(ui: UI, demo: gr.Blocks) -> None:
    from lora_diffusion.llm import llm_variant_names

    models = list(ui.s.settings.llm_models)
    with gr.Row():
        with gr.Column():
            gr.Markdown("Train an adapter on a JSONL file (one `{\"text\"}`, `{\"messages\"}` or "
                        "`{\"prompt\", \"response\"}` per line), then ask the base and the adapted model side by side.")
            data = gr.File(label="Training data (.jsonl)", file_types=[".jsonl"], type="filepath", elem_id="llm-data")
            with gr.Row():
                model = gr.Dropdown(models, value=models[0], label="Base LLM", allow_custom_value=True)
                variant = gr.Dropdown(llm_variant_names(), value="lora", label="Variant")
            with gr.Row():
                steps = gr.Number(value=100, precision=0, label="Total steps")
                rank = gr.Number(value=0, precision=0, label="Rank (0: 8)")
                lr = gr.Number(value=0, label="Learning rate (0: default)")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="llm-start")
                stop = gr.Button("Stop")
                resume = gr.Button("Resume")
            job = gr.Dropdown([], label="LLM job", allow_custom_value=True, elem_id="llm-job")
            status = gr.Markdown(elem_id="llm-status")
            loss = gr.LinePlot(x="step", y="loss", title="Loss", height=200)
            files = gr.File(label="Adapter file", file_count="multiple", interactive=False)
            msg = gr.Markdown()
        with gr.Column():
            chat_with = gr.Dropdown(label="Chat with", elem_id="llm-chat-with", allow_custom_value=True,
                                    info="the adapter the right-hand answers use", **_update_args(ui.chat_adapters()))
            with gr.Row():
                base = gr.Chatbot(label="Base model", height=360, elem_id="llm-base")
                adapted = gr.Chatbot(label="With the adapter", height=360, elem_id="llm-adapted")
            text = gr.Textbox(label="Message (Enter sends to both)", elem_id="llm-message")
            max_new = gr.Slider(8, 256, value=64, step=8, label="Max new tokens")
            gen = _generated_adapters(ui, model)
    start.click(ui.llm_start, [data, model, variant, steps, rank, lr], [job, msg], api_name="llm_start",
                concurrency_limit=None)
    stop.click(ui.stop, job, msg, concurrency_limit=None)
    resume.click(ui.resume, job, msg, concurrency_limit=None)
    timer = gr.Timer(1.0)
    hidden = gr.Gallery(visible=False)
    timer.tick(ui.status_tick, job, [status, loss, hidden, files, job, msg], queue=False, show_progress="hidden")
    job.change(ui.status, job, [status, loss, hidden, files], queue=False, show_progress="hidden",
               api_name="llm_status")
    text.submit(ui.llm_chat, [job, text, max_new, base, adapted, chat_with, model], [base, adapted, text],
                concurrency_id=GPU, api_name="llm_chat")
    demo.load(ui.llm_job_choices_for, None, job, queue=False)
    gen["t2l_go"].click(ui.text_to_lora, [gen["t2l"], gen["task"], model, gen["t2l_name"]], [chat_with, gen["msg"]],
                        concurrency_id=GPU, api_name="text_to_lora")
    gen["d2l_go"].click(ui.doc_to_lora, [gen["d2l"], gen["doc"], model, gen["d2l_name"]], [chat_with, gen["msg"]],
                        concurrency_id=GPU, api_name="doc_to_lora")
    pickers = [gen["t2l"], gen["t2l_note"], gen["d2l"], gen["d2l_note"]]
    gen["refresh"].click(ui.hyper_refresh, None, pickers, queue=False)
    demo.load(ui.hyper_refresh, None, pickers, queue=False)
    demo.load(lambda: ui.chat_adapters(), None, chat_with, queue=False)


def _update_args(update: dict[str, Any]) -> dict[str, Any]:
    """A ``gr.update`` dict as constructor arguments (choices, value)."""
    return {k: v for k, v in update.items() if k != "__type__"}


def _generated_adapters(ui: UI, model: Any) -> dict[str, Any]:
    """Text-to-LoRA (a task description) and Doc-to-LoRA (a pasted document): a trained hypernetwork writes a LoRA
    into the library in one forward pass; the chat then uses it."""
    t2l_up, t2l_note, d2l_up, d2l_note = ui.hyper_refresh()
    c: dict[str, Any] = {}
    with gr.Accordion("Generate a LoRA from a description (Text-to-LoRA)", open=True, elem_id="t2l-box"):
        c["t2l"] = gr.Dropdown(label="T2L hypernetwork", elem_id="t2l-hyper", **_update_args(t2l_up))
        c["t2l_note"] = gr.Markdown(t2l_note, elem_id="t2l-note")
        c["task"] = gr.Textbox(label="Task description", lines=2, elem_id="t2l-task",
                               placeholder="e.g. Answer with the last word of the sentence only.")
        with gr.Row():
            c["t2l_name"] = gr.Textbox(label="Library name (empty: from the description)", scale=2)
            c["t2l_go"] = gr.Button("Generate LoRA", variant="primary", elem_id="t2l-go", scale=1)
    with gr.Accordion("Internalize a document (Doc-to-LoRA)", open=False, elem_id="d2l-box"):
        c["d2l"] = gr.Dropdown(label="D2L hypernetwork", elem_id="d2l-hyper", **_update_args(d2l_up))
        c["d2l_note"] = gr.Markdown(d2l_note, elem_id="d2l-note")
        c["doc"] = gr.Textbox(label="Document (pasted text)", lines=6, elem_id="d2l-doc")
        with gr.Row():
            c["d2l_name"] = gr.Textbox(label="Library name (empty: from the first line)", scale=2)
            c["d2l_go"] = gr.Button("Internalize", variant="primary", elem_id="d2l-go", scale=1)
    with gr.Row():
        c["refresh"] = gr.Button("Refresh hypernetworks", size="sm")
    c["msg"] = gr.Markdown(elem_id="hyper-msg")
    return c
