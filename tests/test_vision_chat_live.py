"""`catdog serve-chat --classifier` for real: a classifier fine-tuned in this session on the real photos, the
embedded SmolLM2 deciding what to say about its verdict, ten photos through the API, and one through the page."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.conftest import (
    SHARED_CATDOG,
    open_page,
    requires_chromium,
    requires_shared_data,
    screenshot_dir,
    start_catdog,
)

pytestmark = [pytest.mark.slow, requires_shared_data]
QUESTION = "Is this a cat or a dog?"
FLOOR = 7  # of 10 answers naming the right animal (measured: see the README)


def ten_photos() -> list[tuple[str, str]]:
    """Five cats and five dogs from the validation split (never seen in training)."""
    out = []
    for animal in ("cat", "dog"):
        out += [(str(p), animal) for p in sorted((SHARED_CATDOG / "val" / animal).glob("*.jpg"))[:5]]
    return out


@pytest.fixture(scope="module")
def photo_classifier(tmp_path_factory):
    """The embedded ImageNet EfficientNet-Lite0 fine-tuned for one epoch on 200 real photos at 128 px (about 85%)."""
    from catdog_glm.config import TrainConfig
    from catdog_glm.vision.trainer import train

    out = tmp_path_factory.mktemp("photo-clf")
    train(
        TrainConfig(
            data=str(SHARED_CATDOG),
            output=str(out),
            arch="efficientnet_lite0",
            pretrained="imagenet",
            epochs=1,
            image_size=128,
            train_limit=200,
            lr=1e-3,
            tracker="none",
            progress=False,
        )
    )
    return out / "best.pt"


@pytest.fixture(scope="module")
def server(photo_classifier):
    proc, url = start_catdog(["serve-chat", "--classifier", str(photo_classifier)])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def ask(url: str, path: str) -> dict:
    photo = "data:image/jpeg;base64," + base64.b64encode(open(path, "rb").read()).decode()
    parts = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": photo}}]
    body = {"messages": [{"role": "user", "content": parts}], "temperature": 0, "max_tokens": 60}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def named(text: str) -> set[str]:
    return {animal for animal in ("cat", "dog") if animal in text.lower()}


def test_smollm2_answers_from_the_classifier_about_ten_real_photos(server):
    right = faithful = 0
    for path, truth in ten_photos():
        done = ask(server, path)
        [step] = done["catdog"]["tool_steps"]
        verdict = step["result"]["label"]
        answer = done["choices"][0]["message"]["content"]
        right += named(answer) == {truth}
        faithful += named(answer) == {verdict}
        print(f"{path.rsplit('/', 1)[-1]}: truth {truth}, classifier {verdict}, SmolLM2: {answer!r}")
    print(f"SmolLM2 named the right animal in {right}/10 answers ({faithful}/10 named the classifier's verdict)")
    assert right >= FLOOR


@requires_chromium
def test_page_upload_of_a_real_photo(server, tmp_path):
    from playwright.sync_api import sync_playwright

    path, _ = ten_photos()[0]
    shots = screenshot_dir(tmp_path)
    with sync_playwright() as p:
        browser, page = open_page(p, server + "/")
        page.locator("#query input[type=file]").set_input_files(path)
        page.locator("#query textarea").fill(QUESTION)
        page.wait_for_timeout(500)
        page.get_by_role("button", name="Submit").click()
        page.get_by_text("classify_image(image=image_1)").first.wait_for(timeout=120_000)
        page.wait_for_function(  # the answer after the step, once the Stop button has nothing left to stop
            "() => { const b = document.querySelectorAll('#chatbot .bot'); return b.length &&"
            " b[b.length - 1].innerText.trim().length > 3 }",
            timeout=120_000,
        )
        page.wait_for_timeout(3000)
        text = page.inner_text("#chatbot")
        page.screenshot(path=str(shots / "serve_chat_real_photo.png"), full_page=True)
        browser.close()
    print(text)
    assert "classify_image" in text and "best.pt" in text
