"""The embedded default model: a small Stable Diffusion pipeline of the shapes world, shipped in ``assets/``.

It is the model everything uses when none is named, so the app and the examples work offline on a
CPU. The folder is an ordinary diffusers ``StableDiffusionPipeline`` (fp16-rounded weights stored as fp32
safetensors, so diffusers' default dtype works), built by ``python -m training.pretrain_demo`` (see ``docs/demo_model.md``)::

    >>> pipe = load_demo_pipeline()
    >>> pipe("a red star on a blue background", num_inference_steps=20).images[0]

The library never imports ``training/``: a missing or damaged folder gives :class:`DemoModelError`,
whose message says which file is wrong and the command that rebuilds it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_ASSETS = "LORA_DIFFUSION_ASSETS"
ENV_MODEL = "LORA_DIFFUSION_DEMO_MODEL"
DEMO_MODEL_DIRNAME = "demo-sd"
#: The DiT demo model: the same world drawn by a small ``StableDiffusion3Pipeline`` (``training/pretrain_demo_dit.py``).
DEMO_DIT_DIRNAME = "demo-sd3"
REBUILD_HINT = ("rebuild it with `python -m training.pretrain_demo` (about 2 hours on a 2-core CPU; add --resume to "
                "continue a stopped run), or pass the path of another Stable Diffusion pipeline folder")
COMPONENTS = ("unet", "vae", "text_encoder")
DIT_REBUILD_HINT = ("rebuild it with `python -m training.pretrain_demo_dit` (under an hour on a 2-core CPU; add --resume "
                    "to continue a stopped run), or pass the path of another Stable Diffusion 3 pipeline folder")
DEFAULT_PROMPT = "a red star on a blue background"
DEMO_FORMAT = "lora-diffusion-demo-model"

#: Training defaults on this model, where a run leaves them unset (``training.config.resolve_defaults``).
#: Its small UNet draws shapes with its ResNet convolutions: adapters on attention alone (the SD/SDXL
#: default) learned no new shape even at 10x the learning rate (concept fidelity 0-22% vs 75-88% with the
#: convolutions, ``benchmarks/personalization.py``, docs/demo_model.md). Variants that adapt only linear
#: layers (VeRA) keep the attention preset. The learning rate is ``lr_scale`` x the variant's default.
#: One image is enough with pivotal tuning (the placeholder's embedding trained too: without it the untrained
#: word is drawn as a cross and the adapter fights it) and hue jitter (colors are what prompts change in this
#: world, not what a concept is): concept fidelity 97-100% with alignment 88-97% on a held-out ring vs 25%
#: without (docs/demo_model.md, "Finding the recipe"). 400 steps at 20x the variant's rate: LoRA over-trains
#: past ~200 there, T-LoRA holds (the benchmark's sweep). With captions that name the colors (``a blue sks on a
#: white background``), half the views are repainted in other named colors, captioned so (``recolor_p``): described
#: captions at 400 steps 98 / 99.5% vs 83 / 85% ("Described captions, 90 / 90: levers"); bare captions: no-op.
TRAIN_DEFAULTS: dict[str, Any] = {"targets": "unet-full", "linear_only_targets": "unet-attn", "lr_scale": 20.0,
                                  "train_embedding": True, "hue_jitter": 180.0, "recolor_p": 0.5,
                                  "max_train_steps": 400}


#: Training defaults on the DiT demo model (``assets/demo-sd3``, an SD3-architecture pipeline whose demo_model.json
#: says ``"family": "sd3"``): its transformer has linear layers only, so every variant adapts the attention and MLP
#: linears of the joint blocks; the same one-image recipe (pivotal tuning on both CLIP encoders, hue jitter, repainted
#: views). lr 10x: at 20x (the UNet model's) LoRA collapsed by 400 steps, at 5x T-LoRA learned less (one run each).
#: Without repainting one image reached concept fidelity 25-41% (T-LoRA and LoRA, held-out shapes, 2 seeds); with
#: ``recolor_p`` 0.5, described captions: 100% fidelity at 400 steps, alignment 71-78% (seed 0; docs/demo_model.md).
DIT_TRAIN_DEFAULTS: dict[str, Any] = {"targets": "dit-attn-mlp", "linear_only_targets": "dit-attn-mlp",
                                      "lr_scale": 10.0, "train_embedding": True, "hue_jitter": 180.0,
                                      "recolor_p": 0.5, "max_train_steps": 400}
#: ``--model demo-sd3`` (any model flag, and ``load_pipeline``): a name of an embedded demo model -> its folder
DEMO_NAMES = {"demo-sd": DEMO_MODEL_DIRNAME, "demo-sd3": DEMO_DIT_DIRNAME}


class DemoModelError(FileNotFoundError):
    """The embedded demo model is missing or damaged."""


def assets_dir() -> Path:
    """``$LORA_DIFFUSION_ASSETS`` or the repository's ``assets/`` folder."""
    env = os.environ.get(ENV_ASSETS)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "assets"


def check_model_folder(path: str | Path) -> list[str]:
    """Problems that would stop ``StableDiffusionPipeline.from_pretrained(path)`` (empty list: looks fine).
    Checks the folder layout and each safetensors header; does not read the tensors."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} does not exist"]
    problems: list[str] = []
    index = path / "model_index.json"
    try:
        json.loads(index.read_text())
    except FileNotFoundError:
        problems.append(f"{index} is missing")
    except (OSError, ValueError) as e:
        problems.append(f"{index} is not valid JSON ({e})")
    subs, comps = _index_components(index)
    for sub in subs:
        if not (path / sub).is_dir() or not any((path / sub).iterdir()):
            problems.append(f"{path / sub} is missing or empty")
    for comp in comps:
        folder = path / comp
        if not (folder / "config.json").is_file():
            problems.append(f"{folder / 'config.json'} is missing")
        weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if not weights:
            problems.append(f"{folder} has no .safetensors weights")
        for w in weights:
            problem = _check_safetensors(w)
            if problem:
                problems.append(problem)
    return problems


def _index_components(index: Path) -> tuple[list[str], list[str]]:
    """(folders without weights, folders with weights) that ``model_index.json`` names (null entries skipped);
    the demo-sd layout when the index is unreadable."""
    try:
        entries = {k: v for k, v in json.loads(index.read_text()).items()
                   if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    except (OSError, ValueError, AttributeError):
        return ["scheduler", "tokenizer"], list(COMPONENTS)
    plain = [k for k in entries if k.startswith(("scheduler", "tokenizer", "feature_extractor"))]
    return plain, [k for k in entries if k not in plain]


def _check_safetensors(file: Path) -> str | None:
    """The header parses and the data it describes fits in the file."""
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{file} is truncated"
            n = int.from_bytes(raw, "little")
            size = file.stat().st_size
            if n <= 0 or 8 + n > size:
                return f"{file} has a damaged header"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            return f"{file} is truncated or padded ({size} bytes, header describes {8 + n + end})"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{file} is damaged ({type(e).__name__}: {e})"
    return None


def default_model_path(check: bool = True) -> Path:
    """``$LORA_DIFFUSION_DEMO_MODEL`` or ``assets/demo-sd``; with ``check``, raise :class:`DemoModelError` (saying
    how to rebuild it) when the folder is missing or damaged."""
    env = os.environ.get(ENV_MODEL)
    path = Path(env) if env else assets_dir() / DEMO_MODEL_DIRNAME
    return _checked(path, "the embedded demo model", REBUILD_HINT) if check else path


def default_dit_model_path(check: bool = True) -> Path:
    """``assets/demo-sd3`` (the DiT demo model); with ``check``, raise :class:`DemoModelError` (saying how to
    rebuild it) when the folder is missing or damaged."""
    path = assets_dir() / DEMO_DIT_DIRNAME
    return _checked(path, "the DiT demo model", DIT_REBUILD_HINT) if check else path


def _checked(path: Path, what: str, hint: str) -> Path:
    """``path``, or :class:`DemoModelError` naming ``what`` is wrong with the folder and how to rebuild it."""
    problems = check_model_folder(path)
    if problems:
        state = "missing" if not path.exists() else "damaged"
        raise DemoModelError(f"{what} at {path} is {state}: {'; '.join(problems[:4])}. {hint}")
    return path


def load_demo_pipeline(path: str | Path | None = None, device: str | Any = "cpu", dtype: Any = None) -> Any:
    """Load a demo pipeline (default: :func:`default_model_path`; a ``StableDiffusion3Pipeline`` where its
    ``demo_model.json`` says ``"family": "sd3"``) in ``dtype`` (default float32 on CPU, float16 on CUDA),
    safety checker off, progress bar off."""
    import torch

    folder = default_model_path() if path is None else Path(path)
    dit = demo_model_info(folder).get("family") == "sd3" if (folder / "demo_model.json").is_file() else False
    hint = DIT_REBUILD_HINT if dit else REBUILD_HINT
    if path is not None:
        problems = check_model_folder(folder)
        if problems:
            raise DemoModelError(f"the model folder {folder} is not usable: {'; '.join(problems[:4])}. {hint}")
    dev = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    try:
        if dit:
            from diffusers import StableDiffusion3Pipeline

            pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), torch_dtype=dtype)
        else:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False)
    except Exception as e:  # noqa: BLE001 - any load failure becomes one clear message
        raise DemoModelError(f"could not load the demo model at {folder} ({type(e).__name__}: {e}). {hint}") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def is_demo_model(source: str | Path | None) -> bool:
    """Whether ``source`` (None: the default model; a name of :data:`DEMO_NAMES`) is a folder made by
    ``training.pretrain_demo`` (or ``training.pretrain_demo_dit``)."""
    source = resolve_demo_name(source)
    folder = default_model_path(check=False) if source is None else Path(source)
    try:
        return json.loads((folder / "demo_model.json").read_text()).get("format") == DEMO_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def demo_model_info(path: str | Path | None = None) -> dict[str, Any]:
    """The ``demo_model.json`` written next to the pipeline by the pretraining (resolution, vocabulary, metrics)."""
    folder = default_model_path() if path is None else Path(path)
    file = folder / "demo_model.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def resolve_demo_name(source: str | Path | None) -> str | Path | None:
    """``demo-sd`` / ``demo-sd3`` (a name in :data:`DEMO_NAMES` that is no existing path) -> the embedded model's
    folder in ``assets/``; any other source unchanged."""
    if source is None or str(source) not in DEMO_NAMES or Path(source).exists():
        return source
    return str(assets_dir() / DEMO_NAMES[str(source)])


def check_demo_name(source: str | Path | None) -> None:
    """Raise :class:`DemoModelError` (how to rebuild it) when ``source`` names an embedded demo model whose folder
    is missing or damaged; any other source passes."""
    folder = resolve_demo_name(source)
    if folder == source:
        return
    problems = check_model_folder(folder)
    if problems:
        what = "missing" if not Path(folder).exists() else "damaged"
        hint = DIT_REBUILD_HINT if DEMO_NAMES[str(source)] == DEMO_DIT_DIRNAME else REBUILD_HINT
        raise DemoModelError(f"'{source}' names the embedded demo model at {folder}, which is {what}: "
                             f"{'; '.join(problems[:3])}. {hint}")


def train_defaults(source: str | Path | None) -> dict[str, Any] | None:
    """The trainer's defaults for a demo model (None: ``source`` is not one): :data:`DIT_TRAIN_DEFAULTS` when its
    demo_model.json names a transformer family, else :data:`TRAIN_DEFAULTS`."""
    source = resolve_demo_name(source)
    if not is_demo_model(source):
        return None
    folder = default_model_path(check=False) if source is None else Path(source)
    try:
        family = json.loads((folder / "demo_model.json").read_text()).get("family", "sd")
    except (OSError, ValueError, AttributeError):
        family = "sd"
    return DIT_TRAIN_DEFAULTS if family in ("sd3", "flux") else TRAIN_DEFAULTS
