"""The Gradio front end: Personalize, Generate & Blend and Library tabs over ``app.services``.

Every handler goes through ``handled``: a user mistake (``AppError``) becomes one ``gr.Error`` naming the field and
one log line; the app keeps serving. Generation shares one queue (``concurrency_id="gpu"``), so one GPU job runs at
a time and the others see their place. Jobs live on disk: a reloaded page finds them again.
"""

from __future__ import annotations

import functools
import inspect
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
from .services.pipelines import known_prompts
from .services.presets import LABELS, model_family


def fusion_names() -> list[str]:
    from lora_diffusion.fusion import FUSION_METHODS

    return [n for n, c in FUSION_METHODS.items() if "diffusion" in c.models]  # X-LoRA is for LLMs

log = logging.getLogger("app")
SLOTS = 4  # adapters blended at once in the Generate & Blend tab
GPU = "gpu"


class Cancelled(Exception):
    """The user pressed Stop during a generation."""


def handled(fn: Any) -> Any:
    """AppError -> gr.Error with its message, logged as one line; a bug -> logged with its traceback. The error is
    not a toast (toasts outlive the next, successful action): the page's ``failure`` event (:func:`on_failure`)
    writes it into the action's status box, which the next action overwrites; API clients get it as an error."""
    params = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def run(self: UI, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except AppError as e:
            log.warning("%s: %s", fn.__name__, e)
            message = str(e)
        except Cancelled:
            log.info("%s: stopped by the user", fn.__name__)
            message = "stopped"
        except gr.Error as e:
            message = e.message
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            message = f"internal error ({type(e).__name__}); the server log has the details"
        self.failures[session(_request(params, args, kwargs)) or ""] = message
        raise gr.Error(message, visible=False, print_exception=False) from None

    return run


def _request(params: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> gr.Request | None:
    """The ``request`` argument of a handler called with ``args`` (``params``: its parameter names, self first)."""
    if "request" in kwargs:
        return kwargs["request"]
    i = params.index("request") - 1 if "request" in params else len(args)
    return args[i] if i < len(args) else None


def on_failure(ui: UI, event: Any, outputs: list[Any], box: Any) -> None:
    """When ``event`` fails, its message goes into ``box`` (the action's status line) and its other ``outputs`` keep
    what they showed (without this, Gradio draws an 'Error' badge over each of them until their next update)."""
    others = [o for o in outputs if o is not box]

    def failed(request: gr.Request = None) -> tuple[Any, ...]:
        return ui.failed(len(others) + 1, request)

    event.failure(failed, None, [*others, box], queue=False, show_progress="hidden", api_visibility="private")


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
        self.failures: dict[str, str] = {}  # session -> the message of its last failed action (see ``handled``)

    def failed(self, n_outputs: int, request: gr.Request | None = None) -> tuple[Any, ...]:
        """A failed action's outputs (``failure`` event): every one kept as it was but the last, the action's status
        box, which gets the message (one per action: the next action's result replaces it)."""
        message = self.failures.pop(session(request) or "", "the action failed; the server log has the details")
        box = "⏹ Stopped." if message == "stopped" else f"⚠ **{message}**"
        return (*[gr.skip()] * (n_outputs - 1), box)

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
        if p.get("describe_colors"):  # the demo recipe's repainting needs a caption naming the image's colors
            note += ("\n\nBest on this model: a flat picture of one shape in one color on a one-color background; "
                     "the caption then names both colors and half the views are repainted in others.")
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
        """Steps, guidance, the note under the model and whether the demo world's example prompts are shown, when the
        base model changes: the preset's."""
        try:
            fam = model_family(self.s.settings, model)
        except AppError as e:
            return gr.skip(), gr.skip(), f"⚠ {e}", gr.update(visible=False)
        p = PRESETS[fam]
        note = f"{LABELS[fam]}: {p['resolution']} px, {p['num_inference_steps']} steps, guidance {p['guidance_scale']:g}"
        known = bool(known_prompts(self.s.settings, model))  # the demo world's prompts: true on a demo model only
        return (gr.update(value=p["num_inference_steps"]), gr.update(value=p["guidance_scale"]), note,
                gr.update(visible=known))

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
        started = self._started(job, "Job")
        if "run out of memory" in self.estimate_text(model, variant, steps):  # said here, not in a toast that stays
            started += ("\n\n⚠ It would likely run out of memory on this device (see the estimate): Stop it and lower "
                        "the rank or the resolution if it fails.")
        return self.job_choices(request, job.id), started

    def _started(self, job: Any, what: str) -> str:
        """What Start did: the job runs now, or waits for the running one (one training at a time)."""
        caption = job.request.get("caption")
        words = " ".join(w.strip() for w in (job.request.get("token", ""), job.request.get("class_word", "")) if w.strip())
        said = f" · training caption: '{caption.format(words)}'" if caption else ""
        if job.state == "queued":
            return f"{what} {job.name} queued: place {self.s.jobs.place(job)} in the training queue{said}"
        return f"{what} {job.name} started{said}"

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
                 lib_name: str = "", llm: str = "", request: gr.Request = None) -> tuple[list, list, str, str]:
        """Both answers (the message box and the chat's status line cleared); the adapter is the library entry
        ``lib_name`` (on the tab's LLM) or the selected job's."""
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
                [*adapted_msgs, user, {"role": "assistant", "content": adapted}], "", "")

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
    def text_to_lora(self, hyper: str | None, task: str, llm: str, name: str,
                     request: gr.Request = None) -> tuple[Any, str]:
        entry = self.s.hyper.text_to_lora(hyper, task, llm, name.strip())
        return self._generated(entry)

    @handled
    def doc_to_lora(self, hyper: str | None, text: str, llm: str, name: str,
                    request: gr.Request = None) -> tuple[Any, str]:
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

    def llm_status_tick(self, job_id: str | None, request: gr.Request = None) -> tuple[Any, ...]:
        return self.status_tick(job_id, request, kind="llm")

    def llm_status(self, job_id: str | None, request: gr.Request = None) -> tuple[str, Any, Any, Any]:
        return self.status(job_id, request, kind="llm")

    def status_tick(self, job_id: str | None, request: gr.Request = None, *, kind: str = "diffusion") -> tuple[Any, ...]:
        """``status`` for the page's one-second poll: samples, downloads and the job list (whose labels show the
        states) only when something changed; the last action's message ("queued", "stopping") is cleared once the
        job's state moves on, so it never contradicts the status line."""
        key = (session(request) or "", str(job_id))
        before = self._shown.get(key)
        out = self.status(job_id, request, only_changes=True, kind=kind)
        after = self._shown.get(key)
        kind = self.s.jobs.jobs[job_id].kind if job_id in self.s.jobs.jobs else kind
        jobs = self.job_choices(request, job_id, kind) if after is not None and before != after else gr.skip()
        moved = before is not None and after is not None and before[1] != after[1]
        return (*out, jobs, "" if moved else gr.skip())

    def status(self, job_id: str | None, request: gr.Request = None, only_changes: bool = False,
               kind: str = "diffusion") -> tuple[str, Any, Any, Any]:
        """(status text, loss table, samples, downloads) of the selected job (``kind``: the tab's, for 'no job')."""
        import pandas as pd

        empty = pd.DataFrame({"step": [], "loss": []})
        try:
            job = self.s.jobs.get(job_id, owner(request))
        except AppError:
            what = "the training file (.jsonl)" if kind == "llm" else "the images of the subject"
            return f"No job yet: add {what} and press Start.", empty, [], None
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
    def try_prompt(self, job_id: str, prompt: str, seed: Any, request: gr.Request = None) -> tuple[list[Any], str]:
        job = self.s.jobs.get(job_id, owner(request))
        adapter = self.s.jobs.current_adapter(job)
        req = GenerateRequest(prompt, seed=parse_seed(seed), num_images=2, model=job.request["model"],
                              adapters=(AdapterUse(str(adapter), 1.0, job.name),),
                              steps=PRESETS[job.family]["num_inference_steps"],
                              guidance=PRESETS[job.family]["guidance_scale"])
        images = [enlarge(im) for im in self.s.generator.generate(req)]
        ckpt = self.s.jobs.latest_checkpoint(job)
        which = "final adapter" if job.state == "done" or ckpt is None else f"adapter at step {ckpt[0]} (checkpoint)"
        return images, f"'{prompt}' with {job.name}'s {which}, seeds {req.seed} and {req.seed + 1}"

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

        slots = (a1, on1, w1, a2, on2, w2, a3, on3, w3, a4, on4, w4)
        if mode == "manual" and method == "static":
            gallery, big, files = self.generate(prompt, negative, seed, steps, guidance, size, n, model, insert_triggers,
                                                *slots, request=request, progress=progress)
            on = [(slots[3 * k], slots[3 * k + 2]) for k in range(SLOTS) if slots[3 * k] and slots[3 * k + 1]]
            table = _chosen_table([{"name": a, "score": None, "weight": float(w), "role": ""} for a, w in on])
            what = (f"the weighted sum of {', '.join(f'{a} × {float(w):g}' for a, w in on)}" if on
                    else "no adapter on: the base model alone")
            return gallery, big, files, table, None, f"**static**: {what}"
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
        table = _chosen_table(r["chosen"])
        library = str(self.s.settings.library)
        notes = f"**{r['method']}**" + "".join(f"\n- {n.replace(library, 'the library')}" for n in r["notes"])
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
        """(table, the note under it, the selected entry, the Generate tab's slot choices)."""
        names = self.library_choices()
        sel = selected if selected in names else (names[0] if names else None)
        slot = gr.update(choices=[""] + self.library_choices(diffusion=True))
        return (self.library_table(), self.library_note(), gr.update(choices=names, value=sel), *[slot] * SLOTS)

    def library_note(self) -> str:
        """What the table does not show: files in sub-folders, which automatic retrieval reads all the same."""
        nested = self.s.library.nested()
        if not nested:
            return ""
        shown = ", ".join(nested[:4]) + (f" and {len(nested) - 4} more" if len(nested) > 4 else "")
        return (f"{len(nested)} adapter file(s) in sub-folders of the library are not listed here (import them to "
                f"use them in a slot), but the Generate tab's automatic mode retrieves them: {shown}")

    @handled
    def library_upload(self, files: list[Any] | None, request: gr.Request = None) -> tuple[Any, ...]:
        if not files:
            raise AppError("adapter files: none; choose one or more .safetensors files")
        names = [(Path(f).name, self.s.library.import_file(f, Path(f).name)) for f in files]
        said = ", ".join(f"{f} as **{n}**" for f, n in names)
        return (*self.library_refresh(names[-1][1]), f"Imported {said}.")

    @handled
    def library_import_path(self, path: str, request: gr.Request = None) -> tuple[Any, ...]:
        name = self.s.library.import_server_path(path)
        return (*self.library_refresh(name), f"Imported {Path(path.strip()).name} as **{name}**.")

    @handled
    def library_inspect(self, name: str | None, request: gr.Request = None) -> tuple[Any, Any]:
        if not name:
            return None, None
        e = self.s.library.entry(name)
        sample = enlarge(_open(e["sample"]), 256) if e.get("sample") else None
        shown = {k: v for k, v in e.items() if k not in ("sha256", "stamp")}
        return {**shown, "base": _base_label(e)} if "base" in e else shown, sample

    @handled
    def library_rename(self, name: str, new: str, request: gr.Request = None) -> tuple[Any, ...]:
        if not name:
            raise AppError("adapter: none selected")
        renamed = self.s.library.rename(name, new)
        return (*self.library_refresh(renamed), f"Renamed **{name}** to **{renamed}**.")

    @handled
    def library_delete(self, name: str, request: gr.Request = None) -> tuple[Any, ...]:
        if not name:
            raise AppError("adapter: none selected")
        self.s.library.delete(name)
        return (*self.library_refresh(), f"Deleted **{name}**.")

    @handled
    def library_export(self, name: str, fmt: str, request: gr.Request = None) -> tuple[str, str]:
        if not name:
            raise AppError("adapter: none selected")
        folder = self.s.sessions.folder(session(request)) / "exports"
        out = self.s.library.export(name, fmt, folder, lambda: self._fresh_pipe(name))
        return str(out), f"Exported **{name}** as {fmt}: {Path(out).name} (download it below)."

    @handled
    def library_squeeze(self, name: str, rank: Any, energy: Any, request: gr.Request = None) -> tuple[Any, ...]:
        """LoRA-Squeeze the selected adapter to a plain LoRA of ``rank`` (or of the ``energy`` fraction, if given)."""
        if not name:
            raise AppError("adapter: none selected")
        e = None if energy in (None, "") else _finite(energy, "squeeze energy")
        r = None if e is not None else _int_or_none(rank, "squeeze rank")
        if e is None and r is None:
            raise AppError("squeeze: expected a rank >= 1, or an energy fraction in (0, 1]")
        new, summary = self.s.library.squeeze(name, rank=r, energy=e, pipe_factory=lambda: self._fresh_pipe(name))
        return (*self.library_refresh(new), f"Squeezed **{name}** into **{new}**: {summary}")

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
        self.failures.pop(session(request) or "", None)
        for key in [k for k in self._shown if k[0] == (session(request) or "")]:
            self._shown.pop(key, None)


def _chosen_table(chosen: list[dict[str, Any]]) -> Any:
    """The LoRAs a generation used, as the Generate tab shows them: score to two decimals ('chosen' where the user
    picked the LoRA), weight as typed."""
    import pandas as pd

    rows = [(c["name"], "chosen" if c.get("score") is None else f"{c['score']:.2f}", f"{c['weight']:g}",
             c.get("role") or "") for c in chosen]
    return pd.DataFrame(rows, columns=list(CHOSEN_COLUMNS))


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
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            c["images"] = gr.File(label="Images of the subject (one is enough)", file_count="multiple",
                                  file_types=["image"], type="filepath", elem_id="train-images")
            c["preview"] = gr.Gallery(label="Training crops (center square)", columns=6, height=150, format="png",
                                      object_fit="contain", allow_preview=False, fit_columns=False)
            with gr.Row():
                c["token"] = gr.Textbox(value="sks", label="Placeholder token", info="one rare word; no spaces")
                c["class_word"] = gr.Textbox(value="", label="Class word", info="e.g. dog; empty for none")
            with gr.Row():
                c["variant"] = gr.Dropdown(variants, value="tlora" if "tlora" in variants else variants[0],
                                           label="Variant")
                c["model"] = gr.Dropdown(models, value=models[0], label="Base model", elem_id="train-model")
            pivotal_ok = PRESETS[model_family(ui.s.settings, models[0])].get("pivotal", True)
            c["pivotal"] = gr.Checkbox(value=pivotal_ok, interactive=pivotal_ok, elem_id="train-pivotal",
                                       label="Pivotal tuning: also learn the token's embedding (recommended; not on "
                                             "Flux yet)")
            c.update(zip(ADVANCED, _advanced()))
            c["plan"] = gr.Markdown(ui.estimate_text(models[0], "tlora", None), elem_id="train-estimate")
            with gr.Row():
                c["start"] = gr.Button("Start", variant="primary", elem_id="train-start")
                c["stop"] = gr.Button("Stop", elem_id="train-stop")
                c["resume"] = gr.Button("Resume", elem_id="train-resume")
            c["msg"] = gr.Markdown(elem_id="train-msg")  # what Start/Stop/Resume did, or why not
        with gr.Column(scale=1):
            _job_column(c)
    _personalize_events(ui, c)


#: the Advanced accordion's fields, in the order :func:`_advanced` returns them
ADVANCED = ("steps", "rank", "lr", "template", "sample_prompts", "sample_every", "ckpt_every", "seed", "sample_steps",
            "name")


def _job_column(c: dict[str, Any]) -> None:
    """Personalize's right-hand column: the job, its progress, samples, downloads and 'try a prompt'."""
    c["job"] = gr.Dropdown([], label="Job", elem_id="job-select", allow_custom_value=True)
    c["status"] = gr.Markdown("No job yet.", elem_id="job-status")
    c["loss"] = gr.LinePlot(x="step", y="loss", title="Loss", height=220, elem_id="loss-plot")
    c["samples"] = gr.Gallery(label="Samples", columns=4, height=260, format="png", elem_id="job-samples")
    c["downloads"] = gr.File(label="Adapter files (canonical, kohya for A1111/ComfyUI, diffusers)",
                             file_count="multiple", elem_id="job-downloads", interactive=False)
    with gr.Row():
        c["try_prompt"] = gr.Textbox(label="Try a prompt with this job's adapter (while stopped or when done)",
                                     value="a yellow sks on a black background", scale=3)
        c["try_seed"] = gr.Textbox(value="0", label="Seed", scale=1)
    c["try_btn"] = gr.Button("Try", elem_id="try-btn")
    c["try_msg"] = gr.Markdown(elem_id="try-msg")
    c["tried"] = gr.Gallery(label="Tried", columns=2, height=200, format="png", elem_id="tried")


def _personalize_events(ui: UI, c: dict[str, Any]) -> None:
    model, job, msg = c["model"], c["job"], c["msg"]
    for x in (model, c["variant"], c["steps"]):
        x.change(ui.estimate_text, [model, c["variant"], c["steps"]], c["plan"], queue=False, show_progress="hidden")
    model.change(ui.model_controls, model, [c["pivotal"], c["try_prompt"]], queue=False, show_progress="hidden")
    c["images"].change(ui.preview, c["images"], c["preview"], queue=False)
    fields = [c[k] for k in ("images", "token", "class_word", "variant", "model", "steps", "rank", "lr", "template",
                             "sample_prompts", "sample_every", "ckpt_every", "seed", "name", "sample_steps",
                             "pivotal")]
    on_failure(ui, c["start"].click(ui.start, fields, [job, msg], api_name="train_start", concurrency_limit=None),
               [job, msg], msg)
    for button, fn, api in ((c["stop"], ui.stop, "train_stop"), (c["resume"], ui.resume, "train_resume")):
        on_failure(ui, button.click(fn, job, msg, api_name=api, concurrency_limit=None), [msg], msg)
    timer = gr.Timer(1.0)
    outs = [c["status"], c["loss"], c["samples"], c["downloads"]]
    timer.tick(ui.status_tick, job, [*outs, job, msg], queue=False, show_progress="hidden")
    job.change(ui.status, job, outs, queue=False, show_progress="hidden", api_name="train_status")
    job.focus(ui.job_choices_for, job, job, queue=False)
    tried = [c["tried"], c["try_msg"]]
    args = [job, c["try_prompt"], c["try_seed"]]
    on_failure(ui, c["try_prompt"].submit(ui.try_prompt, args, tried, concurrency_id=GPU, api_name="train_try"),
               tried, c["try_msg"])
    on_failure(ui, c["try_btn"].click(ui.try_prompt, args, tried, concurrency_id=GPU), tried, c["try_msg"])
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
        template = gr.Textbox(label="Training prompt ('{0}' = token + class; empty: the preset's, on a demo model "
                                         "one naming the image's two colors)", value="")
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
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column():
            _generate_inputs(ui, models, c)
            _blend_inputs(ui, c)
            with gr.Row():
                c["go"] = gr.Button("Generate", variant="primary", elem_id="gen-go")
                c["stop"] = gr.Button("Stop", elem_id="gen-stop")
            c["notes"] = gr.Markdown(elem_id="blend-notes")  # what this generation did (method, retrieval), or why not
        with gr.Column():
            c["gallery"] = gr.Gallery(label="Images (PNG, native size)", columns=4, height="auto", format="png",
                                      elem_id="gen-gallery")
            c["big"] = gr.Image(label="Enlarged view", format="png", elem_id="gen-big", height=320)
            c["files"] = gr.File(label="Download PNGs (lossless, native size)", file_count="multiple",
                                 elem_id="gen-files", interactive=False)
            c["chosen"] = gr.Dataframe(headers=list(CHOSEN_COLUMNS), label=CHOSEN_LABEL, interactive=False,
                                       elem_id="blend-chosen")
            c["gates"] = gr.Image(label="Gate strength: each LoRA's effective weight per layer and denoising step "
                                        "(the per-layer fusions: gated, K-LoRA, scheduled, MoLE)", format="png",
                                  elem_id="blend-gates")
    _generate_events(ui, c)
    return [x for i, x in enumerate(c["slots"]) if i % 3 == 0]


#: the Generate tab's table of the LoRAs a blend used
CHOSEN_COLUMNS = ("LoRA", "retrieval score", "weight", "role")
CHOSEN_LABEL = ("LoRAs used · retrieval score: cosine similarity of the prompt (or a phrase of it) to the LoRA's "
                "description, higher is closer ('chosen': picked by you, not retrieved)")


def _generate_inputs(ui: UI, models: list[str], c: dict[str, Any]) -> None:
    """Prompt, the demo world's example prompts (demo models only), sampling settings and the base model."""
    known = known_prompts(ui.s.settings, models[0])
    c["prompt"] = gr.Textbox(label="Prompt (Enter generates)", value=known[0] if known else "a photo of a cat",
                             lines=1, elem_id="gen-prompt")
    c["negative"] = gr.Textbox(label="Negative prompt", value="")
    with gr.Column(visible=bool(known), elem_id="gen-examples") as c["examples"]:  # true on the demo models only
        gr.Examples([[p] for p in DEMO_EXAMPLES], inputs=[c["prompt"]],
                    label="Prompts the demo models know (shapes, colors, backgrounds, textures of their world)")
    with gr.Row():
        p0 = PRESETS[model_family(ui.s.settings, models[0])]
        c["steps"] = gr.Slider(1, 100, value=p0["num_inference_steps"], step=1, label="Steps", elem_id="gen-steps")
        c["guidance"] = gr.Slider(0, 15, value=p0["guidance_scale"], step=0.5, label="Guidance",
                                  elem_id="gen-guidance")
    with gr.Row():
        c["seed"] = gr.Textbox(value="0", label="Seed (0..2^64-1)")
        c["size"] = gr.Number(value=0, precision=0, label="Size px (0: the model's)", elem_id="gen-size")
        c["n"] = gr.Slider(1, 16, value=4, step=1, label="Images", elem_id="gen-n")
    c["model"] = gr.Dropdown(models, value=models[0], label="Base model", elem_id="gen-model")
    c["model_note"] = gr.Markdown(ui.generate_defaults(models[0])[2], elem_id="gen-model-note")


def _blend_inputs(ui: UI, c: dict[str, Any]) -> None:
    """The adapter slots (library name, on, weight) and the blend mode, method and number retrieved."""
    names = [""] + ui.library_choices(diffusion=True)
    gr.Markdown("**Adapters from the library** (import files in the Library tab)")
    c["slots"] = slots = []
    for k in range(SLOTS):
        with gr.Row():
            pick = gr.Dropdown(names, value="", label=f"Adapter {k + 1}", scale=3, elem_id=f"slot-{k}",
                               allow_custom_value=True)
            on = gr.Checkbox(value=False, label="on", scale=1, elem_id=f"slot-on-{k}")
            slots += [pick, on, gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", scale=3,
                                          elem_id=f"slot-w-{k}")]
        # an empty slot reads "off"; choosing an adapter turns its slot on, clearing it turns it off
        pick.input(bool, pick, on, queue=False, api_visibility="private")
    c["triggers"] = gr.Checkbox(value=False, label="Insert the adapters' trigger words into the prompt")
    with gr.Row():
        c["mode"] = gr.Radio(["manual", "automatic"], value="manual", label="Adapters", elem_id="blend-mode",
                             info="automatic: the LoRAs of the library that fit the prompt")
        c["method"] = gr.Dropdown(fusion_names(), value="static", label="Fusion", elem_id="blend-method",
                                  info="static: weighted sum; gated (AutoLoRA), K-LoRA, scheduled: per layer/step")
        c["top_k"] = gr.Slider(1, 4, value=2, step=1, label="LoRAs to retrieve (automatic)")


def _generate_events(ui: UI, c: dict[str, Any]) -> None:
    c["model"].change(ui.generate_defaults, c["model"], [c["steps"], c["guidance"], c["model_note"], c["examples"]],
                      queue=False, show_progress="hidden")
    inputs = [c[k] for k in ("prompt", "negative", "seed", "steps", "guidance", "size", "n", "model", "triggers")]
    inputs += c["slots"]
    blend_in = [*inputs, c["mode"], c["method"], c["top_k"]]
    outs = [c[k] for k in ("gallery", "big", "files", "chosen", "gates", "notes")]
    ev = c["go"].click(ui.blend, blend_in, outs, api_name="blend", concurrency_id=GPU,
                       concurrency_limit=ui.s.settings.max_concurrent_generations)
    ev2 = c["prompt"].submit(ui.blend, blend_in, outs, concurrency_id=GPU)
    ev3 = gr.Button(visible=False).click(ui.generate, inputs, outs[:3], api_name="generate", concurrency_id=GPU)
    for event in (ev, ev2):
        on_failure(ui, event, outs, c["notes"])
    on_failure(ui, ev3, [*outs[:3], c["notes"]], c["notes"])
    c["stop"].click(ui.stop_generation, None, None, queue=False, cancels=[ev, ev2, ev3])


def _library_tab(ui: UI, gen_slots: list[Any], demo: gr.Blocks) -> None:
    c: dict[str, Any] = {}
    with gr.Row():
        c["upload"] = gr.File(label="Import adapter files (.safetensors)", file_count="multiple",
                              file_types=[".safetensors"], type="filepath", elem_id="lib-upload")
        with gr.Column(visible=ui.s.settings.allow_server_paths):
            c["server_path"] = gr.Textbox(label="…or a file on the server (allowed by the operator)",
                                          elem_id="lib-server-path")
            c["import_path"] = gr.Button("Import from server path", elem_id="lib-import-path")
    c["table"] = gr.Dataframe(ui.library_table(), label="Library", interactive=False, elem_id="lib-table", wrap=True)
    c["note"] = gr.Markdown(ui.library_note(), elem_id="lib-note")
    with gr.Row():
        c["selected"] = gr.Dropdown(ui.library_choices(), label="Adapter", elem_id="lib-select",
                                    allow_custom_value=True)
        c["refresh"] = gr.Button("Refresh", elem_id="lib-refresh")
    with gr.Row():
        c["new_name"] = gr.Textbox(label="New name")
        c["rename"] = gr.Button("Rename")
        c["fmt"] = gr.Radio(list(EXPORT_FORMATS), value="kohya", label="Export as")
        c["export"] = gr.Button("Export", elem_id="lib-export")
        c["delete"] = gr.Button("Delete", variant="stop")
    with gr.Row():
        c["sq_rank"] = gr.Number(16, label="Squeeze to rank", precision=0, minimum=1, elem_id="lib-squeeze-rank")
        c["sq_energy"] = gr.Number(None, label="…or keep this energy fraction (0-1], ranks chosen per layer",
                                   elem_id="lib-squeeze-energy")
        c["squeeze"] = gr.Button("Squeeze (LoRA-Squeeze: SVD to a smaller plain LoRA)", elem_id="lib-squeeze")
    c["msg"] = gr.Markdown(elem_id="lib-msg")  # what the last Library action did, or why not
    c["exported"] = gr.File(label="Exported file", elem_id="lib-exported", interactive=False)
    with gr.Row():
        c["info"] = gr.JSON(label="Inspect (header and metadata)", elem_id="lib-info")
        c["sample"] = gr.Image(label="Sample", format="png", height=256, elem_id="lib-sample")
    _library_events(ui, c, gen_slots, demo)


def _library_events(ui: UI, c: dict[str, Any], gen_slots: list[Any], demo: gr.Blocks) -> None:
    selected, msg = c["selected"], c["msg"]
    outs = [c["table"], c["note"], selected, *gen_slots]
    for event in (c["upload"].upload(ui.library_upload, c["upload"], [*outs, msg], api_name="library_upload"),
                  c["import_path"].click(ui.library_import_path, c["server_path"], [*outs, msg],
                                         api_name="library_import_path"),
                  c["rename"].click(ui.library_rename, [selected, c["new_name"]], [*outs, msg],
                                    api_name="library_rename"),
                  c["delete"].click(ui.library_delete, selected, [*outs, msg], api_name="library_delete"),
                  c["squeeze"].click(ui.library_squeeze, [selected, c["sq_rank"], c["sq_energy"]], [*outs, msg],
                                     api_name="library_squeeze")):
        on_failure(ui, event, [*outs, msg], msg)
    on_failure(ui, c["export"].click(ui.library_export, [selected, c["fmt"]], [c["exported"], msg],
                                     api_name="library_export"), [c["exported"], msg], msg)
    on_failure(ui, selected.change(ui.library_inspect, selected, [c["info"], c["sample"]], queue=False),
               [c["info"], c["sample"], msg], msg)
    c["refresh"].click(lambda s: ui.library_refresh(s), selected, outs, queue=False, api_name="library_refresh")
    demo.load(lambda: ui.library_refresh(), None, outs, queue=False)


def _llm_tab(ui: UI, demo: gr.Blocks) -> None:
    from lora_diffusion.llm import llm_variant_names

    models = list(ui.s.settings.llm_models)
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column():
            gr.Markdown("Train an adapter on a JSONL file (one `{\"text\"}`, `{\"messages\"}` or "
                        "`{\"prompt\", \"response\"}` per line), then ask the base and the adapted model side by side.")
            c["data"] = gr.File(label="Training data (.jsonl)", file_types=[".jsonl"], type="filepath",
                                elem_id="llm-data")
            with gr.Row():
                c["model"] = gr.Dropdown(models, value=models[0], label="Base LLM", allow_custom_value=True)
                c["variant"] = gr.Dropdown(llm_variant_names(), value="lora", label="Variant")
            with gr.Row():
                c["steps"] = gr.Number(value=100, precision=0, label="Total steps")
                c["rank"] = gr.Number(value=0, precision=0, label="Rank (0: 8)")
                c["lr"] = gr.Number(value=0, label="Learning rate (0: default)")
            with gr.Row():
                c["start"] = gr.Button("Start", variant="primary", elem_id="llm-start")
                c["stop"] = gr.Button("Stop")
                c["resume"] = gr.Button("Resume")
            c["msg"] = gr.Markdown(elem_id="llm-msg")  # what Start/Stop/Resume did, or why not
            c["job"] = gr.Dropdown([], label="LLM job", allow_custom_value=True, elem_id="llm-job")
            c["status"] = gr.Markdown(elem_id="llm-status")
            c["loss"] = gr.LinePlot(x="step", y="loss", title="Loss", height=200)
            c["files"] = gr.File(label="Adapter file", file_count="multiple", interactive=False)
        with gr.Column():
            c["chat_with"] = gr.Dropdown(label="Chat with", elem_id="llm-chat-with", allow_custom_value=True,
                                         info="the adapter the right-hand answers use",
                                         **_update_args(ui.chat_adapters()))
            with gr.Row():
                c["base"] = gr.Chatbot(label="Base model", height=360, elem_id="llm-base")
                c["adapted"] = gr.Chatbot(label="With the adapter", height=360, elem_id="llm-adapted")
            c["text"] = gr.Textbox(label="Message (Enter sends to both)", elem_id="llm-message")
            c["chat_msg"] = gr.Markdown(elem_id="llm-chat-msg")  # why a message got no answer
            c["max_new"] = gr.Slider(8, 256, value=64, step=8, label="Max new tokens")
            c["gen"] = _generated_adapters(ui, c["model"])
    _llm_events(ui, c, demo)


def _llm_events(ui: UI, c: dict[str, Any], demo: gr.Blocks) -> None:
    job, msg, gen, chat_with = c["job"], c["msg"], c["gen"], c["chat_with"]
    fields = [c[k] for k in ("data", "model", "variant", "steps", "rank", "lr")]
    on_failure(ui, c["start"].click(ui.llm_start, fields, [job, msg], api_name="llm_start", concurrency_limit=None),
               [job, msg], msg)
    for button, fn in ((c["stop"], ui.stop), (c["resume"], ui.resume)):
        on_failure(ui, button.click(fn, job, msg, concurrency_limit=None), [msg], msg)
    timer = gr.Timer(1.0)
    outs = [c["status"], c["loss"], gr.Gallery(visible=False), c["files"]]
    timer.tick(ui.llm_status_tick, job, [*outs, job, msg], queue=False, show_progress="hidden")
    job.change(ui.llm_status, job, outs, queue=False, show_progress="hidden", api_name="llm_status")
    chat = [c["base"], c["adapted"], c["text"], c["chat_msg"]]
    on_failure(ui, c["text"].submit(ui.llm_chat, [job, c["text"], c["max_new"], c["base"], c["adapted"], chat_with,
                                                  c["model"]], chat, concurrency_id=GPU, api_name="llm_chat"),
               chat, c["chat_msg"])
    demo.load(ui.llm_job_choices_for, None, job, queue=False)
    for go, fn, hyper, what, name, api in (("t2l_go", ui.text_to_lora, "t2l", "task", "t2l_name", "text_to_lora"),
                                           ("d2l_go", ui.doc_to_lora, "d2l", "doc", "d2l_name", "doc_to_lora")):
        ev = gen[go].click(fn, [gen[hyper], gen[what], c["model"], gen[name]], [chat_with, gen["msg"]],
                           concurrency_id=GPU, api_name=api)
        on_failure(ui, ev, [chat_with, gen["msg"]], gen["msg"])
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
