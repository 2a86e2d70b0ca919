"""Files we write are reproducible: the same tensors and metadata give the same bytes in any process.

safetensors writes the ``__metadata__`` keys in its hash map's order, which changes between processes; gates record
their LoRAs' sha256 and the library finds duplicate files by it, so a rebuilt LoRA must hash the same."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
WRITE = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from lora_diffusion.io.files import write_safetensors
    meta = {k: v for k, v in (("trigger", "sks"), ("z", 'é "quoted"\\nline'), ("a", "1"), ("ss_tag", '{"x": 1}'),
                               ("base_model", "demo"), ("m", "2"), ("k", "3"), ("q", "4"))}
    write_safetensors(sys.argv[1], {"up": torch.ones(4, 2, dtype=torch.float16), "down": torch.arange(6.0)}, meta)
""")


def test_the_same_lora_written_in_three_processes_has_one_sha256(tmp_path):
    digests = set()
    for i in range(3):
        out = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", WRITE, str(out), str(ROOT)], check=True)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    with safe_open(str(out), "pt") as f:  # still a valid file with everything in it
        assert f.metadata()["z"] == 'é "quoted"\nline' and json.loads(f.metadata()["ss_tag"]) == {"x": 1}
        assert f.get_tensor("up").dtype.is_floating_point and f.get_tensor("down").tolist() == [0, 1, 2, 3, 4, 5]
    raw = out.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
