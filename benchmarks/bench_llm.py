"""LLM adapter benchmark: one LoRA training step on a causal LM, ours vs PEFT; and QLoRA vs a 16-bit base.

Cases, on the same base weights (a Llama built from a config and saved once, so nothing is downloaded;
``--model`` takes a real folder or .gguf instead) and the same batches:

* ``ours-lora`` -- ``ld.add_adapter(model, AdapterSpec("lora", rank=r, targets="llm"))``
* ``peft-lora`` -- ``peft.get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=<the same 7 linears>))``

A step is forward + causal-LM loss + backward + ``AdamW.step`` + ``zero_grad(set_to_none=True)``.

How it measures (each measurement in a fresh subprocess of this script):

* Speed: one worker loads both models and runs the cases round-robin, one step each, alternating the
  order every round, so both see the same machine load; tokens/s = batch x seq / median step time,
  and the median of the per-round paired time ratios (ours / PEFT).
* Step memory: one worker per case. Baseline = RSS after the base model is loaded; VmHWM is reset
  (``/proc/self/clear_refs``), then the adapter is added, the optimizer built and the steps run;
  peak = VmHWM - baseline (the adapter, its optimizer state and the activations of a step).
* QLoRA memory (``--qlora``): one worker per base precision (bf16, 4-bit NF4 with double quantization):
  the RSS the loaded model holds (VmRSS after loading minus before, both after ``gc`` + ``malloc_trim``;
  every tensor is cloned after loading so no page of the memory-mapped checkpoint file is counted;
  transient loading buffers excluded), plus the peak of one LoRA step above that (VmHWM reset after
  loading); their sum is the memory a QLoRA training step needs.

Usage::

    python benchmarks/bench_llm.py                 # reduced Llama (8 layers, hidden 576), CPU, ~2 minutes
    python benchmarks/bench_llm.py --qlora         # also the QLoRA vs bf16-base memory comparison
    python benchmarks/bench_llm.py --model path/to/model --device cuda --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.procmem import reset_hwm, rss_kib, trim  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = ("ours-lora", "peft-lora")


def make_model_folder(path: Path, hidden: int = 576, layers: int = 8, intermediate: int = 1536, vocab: int = 8192,
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """A Llama with random weights saved in ``dtype`` (SmolLM2-135M's widths, fewer layers, smaller vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=_kv_heads(max(1, hidden // 64)),
                      max_position_embeddings=2048, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    from training.llm_data import char_tokenizer

    char_tokenizer().save_pretrained(path)  # load_causal_lm loads a tokenizer too; the batches are random ids
    return path


def _kv_heads(heads: int) -> int:
    return heads // 3 if heads % 3 == 0 else heads // 2 if heads % 2 == 0 else heads


def _peak_mb(rss0_kib: int, maxrss0_kib: int, hwm_ok: bool) -> tuple[float, str]:
    if hwm_ok:
        return (rss_kib("VmHWM") - rss0_kib) / 1024, "VmHWM - VmRSS(baseline)"
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0_kib) / 1024, "ru_maxrss increase"


def _load(model: str, device: str, load_in_4bit: bool = False, dtype: torch.dtype = torch.float32):
    from lora_diffusion import llm

    m, _ = llm.load_causal_lm(model, load_in_4bit=load_in_4bit, dtype=dtype, device=device)
    return m


def add_case(model: torch.nn.Module, case: str, rank: int) -> torch.nn.Module:
    if case == "ours-lora":
        import lora_diffusion as ld

        ld.add_adapter(model, ld.AdapterSpec("lora", rank=rank, targets="llm"))
        return model
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=LINEARS))


def batches(vocab: int, batch: int, seq: int, n: int, device: str) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


class Runner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(self, b: dict[str, torch.Tensor]) -> None:
        loss = self.model(**b).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker_time(a: argparse.Namespace) -> dict[str, Any]:
    runners = {}
    for case in CASES:
        torch.manual_seed(0)
        runners[case] = Runner(add_case(_load(a.model, a.device, dtype=a.dtype), case, a.rank))
    vocab = runners[CASES[0]].model.config.vocab_size
    data = batches(vocab, a.batch, a.seq, a.steps + a.warmup, a.device)
    times: dict[str, list[float]] = {c: [] for c in CASES}
    for i, b in enumerate(data):
        order = CASES if i % 2 == 0 else CASES[::-1]
        for case in order:
            _sync(a.device)
            t = time.perf_counter()
            runners[case].step(b)
            _sync(a.device)
            if i >= a.warmup:
                times[case].append(time.perf_counter() - t)
    out: dict[str, Any] = {}
    for c in CASES:
        med = statistics.median(times[c])
        out[c] = {"median_s": med, "min_s": min(times[c]), "tokens_per_s": a.batch * a.seq / med}
    out["ratio_median"] = statistics.median(x / y for x, y in zip(times["ours-lora"], times["peft-lora"]))
    return out


def worker_mem(a: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _load(a.model, a.device, dtype=a.dtype)
    data = batches(model.config.vocab_size, a.batch, a.seq, a.mem_steps, a.device)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss0, maxrss0 = rss_kib("VmRSS") or 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_ok = reset_hwm()
    r = Runner(add_case(model, a.case, a.rank))
    for b in data:
        r.step(b)
    peak, method = _peak_mb(rss0, maxrss0, hwm_ok)
    out = {"rss_peak_mb": peak, "method": method}
    if a.device.startswith("cuda"):
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def measure_memory(folder: Path, load_in_4bit: bool, seq: int = 64, batch: int = 2, rank: int = 8,
                   device: str = "cpu") -> dict[str, Any]:
    """Peak memory (MB) of loading ``folder`` (bf16 or 4-bit NF4) and one LoRA step, in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--worker", "qlora", "--model", str(folder), "--seq", str(seq), "--batch", str(batch),
           "--rank", str(rank), "--device", device] + (["--load_in_4bit"] if load_in_4bit else [])
    return _run(cmd)


def worker_qlora(a: argparse.Namespace) -> dict[str, Any]:
    import transformers  # noqa: F401

    import lora_diffusion as ld
    from lora_diffusion import llm  # noqa: F401  (imports settle before the baseline)

    if a.load_in_4bit:
        import bitsandbytes  # noqa: F401
    trim()
    rss0 = rss_kib("VmRSS") or 0
    model = _load(a.model, a.device, load_in_4bit=a.load_in_4bit, dtype=torch.bfloat16)
    with torch.no_grad():  # own every tensor (no pages of the memory-mapped checkpoint left in RSS)
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    trim()
    rss1 = rss_kib("VmRSS") or 0
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_ok = reset_hwm()
    ld.add_adapter(model, ld.AdapterSpec("lora", rank=a.rank, targets="llm"))
    r = Runner(model)
    for b in batches(model.config.vocab_size, a.batch, a.seq, 1, a.device):
        r.step(b)
    step, method = _peak_mb(rss1, maxrss1, hwm_ok)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    loaded = (rss1 - rss0) / 1024
    return {"loaded_mb": loaded, "step_peak_mb": step, "peak_mb": loaded + step, "method": method,
            "param_storage_mb": weights, "load_in_4bit": a.load_in_4bit}


def _run(cmd: list[str]) -> dict[str, Any]:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder, hub id or .gguf (default: a reduced Llama built here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="base dtype of the speed/memory cases")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-steps", dest="mem_steps", type=int, default=2)
    p.add_argument("--qlora", action="store_true", help="also compare QLoRA's peak memory with a bf16 base")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load_in_4bit", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        a.dtype = getattr(torch, a.dtype)
        fn = {"time": worker_time, "mem": worker_mem, "qlora": worker_qlora}[a.worker]
        print(json.dumps(fn(a)))  # noqa: T201 (the worker's answer to its parent)
        return
    model = a.model or str(make_model_folder(ROOT / "outputs" / "bench_llm_model", dtype=torch.float32))
    common = ["--model", model, "--device", a.device, "--dtype", a.dtype, "--rank", str(a.rank), "--batch", str(a.batch),
              "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup), "--mem-steps", str(a.mem_steps)]
    if a.threads:
        common += ["--threads", str(a.threads)]
    res: dict[str, Any] = {"time": _run([sys.executable, __file__, "--worker", "time", *common])}
    res["mem"] = {c: _run([sys.executable, __file__, "--worker", "mem", "--case", c, *common]) for c in CASES}
    if a.qlora:
        bf16 = make_model_folder(ROOT / "outputs" / "bench_llm_model_bf16", dtype=torch.bfloat16) if not a.model else model
        res["qlora"] = {k: measure_memory(Path(bf16), q, a.seq, a.batch, a.rank, a.device)
                        for k, q in (("bf16-base", False), ("nf4-base", True))}
    t, m = res["time"], res["mem"]
    lines = [f"# bench_llm: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, model {model}, rank {a.rank}, batch {a.batch} x seq {a.seq}, {a.dtype}",
             "| case | median step (s) | tokens/s | step peak RSS (MB) |", "|---|---|---|---|"]
    for c in CASES:
        lines.append(f"| {c} | {t[c]['median_s']:.3f} | {t[c]['tokens_per_s']:.0f} | {m[c]['rss_peak_mb']:.1f} |")
    lines.append(f"time ours/PEFT (median of paired rounds): {t['ratio_median']:.3f}x; memory ours/PEFT: "
                 f"{m['ours-lora']['rss_peak_mb'] / max(m['peft-lora']['rss_peak_mb'], 1e-9):.3f}x ({m['ours-lora']['method']})")
    if a.qlora:
        q = res["qlora"]
        lines += ["| base | parameter storage (MB) | RSS of the loaded model (MB) | + peak of one LoRA step (MB) | total |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['param_storage_mb']:.1f} | {v['loaded_mb']:.1f} | {v['step_peak_mb']:.1f} | {v['peak_mb']:.1f} |"
                  for k, v in q.items()]
    print("\n".join(lines))  # noqa: T201 (the report)
    print(json.dumps(res))  # noqa: T201


if __name__ == "__main__":
    main()
