"""A live `catdog serve-classifier` on a free port: gradio_client, the JSON route, bad uploads, a real browser."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    SHARED_CATDOG,
    make_bad_inputs,
    open_page,
    requires_chromium,
    save_image,
    screenshot_dir,
    start_catdog,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(request) -> Path:
    """The session's real-photo checkpoint when ../shared is there, else random weights (plumbing only)."""
    name = "real_checkpoint" if (SHARED_CATDOG / "train").is_dir() else "tiny_checkpoint"
    return request.getfixturevalue(name)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    temp = tmp_path_factory.mktemp("gradio-temp")
    examples = tmp_path_factory.mktemp("examples")
    save_image(examples / "example.jpg", size=(96, 96))
    proc, url = start_catdog(
        [
            "serve-classifier",
            "--checkpoint",
            str(checkpoint),
            "--examples",
            str(examples),
            "--max-file-size",
            "2mb",
            "--max-pixels",
            "50000000",
        ],
        env_extra={"GRADIO_TEMP_DIR": str(temp)},
        timeout=120,
    )
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _photo(tmp_path) -> Path:
    if (SHARED_CATDOG / "val").is_dir():
        return SHARED_CATDOG / "val" / "cat" / "cat_0001.jpg"
    return save_image(tmp_path / "cat.jpg", size=(200, 150))


def test_binds_loopback_by_default():
    from catdog_glm.serve.classifier import DEFAULT_HOST

    assert DEFAULT_HOST == "127.0.0.1"


def test_gradio_client_predicts(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server + "/", verbose=False)
    label, note = client.predict(handle_file(str(_photo(tmp_path))), api_name="/classify")
    assert label["label"] in ("cat", "dog")
    assert {c["label"] for c in label["confidences"]} == {"cat", "dog"}
    assert label["label"] in note


def test_json_route(server, tmp_path):
    photo = _photo(tmp_path)
    response = httpx.post(f"{server}/api/classify", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert response.status_code == 200
    body = response.json()
    assert body["label"] in ("cat", "dog") and sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    info = httpx.get(f"{server}/api/info").json()
    assert info["arch"] == "resnet18" and info["classes"] == ["cat", "dog"]


def test_bad_uploads_get_4xx_json_and_the_server_keeps_serving(server, tmp_path):
    for name, (path, expected_error) in make_bad_inputs(tmp_path).items():
        size = path.stat().st_size
        response = httpx.post(f"{server}/api/classify", files={"file": (path.name, path.read_bytes())}, timeout=60)
        if size > 2 * 1024 * 1024:
            assert response.status_code == 413, name
        elif expected_error is None:
            assert response.status_code == 200 and response.json()["label"] in ("cat", "dog"), (name, response.text)
        else:
            assert response.status_code == 400, (name, response.text)
            assert expected_error in response.json()["error"], name
    no_file = httpx.post(f"{server}/api/classify", data={"other": "x"})
    assert no_file.status_code == 422 and "field 'file'" in no_file.json()["error"]
    not_multipart = httpx.post(f"{server}/api/classify", content=b"{}", headers={"content-type": "application/json"})
    assert 400 <= not_multipart.status_code < 500 and "error" in not_multipart.json()
    too_big = httpx.post(f"{server}/api/classify", files={"file": ("big.jpg", b"\xff" * (3 * 1024 * 1024))})
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_bad_uploads_through_the_gradio_page(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server + "/", verbose=False)
    cases = make_bad_inputs(tmp_path)
    for name in ("non-image", "0-byte", "truncated jpeg", "cmyk jpeg", "exif-rotated", "16-bit png", "animated gif"):
        path, expected_error = cases[name]
        label, note = client.predict(handle_file(str(path)), api_name="/classify")
        if expected_error is None:
            assert label["label"] in ("cat", "dog"), (name, note)
        else:
            assert not label and expected_error in note, (name, note)


@requires_chromium
def test_real_browser_uploads_a_photo_and_reads_the_label(server, tmp_path):
    from playwright.sync_api import sync_playwright

    photo = _photo(tmp_path)
    shots = screenshot_dir(tmp_path)
    with sync_playwright() as p:
        browser, page = open_page(p, server + "/")
        assert "Cat vs Dog Classifier" in page.content()
        assert "resnet18" in page.inner_text("#model-info")
        page.locator("input[type=file]").first.set_input_files(str(photo))
        page.get_by_role("button", name="Submit").click()
        status = page.locator("#status")
        status.get_by_text("%").wait_for(timeout=60_000)
        shown = status.inner_text()
        assert "cat" in shown or "dog" in shown
        page.screenshot(path=str(shots / "serve_classifier.png"), full_page=True)
        browser.close()
    assert (shots / "serve_classifier.png").stat().st_size > 10_000
