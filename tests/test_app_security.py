"""Security of the launched app (loopback): login required for everything under --auth, files served only from
Gradio's own cache (path traversal on every file route), oversized uploads refused, no server paths as models."""

from __future__ import annotations

import urllib.parse

import httpx
import pytest

from tests.app_harness import Served, random_lora

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
USER = ("alice", "s3cret-pw")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    s = Served(root, users=[USER], max_upload_mb=1)
    s.services.library.import_file(random_lora(root / "dotted.safetensors"), "dotted.safetensors")
    yield s
    s.close()


@pytest.fixture(scope="module")
def logged_in(served):
    http = httpx.Client(base_url=served.url, timeout=30)
    r = http.post("/login", data={"username": USER[0], "password": USER[1]})
    assert r.status_code == 200, r.text
    yield http
    http.close()


@pytest.fixture(scope="module")
def generated(served):
    """A file the app produced for a logged-in client (lives in Gradio's cache)."""
    from gradio_client import Client

    c = Client(served.url, auth=USER, verbose=False)
    out = c.predict("a star", "", "0", 2, 4.0, None, 1, "demo", False, *["", True, 1.0] * 4, api_name="/generate")
    return out[2][0]


def test_nothing_is_reachable_without_login(served, generated) -> None:
    from gradio_client import Client

    anon = httpx.Client(base_url=served.url, timeout=30)
    for path in ("/config", "/gradio_api/info", "/gradio_api/queue/status", f"/gradio_api/file={generated}"):
        assert anon.get(path).status_code in (401, 403), path
    assert anon.post("/gradio_api/upload", files={"files": ("a.png", b"x")}).status_code in (401, 403)
    assert anon.post("/login", data={"username": USER[0], "password": "wrong"}).status_code in (400, 401)
    page = anon.get("/").text
    assert "dotted" not in page and "Personalize" not in page  # the login page, not the app
    with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own error types for a refused login
        Client(served.url, verbose=False)


def test_file_routes_serve_only_the_apps_own_outputs(served, logged_in, generated) -> None:
    assert logged_in.get(f"/gradio_api/file={generated}").status_code == 200  # what the app produced: served
    settings = served.settings
    job_file = next(iter(settings.jobs_dir.glob("*")), settings.jobs_dir)
    targets = ["/etc/passwd", "../../../../../../etc/passwd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
               f"{generated}/../../../../../etc/passwd", f"{generated.rsplit('/', 2)[0]}/../../../etc/passwd",
               str(settings.library / "dotted.safetensors"), str(settings.library / ".lora_library.json"),
               str(job_file), str(served.services.sessions.root), __file__, "~/.bashrc",
               "http://127.0.0.1:1/x"]
    for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/"):
        for t in targets:
            for enc in (t, urllib.parse.quote(t, safe="")):
                r = logged_in.get(route + enc)
                assert r.status_code in (400, 403, 404, 405, 422), (route, enc, r.status_code)
                assert b"root:" not in r.content and b"safetensors" not in r.content[:64]


def test_oversized_and_non_image_uploads_are_refused(logged_in) -> None:
    big = logged_in.post("/gradio_api/upload", files={"files": ("big.safetensors", b"\0" * (2 * 2**20))})
    assert big.status_code in (400, 413), big.status_code


def test_base_model_field_refuses_server_paths(served) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    c = Client(served.url, auth=USER, verbose=False)
    for model in ("/etc", "../assets/demo-sd", "stabilityai/stable-diffusion-xl-base-1.0"):
        with pytest.raises(AppError, match="is not (one of the models this server offers|in the list of choices)"):
            c.predict("a star", "", "0", 2, 4.0, None, 1, model, False, *["", True, 1.0] * 4, api_name="/generate")
    assert served.services.generator.settings.model_source("demo") is None
