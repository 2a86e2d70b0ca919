"""A real browser (Debian's headless Chromium through Selenium) drives the launched app: upload a photo, start
training, watch progress and samples appear, stop, try a prompt with the adapter, resume to the end, find it in the
library, generate with it. Screenshots go to $LORA_APP_SCREENSHOTS (the README's come from here)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.app_harness import served_with_library, subject_image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.fail("chromium and chromium-driver are needed: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1900",
              "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = served_with_library(tmp_path_factory.mktemp("browser"))
    yield s
    s.close()


def shot(driver, name: str) -> None:
    """A screenshot of the page from its top (the README shows these)."""
    driver.execute_script("window.scrollTo(0, 0);")
    time.sleep(0.5)
    driver.save_screenshot(str(shots() / name))


def shots() -> Path:
    folder = Path(os.environ.get("LORA_APP_SCREENSHOTS", "/tmp/lora-app-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for(driver, fn, timeout=150.0, what=""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.3).until(lambda d: fn(d), what)


def text_of(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, elem_id).text


def set_number(driver, elem_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # the field may not be drawn yet (an accordion just opened): wait for it rather than racing the page
    box = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} input"), 10, elem_id)[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value, Keys.TAB)


def click(driver, elem_id: str) -> None:
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.ID, elem_id)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    el.click()


def tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if name in b.text).click()


def images_in(driver, elem_id: str) -> int:
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img"))


def test_personalize_in_a_real_browser(browser, served, tmp_path, monkeypatch) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    d = browser
    d.get(served.url)
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"), 60, "the page")
    upload = d.find_elements(By.CSS_SELECTOR, "input[type=file]")[0]  # the only one on the first tab: the images
    upload.send_keys(str(subject_image(tmp_path / "ring.png")))
    wait_for(d, lambda d: "ring.png" in d.page_source, 30, "the upload")
    d.find_element(By.XPATH, "//*[normalize-space(text())='Advanced']").click()  # the accordion
    # 60 steps: Stop (clicked once the first samples show, at step >= 10) must land before the run ends on its own;
    # with 30 steps a quiet machine (10 it/s) sometimes finished first and the job read "done", never "stopped"
    for elem, v in (("train-steps", "60"), ("sample-every", "10"), ("ckpt-every", "2"), ("sample-steps", "3")):
        set_number(d, elem, v)
    wait_for(d, lambda d: "60 steps" in text_of(d, "train-estimate"), 20, "the estimate")
    click(d, "train-start")
    wait_for(d, lambda d: "running" in text_of(d, "job-status") and "it/s" in text_of(d, "job-status"), 90, "progress")
    wait_for(d, lambda d: images_in(d, "job-samples") > 0, 120, "samples")
    wait_for(d, lambda d: "last checkpoint" in text_of(d, "job-status"), 60, "a checkpoint")
    shot(d, "app-personalize-training.png")
    status = text_of(d, "job-status")
    assert "step " in status and "/60" in status and "ETA" in status
    click(d, "train-stop")
    wait_for(d, lambda d: "stopped" in text_of(d, "job-status"), 60, "stopped")
    click(d, "try-btn")  # a prompt with the adapter as it is now
    wait_for(d, lambda d: images_in(d, "tried") >= 2, 90, "tried images")
    shot(d, "app-personalize-stopped-try.png")
    click(d, "train-resume")
    wait_for(d, lambda d: "done" in text_of(d, "job-status"), 150, "done")
    assert "Saved to the library as" in text_of(d, "job-status")
    wait_for(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#job-downloads a[download]")) == 3, 20, "downloads")
    assert {a.get_attribute("download") for a in d.find_elements(By.CSS_SELECTOR, "#job-downloads a[download]")} == {
        "tlora.safetensors", "tlora.kohya.safetensors", "pytorch_lora_weights.safetensors"}
    shot(d, "app-personalize-done.png")
    d.refresh()  # a reloaded page finds the job again (its state is on disk)
    wait_for(d, lambda d: "done" in text_of(d, "job-status") and "step 60/60" in text_of(d, "job-status"), 60, "reload")

    tab(d, "Library")
    click(d, "lib-refresh")
    wait_for(d, lambda d: "sks-tlora" in text_of(d, "lib-table") and "dotted" in text_of(d, "lib-table"), 30, "library")
    table = text_of(d, "lib-table")
    assert "canonical" in table and "tlora" in table and "60 steps" in table
    pick = d.find_element(By.CSS_SELECTOR, "#lib-select input")
    pick.click()
    pick.send_keys(Keys.CONTROL, "a")
    pick.send_keys("sks-tlora", Keys.ENTER)
    wait_for(d, lambda d: images_in(d, "lib-sample") > 0 and "tlora" in text_of(d, "lib-info"), 30, "inspect")
    shot(d, "app-library.png")

    tab(d, "Generate")
    box = d.find_element(By.CSS_SELECTOR, "#slot-0 input")
    box.click()
    box.send_keys("sks-tlora", Keys.ENTER)
    on = d.find_element(By.CSS_SELECTOR, "#slot-on-0 input")
    wait_for(d, lambda d: on.is_selected(), 10, "choosing an adapter turns its slot on")
    assert not d.find_element(By.CSS_SELECTOR, "#slot-on-1 input").is_selected()  # empty slots read "off"
    prompt = d.find_element(By.CSS_SELECTOR, "#gen-prompt textarea, #gen-prompt input")
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys("a yellow sks on a black background", Keys.ENTER)  # Enter generates
    wait_for(d, lambda d: images_in(d, "gen-gallery") >= 4, 120, "generated images")
    shot(d, "app-generate.png")
    assert "seed0" in text_of(d, "gen-files") or "seed" in d.page_source


@pytest.fixture(scope="module")
def served_dit(tmp_path_factory):
    """An app offering the demo models (UNet, SD3 transformer) and a tiny Flux.1 pipeline, with a tiny LLM and a T2L
    hypernetwork for it."""
    import torch

    from app.services.settings import DEMO_DIT, demo_dit_path
    from lora_diffusion import llm
    from lora_diffusion.hyper import T2L, T2LConfig
    from tests.app_harness import Served
    from tests.test_internalize_cli import make_folder
    from tests.test_t2l import perturb
    from tests.tiny_dit import build_tiny_flux

    root = tmp_path_factory.mktemp("browser-dit")
    folder = make_folder(root / "llm")
    dit = demo_dit_path()
    assert dit is not None, "assets/demo-sd3 is missing: python -m training.pretrain_demo_dit"
    s = Served(root, models={"demo": None, DEMO_DIT: str(dit), "flux": str(build_tiny_flux(root / "flux"))},
               llm_models={"tiny": str(folder)})
    model, _ = llm.load_causal_lm(str(folder))
    hyper = T2L.for_model(model, T2LConfig(rank=4, alpha=8, task_dim=16, pos_dim=8, hidden=32, head_in=16))
    with torch.no_grad():
        perturb(hyper)
    hyper.save(s.settings.hyper_dir / "t2l.safetensors", base_model=llm.base_name(model))
    yield s
    s.close()


def choose(driver, elem_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value, Keys.ENTER)


def test_flux_model_and_text_to_lora_in_a_real_browser(browser, served_dit) -> None:
    """The Flux presets follow the model choice (Personalize: 1024 px, gradient checkpointing, pivotal tuning locked
    off; Generate: 28 steps, guidance 3.5), a Flux image is generated, a gated blend with no LoRA on says it used
    the base model, the embedded SD3 demo model draws the prompt, and the LLM tab makes a LoRA from a description and
    chats with it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(served_dit.url)
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#train-model input"), 60, "the page")
    choose(d, "train-model", "demo (SD3")  # the DiT demo model: its recipe (400 steps), pivotal tuning on
    wait_for(d, lambda d: "400 steps" in text_of(d, "train-estimate") and
             "demo model (SD3 transformer), 32 px" in text_of(d, "train-estimate"), 20, "the DiT demo preset")
    pivotal = d.find_element(By.CSS_SELECTOR, "#train-pivotal input")
    assert pivotal.is_enabled() and pivotal.is_selected()
    shot(d, "app-personalize-demo-sd3.png")
    choose(d, "train-model", "flux")
    wait_for(d, lambda d: "Flux.1-dev, 1024 px · fp32 · gradient checkpointing" in text_of(d, "train-estimate"), 20,
             "the Flux preset")
    assert not d.find_element(By.CSS_SELECTOR, "#train-pivotal input").is_enabled()
    shot(d, "app-personalize-flux.png")

    tab(d, "Generate")
    assert d.find_element(By.ID, "gen-examples").is_displayed()  # the demo world's prompts, on the demo model
    choose(d, "gen-model", "flux")
    wait_for(d, lambda d: "Flux.1-dev: 1024 px, 28 steps, guidance 3.5" in text_of(d, "gen-model-note"), 20, "note")
    wait_for(d, lambda d: not d.find_elements(By.CSS_SELECTOR, "#gen-examples") or
             not d.find_element(By.ID, "gen-examples").is_displayed(), 10, "no demo prompts on a real checkpoint")
    assert d.find_element(By.CSS_SELECTOR, "#gen-steps input[type=number]").get_attribute("value") == "28"
    set_number(d, "gen-size", "32")
    set_number(d, "gen-n", "1")
    click(d, "gen-go")
    wait_for(d, lambda d: images_in(d, "gen-gallery") >= 1, 120, "a Flux image")
    shot(d, "app-generate-flux.png")
    choose(d, "blend-method", "gated")
    click(d, "gen-go")
    wait_for(d, lambda d: "generated with the base model" in d.page_source, 60, "the gated blend's note (no LoRA on)")
    choose(d, "gen-model", "demo (SD3")  # the embedded SD3-architecture demo model draws the shapes world
    wait_for(d, lambda d: "(SD3 transformer): 32 px, 28 steps, guidance 7" in text_of(d, "gen-model-note"), 20, "note")
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#gen-examples") and
             d.find_element(By.ID, "gen-examples").is_displayed(), 10, "the demo prompts on the DiT demo model")
    choose(d, "blend-method", "static")
    set_number(d, "gen-size", "0")
    set_number(d, "gen-n", "4")
    click(d, "gen-go")
    wait_for(d, lambda d: images_in(d, "gen-gallery") >= 4, 120, "demo SD3 images")
    shot(d, "app-generate-demo-sd3.png")

    tab(d, "LLM")
    wait_for(d, lambda d: "t2l.safetensors" in d.find_element(By.CSS_SELECTOR, "#t2l-hyper input").get_attribute("value"),
             20, "the hypernetwork")
    task = d.find_element(By.CSS_SELECTOR, "#t2l-task textarea")
    task.send_keys("Return only the last word.")
    click(d, "t2l-go")
    wait_for(d, lambda d: "Saved to the library as" in text_of(d, "hyper-msg"), 90, "the generated LoRA")
    assert "library: Return only the last word" in d.find_element(By.CSS_SELECTOR, "#llm-chat-with input").get_attribute(
        "value")
    msg = d.find_element(By.CSS_SELECTOR, "#llm-message textarea, #llm-message input")
    msg.send_keys("apple river stone", Keys.ENTER)
    wait_for(d, lambda d: all("apple river stone" in text_of(d, c) for c in ("llm-base", "llm-adapted"))
             and not msg.get_attribute("value"), 90, "both answers")
    shot(d, "app-llm-text-to-lora.png")


@pytest.fixture(scope="module")
def served_library(tmp_path_factory):
    """An app whose library folder is tests/retrieval_library.py's (15 files in sub-folders: concepts, styles,
    distractors, an SDXL file, a truncated file), server paths allowed."""
    from tests.app_harness import Served
    from tests.retrieval_library import build_library

    root = tmp_path_factory.mktemp("browser-lib")
    build_library(root)[0].rename(root / "lib")
    s = Served(root, allow_server_paths=True)
    yield s
    s.close()


def shown_times(driver, text: str) -> int:
    """How often ``text`` is on the page as the user sees it (a toast repeating a status box counts twice)."""
    return driver.execute_script("return document.body.innerText.split(arguments[0]).length - 1", text)


def test_errors_in_status_boxes_and_a_library_blend_in_a_real_browser(browser, served_library) -> None:
    """A failed action says why in its own status box, once (no toast that outlives the next action), and leaves the
    other outputs as they were (no 'Error' badge over the library table); the next, successful action replaces the
    message. The Library tab says which files in sub-folders it does not list; automatic mode retrieves from them,
    shows the scores, the skipped files and the gate plot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d, lib = browser, served_library.settings.library
    d.get(served_library.url)
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#train-model input"), 60, "the page")
    click(d, "train-start")  # no images
    wait_for(d, lambda d: "images: none" in text_of(d, "train-msg"), 20, "the Start message")
    assert shown_times(d, "images: none") == 1 and "Error" not in text_of(d, "job-select")
    shot(d, "app-personalize-error.png")

    tab(d, "Library")
    wait_for(d, lambda d: "15 adapter file(s) in sub-folders" in text_of(d, "lib-note"), 20, "the sub-folder note")
    path = d.find_element(By.CSS_SELECTOR, "#lib-server-path textarea, #lib-server-path input")
    path.send_keys(str(lib / "concepts" / "missing.safetensors"))
    click(d, "lib-import-path")
    wait_for(d, lambda d: "no such file" in text_of(d, "lib-msg"), 20, "the import error")
    assert shown_times(d, "no such file") == 1 and "Error" not in text_of(d, "lib-table")
    path.send_keys(Keys.CONTROL, "a")
    path.send_keys(str(lib / "concepts" / "ring.safetensors"))
    click(d, "lib-import-path")
    wait_for(d, lambda d: "Imported ring.safetensors as ring" in text_of(d, "lib-msg"), 30, "the import")
    assert "no such file" not in d.execute_script("return document.body.innerText")  # the old error is gone
    # the Personalize message stays in its own box (on the hidden tab): no toast carries it over here
    assert "ring" in text_of(d, "lib-table") and shown_times(d, "images: none") == 0
    shot(d, "app-library-status.png")

    tab(d, "Generate")
    prompt = d.find_element(By.CSS_SELECTOR, "#gen-prompt textarea, #gen-prompt input")
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys("a red dotted ring on a blue background")
    d.find_element(By.CSS_SELECTOR, "#blend-mode input[value=automatic]").click()
    choose(d, "blend-method", "gated")
    set_number(d, "gen-steps", "6")
    set_number(d, "gen-n", "2")
    click(d, "gen-go")
    wait_for(d, lambda d: images_in(d, "blend-gates") > 0 and images_in(d, "gen-gallery") >= 2, 150, "the blend")
    chosen, notes = text_of(d, "blend-chosen"), text_of(d, "blend-notes")
    assert "ring" in chosen and "dotted_texture" in chosen and "retrieval score" in chosen
    assert "skipped" in notes and "SDXL" in notes and str(lib) not in notes and "⚠" not in notes
    shot(d, "app-blend-automatic.png")
