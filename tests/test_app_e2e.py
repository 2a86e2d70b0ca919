"""The launched app over HTTP with gradio_client (loopback): train on the demo model, stop, resume, generate with
the result, blend it with a second adapter from the library."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.app_harness import poll, served_with_library, subject_image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
NO_SLOTS = ["", True, 1.0] * 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = served_with_library(tmp_path_factory.mktemp("e2e"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.url, verbose=False)


def status(client, job_id: str) -> str:
    return client.predict(job_id, api_name="/train_status")[0]


def test_train_stop_resume_then_generate_and_blend(served, client, tmp_path, monkeypatch) -> None:
    from gradio_client import handle_file

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    img = subject_image(tmp_path / "ring.png")
    update, msg = client.predict([handle_file(str(img))], "sks", "", "tlora", "demo", 40, None, None, "", "", 40, 30,
                                 "0", "ring", 2, api_name="/train_start")
    job = update["value"]
    # nothing else runs: it starts at once (a second job would say its place); the caption names the ring's colors
    assert msg == "Job ring started · training caption: 'a red sks on a blue background'"
    poll(lambda: status(client, job), lambda s: "step " in s and int(s.split("step ")[1].split("/")[0]) >= 2)
    assert "Stopping ring" in client.predict(job, api_name="/train_stop")
    stopped = poll(lambda: status(client, job), lambda s: "— stopped" in s)
    step = int(stopped.split("· step ")[1].split("/")[0])
    assert 2 <= step < 30, stopped  # stopped part-way, before the first periodic checkpoint (every 30)
    assert f"— stopped at step {step} (checkpoint saved)" in stopped and f"last checkpoint: step {step}" in stopped
    client.predict(job, api_name="/train_resume")
    done = poll(lambda: status(client, job), lambda s: "— done" in s or "— failed" in s)
    assert "step 40/40" in done and "Saved to the library as **ring**" in done, done
    text, loss, samples, files = client.predict(job, api_name="/train_status")
    assert len(loss["data"]) == 40 and samples and {f.rsplit("/", 1)[1] for f in files} == {
        "tlora.safetensors", "tlora.kohya.safetensors", "pytorch_lora_weights.safetensors"}

    # the kohya and diffusers downloads load back (imported through the Library tab's upload)
    kohya = next(f for f in files if f.endswith(".kohya.safetensors"))
    diffusers = next(f for f in files if f.endswith("pytorch_lora_weights.safetensors"))
    table, *_ = client.predict([handle_file(kohya), handle_file(diffusers)], api_name="/library_upload")
    names = {row[0]: row for row in table["data"]}
    assert names["tlora.kohya"][1] == "kohya" and names["pytorch_lora_weights"][1] == "diffusers"

    def gen(*slots):
        gallery, big, pngs = client.predict("a yellow sks on a black background", "", "0", 4, 4.0, None, 2, "demo", False,
                                            *slots, *NO_SLOTS[: 12 - len(slots)], api_name="/generate")
        return [np.asarray(Image.open(p)) for p in pngs], pngs, big

    base, _, _ = gen()
    as_kohya, _, _ = gen("tlora.kohya", True, 1.0)
    as_diffusers, _, _ = gen("pytorch_lora_weights", True, 1.0)
    assert np.abs(as_kohya[0].astype(int) - base[0]).max() > 0 and np.abs(as_diffusers[0].astype(int) - base[0]).max() > 0
    alone, pngs, big = gen("ring", True, 1.0)
    blended, _, _ = gen("ring", True, 1.0, "dotted", True, 0.8)
    for p in pngs:  # lossless PNG at the model's native size; the enlarged view is separate
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (32, 32)
    with Image.open(big) as im:
        assert im.size == (512, 512)
    assert np.abs(alone[0].astype(int) - base[0]).max() > 0 and np.abs(blended[0].astype(int) - alone[0]).max() > 10
    loads = served.services.generator.loads  # one pipeline per set of adapters
    half, _, _ = gen("ring", True, 0.5, "dotted", False, 0.8)
    assert served.services.generator.loads == loads and np.abs(half[0].astype(int) - alone[0]).max() > 0  # in place
    # the Library tab exports the trained T-LoRA as kohya (through the base model: its frozen tensors are regenerated)
    exported, said = client.predict("ring", "kohya", api_name="/library_export")
    assert exported.endswith("ring.kohya.safetensors") and said.startswith("Exported **ring** as kohya")
    from lora_diffusion.io.files import read_header

    assert any(k.startswith("lora_unet_") for k in read_header(exported)[0])
    # automatic mode: the library's LoRAs retrieved for the prompt, gated fusion, a gate plot
    gallery, big, pngs, chosen, gates, notes = client.predict(
        "a yellow sks on a black background", "", "0", 4, 4.0, None, 1, "demo", False, *NO_SLOTS, "", True, 1.0,
        "automatic", "gated", 2, api_name="/blend")
    library = {"ring", "dotted", "tlora.kohya", "pytorch_lora_weights"}
    assert {row[0] for row in chosen["data"]} <= library and len(chosen["data"]) == 2 and gates
    assert "gated" in notes and len(pngs) == 1
    # the Library tab's Squeeze button: the trained T-LoRA becomes a new rank-4 plain-LoRA entry
    table, *_ = client.predict("ring", 4, None, api_name="/library_squeeze")
    row = next(r for r in table["data"] if r[0] == "ring-r4")
    assert row[3] == "lora" and row[4] == 4


def test_bad_input_over_http_is_named_and_the_app_keeps_serving(client, tmp_path) -> None:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="/etc/passwd'? is not (one of|in the list of choices)"):  # dropdown + service
        client.predict("a star", "", "0", 2, 4.0, None, 1, "/etc/passwd", False, *NO_SLOTS, "", True, 1.0,
                       api_name="/generate")
    with pytest.raises(AppError, match="weight of dotted: expected a finite number|greater than maximum value 2"):
        client.predict("a star", "", "0", 2, 4.0, None, 1, "demo", False, "dotted", True, 1e6, *NO_SLOTS,
                       api_name="/generate")
    with pytest.raises(AppError, match="seed: empty"):
        client.predict("a star", "", "", 2, 4.0, None, 1, "demo", False, *NO_SLOTS, "", True, 1.0, api_name="/generate")
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"%PDF-1.4 not an image")
    with pytest.raises(AppError, match="image photo.png: not an image this app can read"):
        client.predict([handle_file(str(fake))], "sks", "", "tlora", "demo", 2, None, None, "", "", None, None, "0", "",
                       None, api_name="/train_start")
    with pytest.raises(AppError, match="placeholder token: expected one word without spaces"):
        client.predict([handle_file(str(subject_image(tmp_path / "r.png")))], "my dog", "", "tlora", "demo", 2, None,
                       None, "", "", None, None, "0", "", None, api_name="/train_start")
    out = client.predict("a star", "", "1", 2, 4.0, None, 1, "demo", False, *NO_SLOTS, "", True, 1.0, api_name="/generate")
    assert len(out[2]) == 1  # still serving
