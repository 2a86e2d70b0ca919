"""LoRA-Squeeze (Vulić, Grycner, de Laroussilhe, Pfeiffer 2026, arXiv 2602.10993): any additive adapter as a plain
LoRA of lower rank, by a truncated SVD of each module's weight delta.

    ΔW = U Σ Vᵀ   (conv kernels flattened to (out, in·kh·kw))
    B' = U_k Σ_k^½ (out, k, *1),   A' = Σ_k^½ V_kᵀ (k, in, *kh, kw),   alpha' = k (scale 1, baked in)
    error = ‖ΔW − B'A'‖_F / ‖ΔW‖_F = sqrt(Σ_{i>k} σ_i² / Σ_i σ_i²)          (Eckart–Young: the best rank-k error)

The SVD never forms ΔW when the variant is a low-rank product s·up·down (LoRA, rsLoRA, LoRA-FA, T-LoRA, VeRA,
SingLoRA, DyLoRA, AdaLoRA, Delta-LoRA): thin QRs up = Q_u R_u, downᵀ = Q_d R_d, then the SVD of the r×r core
s·R_u R_dᵀ (the paper's memory-efficient variant, exact). Other variants (LoHa, LoKr) form ΔW and use an exact SVD,
or, for a fixed rank well below the layer's, randomized SVD (Halko et al.: Gaussian sketch, 2 power iterations).

Target: ``rank=k`` per module (at most k, never above what ΔW has), or ``energy=e`` allocated globally: the largest
singular values across all modules are kept until their σ² sum reaches e of the total, each module keeping >= 1.
T-LoRA is squeezed at full rank (no timestep mask); DoRA by its effective ΔW = W' − W, which needs the base weights
(pass ``model``) and is only exact at full rank min(out, in).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.adapter import Adapter
from .core.errors import AdapterError
from .core.layerinfo import LayerInfo, get_base_weight
from .core.registry import get_variant
from .core.shared import SharedStore
from .inject.walker import _default_dtype, module_configs
from .io import canonical
from .io import embeddings as emb_io
from .io.bundle import Part, component_role, model_family, model_view, spec_from_modules
from .io.files import read_safetensors, write_safetensors
from .io.formats import lowrank_form, read_bundle, resolve, write_parts
from .io.library import describe

log = logging.getLogger(__name__)
SQUEEZE_FORMATS = ("canonical", "kohya", "diffusers", "peft")
METHODS = ("auto", "exact", "rsvd")
FILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Spectrum:
    """One module's ΔW as left (out, q) · diag(s) (q,) · rightᵀ (fan_in, q), float64, s descending."""

    left: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor
    total: float  # ‖ΔW‖_F²
    dense: torch.Tensor | None = None  # ΔW itself when the spectrum is partial (randomized SVD)

    def tail(self, k: int) -> float:
        """‖ΔW − rank-k truncation‖_F²: Σ_{i>k} σ_i² for a full spectrum, else measured on ΔW."""
        if self.dense is None:
            return float((self.s[k:] ** 2).sum())
        approx = (self.left[:, :k] * self.s[:k]) @ self.right[:, :k].T
        return float(((self.dense - approx) ** 2).sum())


@dataclass
class ModuleSqueeze:
    component: str
    module: str
    variant: str
    shape: tuple[int, int]  # (out, fan_in) of the flattened ΔW
    rank: int  # the squeezed rank
    error: float  # ‖ΔW − B'A'‖_F / ‖ΔW‖_F (0 for a zero ΔW)
    norm: float  # ‖ΔW‖_F
    params_before: int
    params_after: int


@dataclass
class SqueezeReport:
    modules: list[ModuleSqueeze] = field(default_factory=list)
    target: str = ""
    seconds: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    path: str = ""

    @property
    def total_error(self) -> float:
        """‖ΔW − ΔW'‖_F / ‖ΔW‖_F over all modules together."""
        tot = sum(m.norm ** 2 for m in self.modules)
        tail = sum((m.error * m.norm) ** 2 for m in self.modules)
        return math.sqrt(tail / tot) if tot > 0 else 0.0

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    def summary(self) -> str:
        ranks = [m.rank for m in self.modules]
        worst = max(self.modules, key=lambda m: m.error, default=None)
        s = (f"squeezed {len(self.modules)} modules ({self.target}): ranks {min(ranks, default=0)}-{max(ranks, default=0)}"
             f" (mean {sum(ranks) / max(len(ranks), 1):.1f}), total relative error {self.total_error:.4g}, "
             f"parameters {self.params_before:,} -> {self.params_after:,}")
        if self.bytes_before and self.bytes_after:
            s += f", file {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB"
        if worst is not None:
            s += f"; worst module {worst.component + '/' if worst.component else ''}{worst.module} ({worst.error:.4g})"
        return s + f"; {self.seconds:.1f} s"

    def table(self) -> str:
        rows = [f"{'module':<72} {'shape':>12} {'rank':>5} {'rel.err':>9}"]
        for m in self.modules:
            name = f"{m.component}/{m.module}" if m.component else m.module
            rows.append(f"{name[-72:]:<72} {f'{m.shape[0]}x{m.shape[1]}':>12} {m.rank:>5} {m.error:>9.3g}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_error": self.total_error, "params_before": self.params_before,
                "params_after": self.params_after}


# --- checks ---
def check_target(rank: Any = None, energy: Any = None, method: str = "auto") -> None:
    """One clear error for a bad --rank / --energy / method."""
    if (rank is None) == (energy is None):
        raise AdapterError("squeeze: give exactly one of rank (an integer >= 1) or energy (a fraction in (0, 1])")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"squeeze --rank: expected an integer >= 1, found {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0.0 < float(energy) <= 1.0):
        raise AdapterError(f"squeeze --energy: expected a fraction in (0, 1] of the singular-value energy to keep, "
                           f"found {energy!r}")
    if method not in METHODS:
        raise AdapterError(f"squeeze method: expected one of {list(METHODS)}, found {method!r}")


# --- the math ---
def factored_spectrum(down: torch.Tensor, up: torch.Tensor, scale: float) -> Spectrum:
    """Exact SVD of scale·up·down without forming it: QR of both factors, SVD of the r×r core."""
    d, u = down.detach().flatten(1).double(), up.detach().flatten(1).double()  # (r, fan_in), (out, r)
    qu, ru = torch.linalg.qr(u)  # (out, r'), (r', r)
    qd, rd = torch.linalg.qr(d.T)  # (fan_in, r'), (r', r)
    cu, s, cvh = torch.linalg.svd(scale * ru @ rd.T)  # (r', r')
    return Spectrum(qu @ cu, s, qd @ cvh.T, float((s ** 2).sum()))


def dense_spectrum(dw: torch.Tensor, k: int | None, method: str, gen: torch.Generator,
                   oversample: int = 10, power_iters: int = 2) -> Spectrum:
    """SVD of a dense ΔW (out, fan_in): exact, or randomized for a target rank k well below min(out, fan_in)."""
    dw = dw.detach().flatten(1).double()
    total = float((dw ** 2).sum())
    q = None if k is None else k + oversample
    if method == "rsvd" or (method == "auto" and q is not None and 2 * q <= min(dw.shape)):
        q = min(q or min(dw.shape), min(dw.shape))
        omega = torch.randn(dw.shape[1], q, generator=gen, dtype=dw.dtype)
        basis = torch.linalg.qr(dw @ omega).Q  # (out, q): the range of ΔW
        for _ in range(power_iters):  # power iterations sharpen a slowly decaying spectrum
            basis = torch.linalg.qr(dw @ torch.linalg.qr(dw.T @ basis).Q).Q
        u, s, vh = torch.linalg.svd(basis.T @ dw, full_matrices=False)  # (q, q), (q,), (q, fan_in)
        return Spectrum(basis @ u, s, vh.T, total, None if q >= min(dw.shape) else dw)
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    return Spectrum(u, s, vh.T, total)


def truncate(sp: Spectrum, k: int, info: LayerInfo, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(lora_A (k, in, *kh, kw), lora_B (out, k, *1), relative error) of the best rank-k approximation."""
    k = min(k, sp.s.numel())
    root = sp.s[:k].sqrt()
    down = (root[:, None] * sp.right[:, :k].T).reshape(k, info.in_features, *info.kernel_size)
    up = (sp.left[:, :k] * root).reshape(info.out_features, k, *([1] * info.ndim_kernel))
    err = math.sqrt(sp.tail(k) / sp.total) if sp.total > 0 else 0.0
    return down.to(dtype).contiguous(), up.to(dtype).contiguous(), err


def allocate(spectra: dict[Any, torch.Tensor], energy: float, min_rank: int = 1) -> dict[Any, int]:
    """Global ranks: the fewest largest σ across modules whose σ² reach ``energy`` of the total (>= min_rank each)."""
    keys = list(spectra)
    if not keys:
        return {}
    sq = torch.cat([spectra[k].double() ** 2 for k in keys])
    owner = torch.cat([torch.full((spectra[k].numel(),), i) for i, k in enumerate(keys)])
    order = torch.argsort(sq, descending=True, stable=True)
    cum = torch.cumsum(sq[order], 0)
    total = float(cum[-1]) if cum.numel() else 0.0
    n = int(torch.searchsorted(cum, torch.tensor(energy * total * (1 - 1e-14), dtype=cum.dtype)).item()) + 1
    counts = torch.bincount(owner[order[:min(n, order.numel())]], minlength=len(keys))
    return {k: max(int(counts[i]), min(min_rank, spectra[k].numel())) for i, k in enumerate(keys)}


# --- ΔW of each module of a file ---
@dataclass
class Source:
    """One module's adapter, ready to give its ΔW."""

    component: str
    module: str
    adapter: Adapter
    params: int
    base_weight: torch.Tensor | None = None


def module_spectrum(src: Source, k: int | None, method: str, gen: torch.Generator) -> Spectrum:
    ad = src.adapter
    with torch.no_grad():
        if not ad.additive:
            w = src.base_weight.double()
            return dense_spectrum(ad.merged_weight(w, None, 1.0).double() - w, k, method, gen)
        form = lowrank_form(ad) if method != "rsvd" else None
        if form is not None:
            return factored_spectrum(*form)
        return dense_spectrum(ad.delta_weight(None), k, method, gen)


def part_sources(part: Part, view: dict[str, LayerInfo], model: nn.Module | None, src: str) -> Iterator[Source]:
    """Build each module's adapter on its own (CPU, no base model), fill it with the file's tensors, one at a time."""
    cls = get_variant(part.spec.variant)
    infos = {m: view[m] for m in part.modules}
    mods = dict(model.named_modules()) if model is not None else {}
    spec = part.spec if model is None else \
        cls.resolve_spec(model, part.spec, {m: mods[m] for m in part.modules if m in mods})  # as the loader does
    cfgs = module_configs(spec, cls, list(part.modules), "default")
    needs_base = not cls.additive
    if needs_base and (model is None or any(p.is_meta for p in model.parameters())):
        raise AdapterError(
            f"{src}: a {cls.variant} adapter is not additive (DoRA rescales each output row of W + ΔW by m/‖W + ΔW‖): its "
            "effective delta W' − W depends on the base weights, which are not loaded here; expected a model with its "
            "weights (squeeze_file(..., model=pipe), or --model on the command line); the result is exact only at full "
            "rank min(out, in)")
    store = SharedStore("cpu")
    cls.prepare_shared(store, "default", infos, spec)  # as the loader: VeRA's projections at the default dtype
    by_module: dict[str, dict[str, torch.Tensor]] = {m: {} for m in part.modules}
    for key, t in part.tensors.items():
        mod = next((key[:i] for i in _dots(key) if key[:i] in by_module), None)
        if mod is not None:
            by_module[mod][key[len(mod) + 1:]] = t
    for m in part.modules:
        w = get_base_weight(mods[m], infos[m]).detach() if m in mods else None
        # the init dtype of the loader (fp64 on an fp64 base, else fp32): T-LoRA's frozen copies regenerate equal
        init_dtype = torch.float64 if w is not None and w.dtype == torch.float64 else torch.float32
        base = w.to(init_dtype) if needs_base else None
        with _default_dtype(init_dtype):
            ad = cls(infos[m], cfgs[m], base_weight=base, shared=store).double()
        try:
            ad.load_state_dict({k: v.double() for k, v in by_module[m].items()}, strict=True)
        except RuntimeError as e:
            raise AdapterError(f"{src}: module '{m}': the file's tensors do not fit a {cls.variant} adapter of rank "
                               f"{cfgs[m].rank} ({str(e).splitlines()[-1].strip()})") from None
        ad.eval()
        yield Source(part.component, m, ad, sum(v.numel() for v in by_module[m].values()), base)


def _dots(key: str) -> list[int]:
    return [i for i, c in enumerate(key) if c == "."]


def squeeze_parts(parts: list[Part], views: dict[str, dict[str, LayerInfo]], model_for: dict[str, nn.Module | None],
                  rank: int | None = None, energy: float | None = None, method: str = "auto", seed: int = 0,
                  src: str = "adapter") -> tuple[list[Part], SqueezeReport]:
    """Every part as a plain LoRA part of rank ``rank`` (or ranks from ``energy``), and the report."""
    check_target(rank, energy, method)
    t0 = time.perf_counter()
    ranks: dict[tuple[str, str], int] = {}
    if energy is not None:  # pass 1: singular values only (small), then the global allocation
        gen = torch.Generator().manual_seed(seed)
        svals = {(s.component, s.module): module_spectrum(s, None, "exact" if method == "rsvd" else method, gen).s
                 for p in parts for s in part_sources(p, views[p.component], model_for.get(p.component), src)}
        ranks = allocate(svals, float(energy))
    report = SqueezeReport(target=f"rank {rank}" if rank is not None else f"energy {energy:g}")
    gen = torch.Generator().manual_seed(seed)
    by_comp: dict[str, tuple[dict[str, int], dict[str, torch.Tensor]]] = {}  # variant groups become one plain LoRA
    for p in parts:
        dtype = _file_dtype(p.tensors)
        mods, tensors = by_comp.setdefault(p.component, ({}, {}))
        for s in part_sources(p, views[p.component], model_for.get(p.component), src):
            k = rank if rank is not None else ranks[(s.component, s.module)]
            sp = module_spectrum(s, k, "exact" if energy is not None and method == "auto" else method, gen)
            down, up, err = truncate(sp, k, s.adapter.info, dtype)
            r = down.shape[0]
            mods[s.module] = r
            tensors[f"{s.module}.lora_A"], tensors[f"{s.module}.lora_B"] = down, up
            report.modules.append(ModuleSqueeze(s.component, s.module, p.spec.variant,
                                                (s.adapter.info.out_features, s.adapter.info.fan_in), r, err,
                                                math.sqrt(sp.total), s.params, down.numel() + up.numel()))
    out_parts = [Part(c, spec_from_modules("lora", mods, dict.fromkeys(mods)), list(mods), tensors)
                 for c, (mods, tensors) in by_comp.items()]
    report.seconds = time.perf_counter() - t0
    return out_parts, report


def _file_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The file's float dtype (fp16 files stay fp16), fp32 when mixed or none."""
    dts = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return dts.pop() if len(dts) == 1 and next(iter(dts)) in FILE_DTYPES else torch.float32


# --- files ---
def squeeze_file(src: str | os.PathLike, dst: str | os.PathLike, rank: int | None = None,
                 energy: float | None = None, to: str | None = None, base: str | None = None, model: Any = None,
                 overwrite: bool = False, method: str = "auto", seed: int = 0) -> SqueezeReport:
    """Read ``src`` (canonical or any format the readers load), squeeze every module to a plain LoRA, write ``dst``.

    ``to``: output format (default: the input's own: canonical, kohya, diffusers or peft; diffusers for others).
    ``model``: a pipeline or model giving module names and shapes (and base weights, for DoRA); default: an empty
    meta-device pipeline of the file's base family (``base`` or detected). Returns the report (also logged).
    """
    check_target(rank, energy, method)
    path, out = resolve(src), Path(dst)
    if out.exists() and not overwrite:
        raise AdapterError(f"{out}: already exists; expected a new path, or --overwrite (overwrite=True) to replace it")
    info = describe(path)
    fmt = to or (info["format"] if info["format"] in SQUEEZE_FORMATS else "diffusers")
    if fmt not in SQUEEZE_FORMATS:
        raise AdapterError(f"squeeze --to {fmt!r}: expected one of {list(SQUEEZE_FORMATS)} (a plain LoRA format)")
    model = model if model is not None else _skeleton(src, base or info["base_family"])
    from .api import _role_targets

    targets = _role_targets(model)
    views = {role: model_view(m) for role, m in targets.items()}
    loaded = read_safetensors(path) if path.is_file() else None
    extra, meta_in = {}, loaded[1] if loaded else {}
    keys = {role: "" if isinstance(model, nn.Module) else role for role in targets}  # component keys of a canonical file
    if loaded is not None and canonical.is_canonical(loaded[1]):
        tensors, bundled = emb_io.split_bundle(loaded[0])
        entries = canonical.decode_metadata(loaded[1], str(path))
        roles = {c: c.partition(canonical.GROUP_SEP)[0] or _role_of(e.model_class, targets) for c, e in entries.items()}
        keys = {roles[c]: c for c in entries if canonical.GROUP_SEP not in c}
        parts = [Part(roles[c], e.spec, e.modules, canonical.split_component(tensors, c) if c or len(entries) > 1
                      else tensors, group=c.partition(canonical.GROUP_SEP)[2]) for c, e in entries.items()]
        extra = {k: v for k, v in loaded[0].items() if k.startswith(emb_io.BUNDLE)}
    else:
        parts = read_bundle(path, views, getattr(targets.get("unet"), "config", None), loaded,
                            bare=isinstance(model, nn.Module), models=targets).parts
        if loaded is not None:
            extra = {k: v for k, v in loaded[0].items() if k.startswith(emb_io.BUNDLE)}
    missing = [p.component for p in parts if p.component not in views]
    if missing:
        raise AdapterError(f"{src}: component(s) {missing} are not in the model given; expected {sorted(views)}")
    new_parts, report = squeeze_parts(parts, views, {r: targets[r] for r in views}, rank, energy, method, seed, str(src))
    meta = _out_metadata(meta_in, parts, report)
    _write(out, new_parts, fmt, views, meta, model, targets, extra, keys)
    report.path = str(out)
    report.bytes_before, report.bytes_after = _size(path), _size(out)
    log.info("%s -> %s: %s", src, out, report.summary())
    return report


def _skeleton(src: Any, family: str | None) -> Any:
    from .io.skeleton import Skeleton

    if family not in ("sd1", "sd2", "sdxl"):
        raise AdapterError(f"{src}: module shapes are needed and the base family is {family or 'unknown'}; expected an "
                           "SD1.x/SD2.x/SDXL file (or --base sd1|sd2|sdxl), or the model itself (--model SOURCE, "
                           "squeeze_file(..., model=pipe)) for other models such as the demo model or an LLM")
    return Skeleton(family)


def _out_metadata(meta_in: dict[str, str], parts: list[Part], report: SqueezeReport) -> dict[str, str]:
    keep = {k: v for k, v in meta_in.items() if k.startswith(("ss_", "modelspec.")) or k in (
        "trigger_word", "base_model", "base_model_family", "name", emb_io.META_TOKENS)}
    keep.pop("ss_network_dim", None), keep.pop("ss_network_alpha", None), keep.pop("ss_network_module", None)
    return keep | {"squeezed_from": ",".join(sorted({p.spec.variant for p in parts})), "squeeze_target": report.target,
                   "squeeze_error": f"{report.total_error:.6g}"}


def _role_of(model_class: str, targets: dict[str, nn.Module]) -> str:
    """The component a bare model's canonical entry belongs to, by its model class."""
    same = [r for r, m in targets.items() if type(m).__name__ == model_class]
    return same[0] if len(same) == 1 else component_role(next(iter(targets.values())))


def _write(out: Path, parts: list[Part], fmt: str, views: dict, meta: dict[str, str], model: Any,
           targets: dict[str, nn.Module], extra: dict[str, torch.Tensor], keys: dict[str, str]) -> None:
    family = model_family(model) or getattr(model, "family", None)
    if fmt != "canonical":
        write_parts(out, parts, fmt, views, meta, family, getattr(targets.get("unet"), "config", None),
                    extra_tensors=extra if fmt == "kohya" else None)
        return
    tensors = dict(extra)
    entries = {}
    for p in parts:
        comp = keys.get(p.component, p.component)
        tensors.update({(f"{comp}." if comp else "") + k: v for k, v in p.tensors.items()})
        entries[comp] = canonical.ComponentEntry(p.spec, p.modules, type(targets[p.component]).__name__, "default")
    main = parts[0].spec
    meta |= {"variant": "lora", "rank": str(main.rank), "alpha": str(main.rank)}
    if family:
        meta.setdefault("base_model_family", family)
    write_safetensors(out, tensors, canonical.encode_metadata(entries, meta))


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
