"""`serve-chat --classifier`: photos in the chat, classified server-side by the classify_image tool.

The scripted fake model (tests/fake_chat.py) through the real app (create_chat_app, as serve-chat builds it): a
photo -> a classify_image call -> the verdict fed back -> the answer; streaming; the odd-image corpus and a 20 MB
data URL -> a tool error the answer carries (never a 5xx); remote URLs -> 400; client tools beside the built-in one;
the round limit; an exported .onnx classifier; the CLI's refusals; the page in a real browser.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time

import pytest
from fastapi.testclient import TestClient

from catdog_glm.chat.engine import ChatEngine
from catdog_glm.errors import ConfigError
from catdog_glm.serve.chat_api import ApiLimits, create_api
from catdog_glm.serve.chat_server import create_chat_app
from catdog_glm.serve.vision_tool import MAX_TOOL_ROUNDS, TOOL_NAME, ClassifierTool, VisionChat, attach_classifier
from tests.conftest import make_bad_inputs, open_page, requires_chromium, save_image, screenshot_dir
from tests.fake_chat import default_script, fake_chat_model

CALL = '<tool_call>\n{"name": "classify_image", "arguments": {"image": "image_1"}}\n</tool_call>'
BREED_CALL = '<tool_call>\n{"name": "lookup_breed", "arguments": {"animal": "cat"}}\n</tool_call>'
BREED_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_breed",
        "parameters": {"type": "object", "properties": {"animal": {"type": "string"}}, "required": ["animal"]},
    },
}


def script(prompt: str) -> str:
    """A model that looks at a new photo, then answers from the verdict (or passes on the tool's error)."""
    last = prompt[prompt.rfind("<|im_start|>user\n") :]
    if last.startswith("<|im_start|>user\n<tool_response>"):
        said = last.split("<tool_response>\n", 1)[1].split("\n</tool_response>", 1)[0]
        if said.startswith("{"):
            return f"A {json.loads(said)['breed']}."  # the client's tool answered
        if "lookup_breed" in prompt:
            return BREED_CALL  # the client's own tool, after the built-in one
        if "could not be classified: " in said:
            return f"Sorry: {said.split('could not be classified: ', 1)[1]}"
        label = re.search(r"shows a (\w+)", said).group(1)
        return f"It is a {label}."
    if last.startswith("<|im_start|>user\n") and "[photo image_" in last:
        return CALL.replace("image_1", re.findall(r"\[photo (image_\d+)\]", last)[-1])
    return default_script(prompt)


@pytest.fixture(scope="module")
def engine():
    engine = ChatEngine(fake_chat_model(script), max_batch_size=4, max_batch_tokens=1 << 16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def tool(tiny_checkpoint):
    return ClassifierTool.load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(engine, tool):
    app = create_chat_app(engine, ApiLimits(max_body_bytes=32 << 20), vision=attach_classifier(engine, tool))
    return TestClient(app)


def data_url(data: bytes, media: str = "image/jpeg") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def jpeg(color=(200, 40, 40), size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def ask(url: str, text: str = "Is this a cat or a dog?") -> list[dict]:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts}]


def post(client, messages, **body):
    return client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0} | body)


def test_a_photo_is_classified_server_side_and_the_answer_says_the_verdict(client, tool):
    photo = jpeg()
    r = post(client, ask(data_url(photo)))
    assert r.status_code == 200, r.text
    done = r.json()
    [expected] = tool.predictor.predict_sources([photo], ["image_1"])
    [step] = done["catdog"]["tool_steps"]
    assert step["name"] == TOOL_NAME and step["arguments"] == {"image": "image_1"}
    assert step["result"]["label"] == expected.label and step["result"]["classifier"] == "best.pt"
    probability = step["result"]["probabilities"][expected.label]
    assert probability == pytest.approx(expected.probabilities[expected.label], abs=1e-3)
    choice = done["choices"][0]
    assert choice["message"]["content"] == f"It is a {expected.label}." and choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]  # the built-in call is the server's business, not the client's
    assert done["usage"]["completion_tokens"] > len(CALL)  # both rounds counted


def test_streamed_with_the_step_as_its_own_chunk_and_read_by_the_openai_client(client):
    from openai import OpenAI

    url = data_url(jpeg(), "image/jpeg")
    body = {"messages": ask(url), "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    steps = [c["catdog"]["tool_step"] for c in chunks if "catdog" in c]
    assert len(steps) == 1 and steps[0]["result"]["label"] in ("cat", "dog")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == f"It is a {steps[0]['result']['label']}."
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == [
        "stop"
    ]
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    openai = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)
    answer = openai.chat.completions.create(model="fake-chat", messages=ask(url), temperature=0)
    assert answer.choices[0].message.content.startswith("It is a ")
    assert answer.model_extra["catdog"]["tool_steps"][0]["name"] == TOOL_NAME
    streamed = openai.chat.completions.create(model="fake-chat", messages=ask(url), temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == answer.choices[0].message.content


def test_png_and_webp_data_urls(client):
    from PIL import Image

    for fmt, media in (("PNG", "image/png"), ("WEBP", "image/webp")):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (10, 120, 200)).save(buf, fmt)
        r = post(client, ask(data_url(buf.getvalue(), media)))
        assert r.status_code == 200 and r.json()["catdog"]["tool_steps"][0]["result"]["label"] in ("cat", "dog")


def _odd_cases(tmp_path):
    cases = {name: (path.read_bytes(), fragment) for name, (path, fragment) in make_bad_inputs(tmp_path).items()}
    cases["20 MB data URL"] = (b"\xff" * (20 << 20), "the limit is 10 MiB")
    cases["text/plain part"] = (b"just some words", "not an image")
    return cases


def test_the_odd_image_corpus_gives_a_verdict_or_a_one_line_tool_error_never_a_5xx(client, tmp_path):
    for name, (data, fragment) in _odd_cases(tmp_path).items():
        r = post(client, ask(data_url(data, "text/plain" if name == "text/plain part" else "image/png")))
        assert r.status_code == 200, (name, r.status_code, r.text[:300])
        done = r.json()
        [step] = done["catdog"]["tool_steps"]
        content = done["choices"][0]["message"]["content"]
        if fragment is None:
            assert step["result"]["label"] in ("cat", "dog"), (name, step)
        else:
            error = step["result"]["error"]
            assert fragment in error and "\n" not in error, (name, error)
            assert content == f"Sorry: {error}"  # the model read it and the user sees it


def test_bad_base64_is_a_tool_error(client):
    r = post(client, ask("data:image/jpeg;base64,@@@not-base64@@@"))
    assert r.status_code == 200
    assert "not valid base64" in r.json()["catdog"]["tool_steps"][0]["result"]["error"]


@pytest.mark.parametrize(
    "url", ["https://example.com/cat.jpg", "http://127.0.0.1/cat.jpg", "ftp://x/cat.jpg", "cat.jpg", ""]
)
def test_remote_and_non_data_urls_are_refused_with_400(client, url):
    r = post(client, ask(url))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages" and "data:" in error["message"] and "\n" not in error["message"]


def test_options_the_photo_path_does_not_take_are_refused_by_name(client):
    url = data_url(jpeg())
    refused = [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": TOOL_NAME}}]}, "tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ]
    for body, param in refused:
        r = post(client, ask(url), **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_without_a_classifier_image_parts_stay_a_400(engine):
    plain = TestClient(create_api(engine, ApiLimits()))
    r = post(plain, ask(data_url(jpeg())))
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]


def test_requests_without_photos_take_the_usual_path(client):
    r = post(client, [{"role": "user", "content": "reply: hi"}])
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi"
    assert "tool_steps" not in r.json().get("catdog", {})
    r = post(client, [{"role": "user", "content": f"reply: {BREED_CALL}"}], tools=[BREED_TOOL])
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup_breed"


def test_client_tools_work_beside_the_built_in_one(client):
    messages = ask(data_url(jpeg()), "Which breed?")
    r = post(client, messages, tools=[BREED_TOOL])
    assert r.status_code == 200, r.text
    done = r.json()
    assert [s["name"] for s in done["catdog"]["tool_steps"]] == [TOOL_NAME]
    [call] = done["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup_breed" and done["choices"][0]["finish_reason"] == "tool_calls"
    # the client runs its tool and sends the result back: the model answers (no new look at the old photo)
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"breed": "Maine Coon"})},
    ]
    r = post(client, messages, tools=[BREED_TOOL])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "A Maine Coon." and r.json()["catdog"]["tool_steps"] == []


def test_the_rounds_are_capped(tool):
    """A model that calls the classifier again and again is stopped after MAX_TOOL_ROUNDS; then it must answer."""

    def looping(prompt: str) -> str:
        return CALL if "classify_image" in prompt.split("<|im_end|>", 1)[0] else "Out of looks."

    engine = ChatEngine(fake_chat_model(looping), max_batch_size=2, max_batch_tokens=1 << 16)
    try:
        client = TestClient(create_api(engine, ApiLimits(), vision=VisionChat(tool)))
        done = post(client, ask(data_url(jpeg()))).json()
        assert len(done["catdog"]["tool_steps"]) == MAX_TOOL_ROUNDS
        assert done["choices"][0]["message"]["content"] == "Out of looks."
    finally:
        engine.close()


def test_an_exported_onnx_classifier_is_the_same_tool(engine, tiny_checkpoint, tool, tmp_path):
    pytest.importorskip("onnxruntime")
    from catdog_glm.vision.export import export_classifier

    onnx = export_classifier(tiny_checkpoint, tmp_path / "model.onnx").path
    onnx_client = TestClient(create_api(engine, ApiLimits(), vision=VisionChat(ClassifierTool.load(onnx))))
    photo = jpeg((30, 160, 90))
    step = post(onnx_client, ask(data_url(photo))).json()["catdog"]["tool_steps"][0]
    [expected] = tool.predictor.predict_sources([photo], ["image_1"])
    assert step["result"]["label"] == expected.label and step["result"]["classifier"] == "model.onnx"


def test_cli_refuses_a_missing_classifier_before_loading_the_chat_model(tmp_path):
    from typer.testing import CliRunner

    from catdog_glm.cli import app

    started = time.monotonic()
    result = CliRunner().invoke(app, ["serve-chat", "--classifier", str(tmp_path / "nope.pt")])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "nope.pt" in result.output
    assert time.monotonic() - started < 30
    result = CliRunner().invoke(app, ["serve-chat", "--classifier", "x.pt", "--ui", "streamlit"])
    assert result.exit_code == 1 and "--classifier" in result.output


# ---- the page ------------------------------------------------------------------------------------------------------
@pytest.fixture
def live_page(engine, tool):
    """The real app (page + API) served by uvicorn in a thread."""
    import uvicorn

    from tests.conftest import free_port

    port = free_port()
    app = create_chat_app(engine, ApiLimits(max_body_bytes=32 << 20), vision=VisionChat(tool))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@requires_chromium
def test_page_takes_a_photo_shows_the_step_and_the_answer(live_page, tmp_path):
    from playwright.sync_api import sync_playwright

    photo = save_image(tmp_path / "kitty.jpg", size=(96, 72), color=(180, 120, 60))
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not an image")
    shots = screenshot_dir(tmp_path)
    with sync_playwright() as p:
        browser, page = open_page(p, live_page + "/")
        page.locator("#query input[type=file]").set_input_files(str(photo))
        page.locator("#query textarea").fill("Is this a cat or a dog?")
        page.wait_for_timeout(500)  # the upload lands
        page.get_by_role("button", name="Submit").click()
        page.wait_for_function(
            "() => document.querySelector('#chatbot').innerText.includes('It is a ')", timeout=60_000
        )
        text = page.inner_text("#chatbot")
        assert TOOL_NAME in text and "best.pt" in text  # the step's title: the call and its verdict
        page.screenshot(path=str(shots / "serve_chat_photo.png"), full_page=True)
        # a second turn with a file that is not an image: the tool's one-line error, and the page goes on
        page.locator("#query input[type=file]").set_input_files(str(bad))
        page.locator("#query textarea").fill("And this one?")
        page.wait_for_timeout(500)
        page.get_by_role("button", name="Submit").click()
        page.wait_for_function(
            "() => document.querySelector('#chatbot').innerText.includes('Sorry: image_2: not an image')",
            timeout=60_000,
        )
        assert "classify_image(image=image_2)" in page.inner_text("#chatbot")
        page.screenshot(path=str(shots / "serve_chat_photo_error.png"), full_page=True)
        browser.close()
    assert (shots / "serve_chat_photo.png").stat().st_size > 10_000


def test_chatglm3_protocol_the_forced_call_runs_and_its_observation_goes_back(tiny_checkpoint, tool, tmp_path):
    """The tiny random ChatGLM3: the first round is held to `classify_image(image="image_1")` in ChatGLM3's own
    call syntax, the server runs it, and the observation turn is written in ChatGLM3's protocol."""
    from catdog_glm.chat.loading import load_chat_model
    from tests.chatglm_tiny import make_tiny_chatglm3

    folder = make_tiny_chatglm3(tmp_path / "glm", "safetensors", shards=1, seq_length=2048)
    chat = load_chat_model(str(folder), dtype="fp32")
    assert chat.format.name == "chatglm3"
    engine = ChatEngine(chat, max_batch_size=2, max_batch_tokens=8192)
    try:
        glm = TestClient(create_api(engine, ApiLimits(), vision=attach_classifier(engine, tool)))
        r = post(glm, ask(data_url(jpeg())), max_tokens=8)
        assert r.status_code == 200, r.text
        [step] = r.json()["catdog"]["tool_steps"]
        assert step["arguments"] == {"image": "image_1"} and step["result"]["label"] in ("cat", "dog")
        assert r.json()["usage"]["prompt_tokens"] > 0
    finally:
        engine.close()


def test_data_urls_read_as_browsers_and_clients_write_them():
    from catdog_glm.serve.vision_tool import read_data_url, split_images

    photo = jpeg()
    b64 = base64.b64encode(photo).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME line breaks
    for url in (f"data:image/jpeg;base64,{b64}", f"DATA:image/jpeg;base64,{wrapped}", f"data:;base64,{b64}"):
        assert read_data_url(url, "image_1").data == photo
    assert "not a base64 data: URL" in read_data_url("data:image/jpeg,rawbytes", "image_1").error
    assert read_data_url("data:image/png;base64,", "image_1").error == "image_1: empty file (0 bytes)"
    messages = [
        {"role": "user", "content": [{"type": "input_image", "image_url": f"data:image/jpeg;base64,{b64}"}]},
        {"role": "assistant", "content": "A cat."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And?"}, {"type": "image_url", "image_url": {"url": ""}}],
        },
    ]
    with pytest.raises(ConfigError, match="must be a data: URL"):
        split_images(messages)
    messages[-1]["content"][1]["image_url"]["url"] = f"data:image/jpeg;base64,{b64}"
    out, images = split_images(messages)
    assert list(images) == ["image_1", "image_2"] and out[1] == messages[1]
    assert "".join(p["text"] for p in out[2]["content"]) == "And?\n[photo image_2]\n"
