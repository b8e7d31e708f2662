"""A live `catdog serve-chat` with the embedded model: openai client, the book's requests snippet, gradio_client,
validation, auth, queue overflow, disconnects, 16 concurrent clients, flat memory, and a real browser."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.conftest import open_page, requires_chromium, screenshot_dir, start_catdog

pytestmark = pytest.mark.slow
KEY = "test-key-123"
CAPITALS = {"France": "Paris", "Germany": "Berlin"}


def _start(*args):
    return start_catdog(["serve-chat", *args])


@pytest.fixture(scope="module")
def keyed():
    """A server that requires an API key, with room for 16 concurrent clients."""
    proc, url = _start("--api-key", KEY, "--queue-size", "24")
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def open_server():
    """A server without a key and with tight limits."""
    proc, url = _start("--queue-size", "2", "--max-tokens", "256", "--max-messages", "8", "--max-body", "4096")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def _question(country: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the capital of {country}?"}]


def test_openai_client_non_streaming_and_streaming(keyed):
    from openai import OpenAI

    url, _ = keyed
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    [model] = client.models.list().data
    done = client.chat.completions.create(model=model.id, messages=_question("France"), temperature=0, max_tokens=30)
    assert "Paris" in done.choices[0].message.content and done.choices[0].finish_reason == "stop"
    assert (
        done.usage.prompt_tokens > 5
        and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    )
    chunks = list(
        client.chat.completions.create(
            model=model.id,
            messages=_question("France"),
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert all(c.choices[0].finish_reason is None for c in content_chunks)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content for c in content_chunks) == done.choices[0].message.content
    short = client.chat.completions.create(model=model.id, messages=_question("France"), temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_stop_strings_across_chunks(keyed):
    from openai import OpenAI

    url, _ = keyed
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="", messages=_question("France"), temperature=0, max_tokens=30, stream=True, stop=["Paris"]
        )
        if c.choices
    )
    assert "Par" not in text and "capital" in text


def test_auth_is_required_on_the_api_only(keyed):
    url, _ = keyed
    assert httpx.get(f"{url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": _question("France")}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(f"{url}/chat", json={"query": "hi"}).status_code == 401


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "temperature": -1},
            400,
            "temperature",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
            400,
            "max_tokens",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            400,
            "temperature",
        ),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', 400, "messages"),
        ("/v1/completions", {"prompt": "hi", "suffix": "!"}, 400, "suffix"),
        ("/v1/nothing", {}, 404, None),
        ("/v1/models", {}, 405, None),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(keyed, route, body, status, param):
    url, _ = keyed
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + route, content=content, headers=_auth())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param


@pytest.mark.parametrize(
    "body", [{"query": ""}, {"query": "hi", "history": 7}, [1, 2], {"query": "hi", "max_length": 2}]
)
def test_the_book_route_keeps_its_own_error_shape(keyed, body):
    url, _ = keyed
    r = httpx.post(url + "/chat", json=body, headers=_auth())
    assert r.status_code == 400 and isinstance(r.json()["error"], str) and r.json()["error"], r.text


def test_cors_preflight_is_refused_while_cors_is_off(keyed):
    url, _ = keyed
    r = httpx.options(
        f"{url}/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-credentials" not in r.headers and "access-control-allow-origin" not in r.headers


def test_limits_on_body_and_history(open_server):
    url = open_server
    too_many = [{"role": "user", "content": "hi"}] * 9
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": too_many})
    assert r.status_code == 400 and "too many messages" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/chat", json={"query": "x" * 5000})
    assert r.status_code == 413


def test_the_books_requests_snippet_works_unchanged(open_server):
    import requests

    # the book posts `data=json.dumps(...)`: a JSON body without a Content-Type header
    response = requests.post(
        f"{open_server}/chat",
        data=json.dumps({"query": "What is the capital of France?", "history": "", "temperature": 0}),
        timeout=120,
    )
    answer = response.json()
    assert response.status_code == 200 and "Paris" in answer["response"]
    assert answer["history"][-1] == {"role": "assistant", "content": answer["response"]}
    follow = requests.post(
        f"{open_server}/chat",
        data=json.dumps({"query": "And of Germany?", "history": answer["history"], "temperature": 0}),
        timeout=120,
    ).json()
    assert "Berlin" in follow["response"] and len(follow["history"]) == 4


def test_gradio_client_against_the_page(open_server):
    from gradio_client import Client

    client = Client(open_server + "/", verbose=False)
    query, history = client.predict("What is the capital of France?", [], "", 512, 0.8, 0, api_name="/chat")
    assert query == "" and "Paris" in str(history[-1]["content"])


def test_queue_overflow_gets_503_with_retry_after(open_server):
    url = open_server
    statuses: list[int] = []
    headers: list[str | None] = []

    def ask():
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": _question("France"), "max_tokens": 200, "temperature": 1, "seed": 1},
            timeout=300,
        )
        statuses.append(r.status_code)
        headers.append(r.headers.get("retry-after"))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1
    assert all(h == "5" for s, h in zip(statuses, headers, strict=True) if s == 503)


def test_a_client_that_disconnects_stops_its_generation(keyed):
    url, _ = keyed
    body = {
        "messages": [{"role": "user", "content": "Write a very long story about a cat."}],
        "stream": True,
        "max_tokens": 2000,
        "temperature": 0.8,
        "seed": 3,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i > 6:
                break  # leave mid-stream
    deadline = time.monotonic() + 20  # 2000 tokens would take far longer than this
    while httpx.get(f"{url}/health").json()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{url}/health").json()["active_requests"] == 0


def test_sixteen_concurrent_clients_each_get_their_own_answer(keyed):
    from gradio_client import Client

    url, _ = keyed
    results: dict[int, tuple[str, str]] = {}
    errors: list[str] = []

    def api_client(i: int, stream: bool):
        country = list(CAPITALS)[i % 2]
        body = {"messages": _question(country), "temperature": 0, "max_tokens": 24, "stream": stream}
        try:
            if stream:
                text = ""
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=_auth(), timeout=600) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            delta = json.loads(line[6:])["choices"]
                            text += (delta[0]["delta"].get("content") or "") if delta else ""
            else:
                r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=_auth(), timeout=600)
                r.raise_for_status()
                text = r.json()["choices"][0]["message"]["content"]
            results[i] = (country, text)
        except Exception as e:  # collected and asserted below
            errors.append(repr(e))

    def page_client(i: int):
        country = list(CAPITALS)[i % 2]
        try:
            client = Client(url + "/", verbose=False, auth=("catdog", KEY))
            _, history = client.predict(f"What is the capital of {country}?", [], "", 512, 0.8, 0, api_name="/chat")
            results[i] = (country, str(history[-1]["content"]))
        except Exception as e:
            errors.append(repr(e))

    threads = [
        threading.Thread(target=page_client if i >= 14 else api_client, args=(i,) if i >= 14 else (i, i % 2 == 0))
        for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and len(results) == 16
    for country, text in results.values():
        other = [c for k, c in CAPITALS.items() if k != country]
        assert CAPITALS[country] in text and not any(o in text for o in other), (country, text)


def test_memory_stays_flat_over_200_requests(keyed):
    import psutil

    url, proc = keyed
    process = psutil.Process(proc.pid)
    body = {"messages": _question("France"), "temperature": 0, "max_tokens": 2}

    def burst(n):
        with httpx.Client(headers=_auth(), timeout=60) as client:
            for _ in range(n):
                assert client.post(f"{url}/v1/chat/completions", json=body).status_code == 200

    burst(40)  # warm-up: allocator pools, caches
    before = process.memory_info().rss
    burst(200)
    growth = (process.memory_info().rss - before) / 2**20
    assert growth < 40, f"resident memory grew by {growth:.0f} MiB over 200 requests"


@requires_chromium
def test_real_browser_streams_stops_and_clears(open_server, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = screenshot_dir(tmp_path)
    with sync_playwright() as p:
        browser, page = open_page(p, open_server + "/")
        assert "SmolLM2" in page.inner_text("#model-info")
        page.locator("#query textarea").fill("What is the capital of France?")
        page.get_by_role("button", name="Submit").click()
        # the page samples (temperature 0.6): wait for any streamed answer after the question
        page.wait_for_function(
            "() => { const t = document.querySelector('#chatbot').innerText;"
            " return t.includes('capital of France?') && t.split('capital of France?')[1].trim().length > 3; }",
            timeout=120_000,
        )
        page.screenshot(path=str(shots / "serve_chat.png"), full_page=True)
        page.locator("#query textarea").fill("Write a very long story about a brave cat.")
        page.get_by_role("button", name="Submit").click()
        page.wait_for_timeout(1500)
        page.get_by_role("button", name="Stop").click()
        page.wait_for_timeout(500)
        stopped = page.inner_text("#chatbot")
        page.wait_for_timeout(1500)
        assert page.inner_text("#chatbot") == stopped  # nothing more arrives after Stop
        page.get_by_role("button", name="Clear History").click()
        page.wait_for_timeout(500)
        assert "capital of France" not in page.inner_text("#chatbot")
        browser.close()
    assert (shots / "serve_chat.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def fp32_server():
    """The API over an fp32 engine, served by uvicorn on a thread of this process (so the test can compare each
    HTTP reply with the same engine's solo run)."""
    import uvicorn

    from catdog_glm.chat.engine import ChatEngine
    from catdog_glm.chat.loading import load_chat_model
    from catdog_glm.serve.openai.api_router import ApiLimits, create_api
    from tests.conftest import free_port

    engine = ChatEngine(load_chat_model(None, dtype="fp32"), max_batch_size=16)
    port = free_port()
    config = uvicorn.Config(create_api(engine, ApiLimits(max_waiting=32)), host="127.0.0.1", port=port)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    yield engine, url
    server.should_exit = True
    thread.join(30)
    engine.close()


def test_sixteen_concurrent_fp32_clients_get_exactly_their_solo_replies(fp32_server):
    engine, url = fp32_server
    questions = [
        "What is the capital of France?",
        "Name three colours.",
        "How many legs does a spider have?",
        "Write a haiku about the sea.",
    ]
    solo = {q: engine.chat([{"role": "user", "content": q}], temperature=0, max_new_tokens=20) for q in questions}
    peak_before = engine.load()["peak_batch"]
    results: dict[int, tuple[str, str, dict | None]] = {}
    errors: list[str] = []
    start = threading.Barrier(16)

    def client(i: int):
        q = questions[i % len(questions)]
        body = {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 20}
        try:
            start.wait(30)
            if i % 2:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                text, usage = "", None
                with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            usage = chunk.get("usage") or usage
                            text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
            else:
                r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
                r.raise_for_status()
                text, usage = r.json()["choices"][0]["message"]["content"], r.json()["usage"]
            results[i] = (q, text, usage)
        except Exception as e:  # collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and len(results) == 16
    assert peak_before == 1 and engine.load()["peak_batch"] >= 8  # served together, not one after another
    for q, text, usage in results.values():
        assert text == solo[q].text, (q, text, solo[q].text)
        assert usage["completion_tokens"] == solo[q].completion_tokens
        assert usage["prompt_tokens"] == solo[q].prompt_tokens


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_openai_client_tool_call_round_trip(keyed):
    from openai import OpenAI

    url, _ = keyed
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    done = client.chat.completions.create(
        model="",
        messages=question,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=40,
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    answer = client.chat.completions.create(
        model="",
        messages=[
            *question,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees C"},
        ],
        tools=[WEATHER_TOOL],
        temperature=0,
        max_tokens=20,
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    streamed = client.chat.completions.create(
        model="",
        messages=question,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=40,
        stream=True,
    )
    calls = [d for c in streamed if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert "city" in json.loads("".join(c.function.arguments or "" for c in calls))


def test_openai_client_json_schema_and_logprobs(keyed):
    from openai import OpenAI

    url, _ = keyed
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string"}, "population_millions": {"type": "number"}},
        "required": ["capital", "population_millions"],
        "additionalProperties": False,
    }
    done = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "Give the capital of France and its population as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        temperature=0,
        max_tokens=40,
    )
    reply = json.loads(done.choices[0].message.content)
    try:
        import jsonschema
    except ImportError:  # checked by hand
        assert set(reply) == {"capital", "population_millions"} and isinstance(reply["capital"], str)
    else:
        jsonschema.validate(reply, schema)
    done = client.chat.completions.create(
        model="", messages=_question("France"), temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    tokens = done.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in tokens).decode() == done.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in tokens)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in tokens)
    text = client.completions.create(
        model="", prompt="The capital of France is", max_tokens=4, temperature=0, echo=True
    )
    assert text.choices[0].text.startswith("The capital of France is") and text.usage.completion_tokens == 4
