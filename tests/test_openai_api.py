"""The OpenAI-compatible API in process over the scripted fake model (tests/fake_chat.py): the validation matrix,
error shapes (404/405/413, SSE error events), disconnects, tools, JSON mode, logprobs, penalties, n, prefill,
/v1/completions, /v1/models/{id}, /docs offline in a browser, and a property test: no body makes it answer 5xx."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from catdog_glm.chat.engine import ChatEngine
from catdog_glm.serve.chat_api import ApiLimits, create_api
from tests.conftest import open_page, requires_chromium, screenshot_dir
from tests.fake_chat import default_script, fake_chat_model

CAP = 256  # the server's --max-tokens in these tests


@pytest.fixture(scope="module")
def engine():
    engine = ChatEngine(fake_chat_model(), max_batch_size=8, max_batch_tokens=1 << 16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    return TestClient(create_api(engine, ApiLimits(max_tokens=CAP, max_messages=8)))


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat(client, text="reply: hi", **body):
    return client.post("/v1/chat/completions", json={"messages": user(text), "temperature": 0} | body)


def events(client, route: str, body: dict) -> list:
    """The `data:` events of a stream, parsed ([DONE] kept as the string)."""
    with client.stream("POST", route, json=body) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def assert_openai_error(r, status: int, param: str | None = None):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ---- validation ----------------------------------------------------------------------------------------------------
HI = [{"role": "user", "content": "hi"}]
BAD_CHAT = [
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 99999999999999999999999}', "seed"),
    (b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}', "stop"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}, *HI]}, "messages"),
    ({"messages": HI, "temperature": 3}, "temperature"),
    ({"messages": HI, "temperature": -1}, "temperature"),
    ({"messages": HI, "temperature": "0.5"}, "temperature"),
    ({"messages": HI, "top_p": 0}, "top_p"),
    ({"messages": HI, "frequency_penalty": 3}, "frequency_penalty"),
    ({"messages": HI, "presence_penalty": -2.5}, "presence_penalty"),
    ({"messages": HI, "logit_bias": {"a": 1}}, "logit_bias"),
    ({"messages": HI, "logit_bias": {"5": 101}}, "logit_bias"),
    ({"messages": HI, "logit_bias": {"²": 1}}, "logit_bias"),  # a digit to str.isdigit(), not to int()
    ({"messages": HI, "logit_bias": {"999999": 1}}, None),  # outside the vocabulary: the engine says so
    ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": HI, "n": 0}, "n"),
    ({"messages": HI, "n": 9}, "n"),
    ({"messages": HI, "n": True}, "n"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HI, "stop": ""}, "stop"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "max_tokens": CAP + 1}, "max_tokens"),
    ({"messages": HI, "max_completion_tokens": CAP + 1}, "max_completion_tokens"),
    ({"messages": HI, "max_tokens": 2.5}, "max_tokens"),
    ({"messages": HI, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"messages": HI, "modalities": ["text", "audio"]}, "modalities"),
    ({"messages": HI, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": HI, "web_search_options": {}}, None),  # empty: nothing asked, nothing refused
    ({"messages": HI, "web_search_options": {"search_context_size": "low"}}, "web_search_options"),
    ({"messages": HI, "tool_choice": "required"}, "tool_choice"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"messages": HI, "tools": [{"type": "code"}]}, "tools"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools"),
    ({"messages": HI, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": HI, "response_format": {"type": "xml"}}, "response_format"),
    ({"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}}, None),
    ({"messages": HI, "stream": "yes"}, "stream"),
    ({"messages": HI, "stream_options": {"include_usage": True}}, "stream_options"),  # without stream, as vLLM
    ({"messages": HI, "model": "gpt-4"}, "model"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_bad_chat_requests_get_one_line_openai_errors(client, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/chat/completions", content=content)
    if body == {"messages": HI, "web_search_options": {}}:
        assert r.status_code == 200
        return
    status = 404 if param == "model" else 400
    error = assert_openai_error(r, status, param)
    assert error["type"] == "invalid_request_error"


def test_errors_name_what_is_wrong(client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\ud800 hi"}]}')
    assert "lone surrogate" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert "at least one message" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": HI, "n": 1.5})
    assert "integer" in r.json()["error"]["message"] and "a an" not in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": HI, "logit_bias": {"999999": 1}})
    assert "999999" in r.json()["error"]["message"]


def test_deep_or_huge_json_is_400_not_500(client):
    deep = b'{"messages": [{"role": "user", "content": "hi", "tool_calls": ' + b"[" * 900 + b"1" + b"]" * 900 + b"}]}"
    assert_openai_error(client.post("/v1/chat/completions", content=deep), 400, "messages")
    deeper = b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b', "messages": []}'
    assert "JSON" in assert_openai_error(client.post("/v1/chat/completions", content=deeper), 400)["message"]
    huge = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}"
    assert_openai_error(client.post("/v1/chat/completions", content=huge), 400)
    bias = {"messages": HI, "logit_bias": {"9" * 5000: 1}}
    assert_openai_error(client.post("/v1/chat/completions", json=bias), 400, "logit_bias")


def test_unknown_and_ignored_fields_are_accepted(client):
    r = chat(client, user="me", store=True, metadata={"a": "b"}, service_tier="auto", some_extension=1)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi"


def test_a_message_longer_than_the_window_is_400_streamed_or_not():
    small = ChatEngine(fake_chat_model(context_window=64), max_batch_size=2, max_batch_tokens=4096)
    try:
        client = TestClient(create_api(small, ApiLimits(max_tokens=8)))
        body = {"messages": user("x" * 500), "max_tokens": 4}
        assert "context" in assert_openai_error(client.post("/v1/chat/completions", json=body), 400)["message"]
        r = client.post("/v1/chat/completions", json=body | {"stream": True})
        assert_openai_error(r, 400)
        r = client.post("/v1/completions", json={"prompt": "x" * 500, "max_tokens": 4})
        assert_openai_error(r, 400)
        assert client.get("/health").json()["active_requests"] == 0
    finally:
        small.close()


# ---- error shapes --------------------------------------------------------------------------------------------------
def test_404_405_413_in_openai_shape_and_the_book_route_in_its_own(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    r = client.post("/v1/models")
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "GET"
    assert_openai_error(client.delete("/v1/chat/completions"), 405)
    big = TestClient(create_api(client.app.state.engine, ApiLimits(max_body_bytes=1000)))
    assert_openai_error(big.post("/v1/chat/completions", json={"messages": user("x" * 2000)}), 413)
    r = big.post("/chat", json={"query": "x" * 2000})
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
    for r in (client.get("/chat"), client.post("/chat", json={"query": ""}), client.post("/chat", json=[1])):
        assert 400 <= r.status_code < 500 and isinstance(r.json()["error"], str) and r.json()["error"]
    r = client.post("/chat", content=b'{"query": "\\ud800 hi"}')
    assert r.status_code == 400 and "surrogate" in r.json()["error"]
    keyed = TestClient(create_api(client.app.state.engine, ApiLimits(api_key="k")))
    assert_openai_error(keyed.post("/v1/chat/completions", json={"messages": HI}), 401)
    assert keyed.post("/chat", json={"query": "hi"}).json() == {
        "error": "missing or wrong API key: send 'Authorization: Bearer KEY'"
    }


@pytest.mark.parametrize(
    "extra",
    [
        {"tool_calls": 5},
        {"tool_calls": "abc"},
        {"tool_calls": [5]},
        {"tool_calls": [{"function": 5}]},
        {"tool_calls": {"a": 1}},
        {"tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
        {"name": 5},
    ],
)
def test_book_chat_history_with_malformed_tool_keys_is_400(client, extra):
    """/chat passes history dicts through to the prompt builders: malformed tool keys made them raise (a 500)."""
    body = {"query": "hi", "history": [{"role": "assistant", "content": "x", **extra}]}
    r = client.post("/chat", json=body)
    assert r.status_code == 400 and "message 0" in r.json()["error"], r.text


def test_book_chat_max_length_below_the_prompt_is_400(client):
    r = client.post("/chat", json={"query": "hello there", "max_length": 3})
    assert r.status_code == 400 and "max_length" in r.json()["error"]
    ok = client.post("/chat", content=b'{"query": "reply: fine", "history": "", "temperature": 0}')
    assert ok.status_code == 200 and ok.json()["response"] == "fine"


def test_models_and_model_by_id(client):
    [card] = client.get("/v1/models").json()["data"]
    assert client.get(f"/v1/models/{card['id']}").json() == card
    assert_openai_error(client.get("/v1/models/gpt-4o"), 404, "model")


def test_cors_preflight_without_cors_grants_nothing(engine):
    from catdog_glm.serve.chat_server import create_chat_app

    client = TestClient(create_chat_app(engine, ApiLimits()))  # the page mounted at / as serve-chat does
    r = client.options(
        "/v1/chat/completions", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-credentials" not in r.headers
    assert_openai_error(client.get("/v1/nothing"), 404)  # not the page's 404


# ---- generation ----------------------------------------------------------------------------------------------------
def test_chat_completion_and_stream_have_openai_shapes(client):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    done = ChatCompletion.model_validate(chat(client, "reply: Grüß dich, 世界!").json())
    assert done.choices[0].message.content == "Grüß dich, 世界!" and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == len("Grüß dich, 世界!".encode())
    body = {"messages": user("reply: Grüß dich, 世界!"), "temperature": 0, "stream": True}
    got = events(client, "/v1/chat/completions", body | {"stream_options": {"include_usage": True}})
    assert got[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in got[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Grüß dich, 世界!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_a_failure_mid_stream_is_an_error_event_then_done():
    def script(prompt: str) -> str:
        if "boom" in prompt:
            raise RuntimeError("the model broke")
        return default_script(prompt)

    broken = ChatEngine(fake_chat_model(script), max_batch_size=2, max_batch_tokens=4096)
    try:
        client = TestClient(create_api(broken, ApiLimits(max_tokens=8)))
        got = events(client, "/v1/chat/completions", {"messages": user("boom"), "stream": True})
        assert got[-1] == "[DONE]" and "error" in got[-2]
        assert set(got[-2]["error"]) == {"message", "type", "param", "code"}
        assert "broke" in got[-2]["error"]["message"]
        got = events(client, "/v1/completions", {"prompt": "boom", "stream": True})
        assert got[-1] == "[DONE]" and "error" in got[-2]
        assert client.get("/health").json()["active_requests"] == 0
    finally:
        broken.close()


def test_a_client_that_leaves_a_non_streaming_request_stops_its_generation():
    model = fake_chat_model(lambda _prompt: "a" * 5000)
    forward = model.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.004)
        return forward(*args, **kwargs)

    model.model.forward = slow_forward
    slow = ChatEngine(model, max_batch_size=2, max_batch_tokens=1 << 16)
    app = create_api(slow, ApiLimits(max_tokens=4000))
    payload = json.dumps({"messages": user("go"), "max_tokens": 4000}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }

    async def run():
        left = asyncio.Event()
        first = True

        async def receive():
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": payload, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(_message):
            pass

        task = asyncio.ensure_future(app(scope, receive, send))
        while model.model.calls < 20:
            await asyncio.sleep(0.01)
        left.set()
        await asyncio.wait_for(task, 10)

    try:
        asyncio.run(run())
        calls = model.model.calls
        time.sleep(0.3)
        assert model.model.calls - calls <= 2  # stopped within a step, far from its 4000 tokens
        assert calls < 1000 and app.state.service.active == 0
    finally:
        slow.close()


def test_n_choices_with_seeds(client):
    r = chat(client, "reply: same", n=3, seed=7, temperature=0).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert r["usage"]["completion_tokens"] == sum(len(c["message"]["content"].encode()) for c in r["choices"])
    text = "reply: a reply long enough for sampling to wander off the script"
    r = chat(client, text, n=3, seed=7, temperature=2.0).json()
    contents = [c["message"]["content"] for c in r["choices"]]
    assert len(set(contents)) > 1  # seeds 7, 8, 9: the choices differ...
    again = chat(client, text, n=3, seed=7, temperature=2.0).json()
    assert [c["message"]["content"] for c in again["choices"]] == contents  # ...and replay exactly
    got = events(
        client, "/v1/chat/completions", {"messages": user("reply: ab"), "n": 2, "temperature": 0, "stream": True}
    )
    texts = {0: "", 1: ""}
    for e in got[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    assert texts == {0: "ab", 1: "ab"}


def test_prefill_continues_the_last_assistant_message():
    target = "The capital of France is Paris."

    def script(prompt: str) -> str:
        tail = prompt.rsplit("<|im_start|>assistant\n", 1)[-1]
        return target[len(tail) :] if target.startswith(tail) else target

    prefill = ChatEngine(fake_chat_model(script), max_batch_size=2, max_batch_tokens=4096)
    try:
        client = TestClient(create_api(prefill, ApiLimits(max_tokens=64)))
        messages = [*user("capital of France?"), {"role": "assistant", "content": "The capital"}]
        r = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0})
        assert r.json()["choices"][0]["message"]["content"] == " of France is Paris."
        r = client.post("/v1/chat/completions", json={"messages": messages[:1], "temperature": 0})
        assert r.json()["choices"][0]["message"]["content"] == target
    finally:
        prefill.close()


def test_penalties_and_logit_bias_change_the_reply(client):
    assert chat(client, "reply: aaaaaa").json()["choices"][0]["message"]["content"] == "aaaaaa"
    # the fake puts 10 on the scripted byte and 5 on "x": after three "a"s a frequency penalty of 2 makes "x" win
    penalized = chat(client, "reply: aaaaaa", frequency_penalty=2).json()["choices"][0]["message"]["content"]
    assert penalized.startswith("aaax")
    assert chat(client, "reply: aaaaaa", presence_penalty=2).json()["choices"][0]["message"]["content"] == "aaaaaa"
    biased = chat(client, "reply: hello", logit_bias={str(ord("b")): 100}, max_tokens=5).json()["choices"][0]
    assert biased["message"]["content"] == "bbbbb" and biased["finish_reason"] == "length"


def test_logprobs_non_streaming_and_streaming(client):
    import math

    r = chat(client, "reply: héllo", logprobs=True, top_logprobs=2).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert b"".join(bytes(t["bytes"]) for t in content).decode() == "héllo"
    expected = 10 - math.log(math.exp(10) + math.exp(5) + 257)  # the fake's logits: 10, 5 and 257 zeros
    for t in content:
        assert t["logprob"] == pytest.approx(expected, abs=1e-4)
        assert len(t["top_logprobs"]) == 2 and t["top_logprobs"][0]["logprob"] == pytest.approx(t["logprob"])
        assert t["top_logprobs"][1]["token"] in ("x", "y")
    assert chat(client, "reply: hi").json()["choices"][0]["logprobs"] is None
    body = {"messages": user("reply: héllo"), "temperature": 0, "logprobs": True, "top_logprobs": 1, "stream": True}
    streamed = [
        t
        for e in events(client, "/v1/chat/completions", body)[:-1]
        for c in e["choices"]
        for t in (c["logprobs"] or {}).get("content") or []
    ]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]


# ---- tools, JSON mode -----------------------------------------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = 'reply: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_calls_come_back_and_the_result_is_answered(client):
    from openai.types.chat import ChatCompletion

    r = ChatCompletion.model_validate(chat(client, CALL, tools=[WEATHER]).json())
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    follow = [
        *user(CALL),
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    r = client.post("/v1/chat/completions", json={"messages": follow, "tools": [WEATHER], "temperature": 0})
    assert r.status_code == 200 and "sunny, 21 C" in r.json()["choices"][0]["message"]["content"]
    # tool_choice none: the tools are not in the prompt and the reply is plain text
    r = chat(client, "what tools?", tools=[WEATHER], tool_choice="none").json()
    assert "get_weather" not in r["choices"][0]["message"]["content"]


def test_tool_calls_stream_as_openai_streams_them(client):
    body = {"messages": user(CALL), "tools": [WEATHER], "temperature": 0, "stream": True}
    got = events(client, "/v1/chat/completions", body)
    deltas = [c["delta"] for e in got[:-1] for c in e["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    first = calls[0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    assert all("id" not in c and "name" not in c["function"] for c in calls[1:])
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert [c["finish_reason"] for e in got[:-1] for c in e["choices"] if c["finish_reason"]] == ["tool_calls"]
    assert not "".join(d.get("content") or "" for d in deltas)


def test_tool_choice_required_is_enforced(client):
    # the script answers in plain text; the constraint makes it a call anyway (of a function without parameters:
    # the fake model, made to write a string it does not want, would fill it with "x" up to the token limit)
    clock = {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "additionalProperties": False}},
    }
    r = chat(client, "reply: no tools today", tools=[clock], tool_choice="required", max_tokens=CAP).json()
    calls = r["choices"][0]["message"].get("tool_calls")
    assert calls and calls[0]["function"]["name"] == "get_time", r
    assert r["choices"][0]["finish_reason"] == "tool_calls"
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(client, CALL, tools=[WEATHER], tool_choice=named).json()
    assert r["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        (  # no tool_call_id at all
            [
                *user("hi"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "call_1", "function": {"name": "get_weather", "arguments": "{}"}}],
                },
                {"role": "tool", "content": "sunny"},
            ],
            "needs 'tool_call_id'",
        ),
        ([*user("hi"), {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], "must follow an assistant"),
        (
            [
                *user("hi"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "call_1", "function": {"name": "get_weather", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "call_9", "content": "x"},
            ],
            "'call_9' names no call",
        ),
    ],
    ids=["no-id", "no-call-before", "unknown-id"],
)
def test_a_tool_message_must_answer_a_call_before_it(client, messages, says):
    r = client.post("/v1/chat/completions", json={"messages": messages, "tools": [WEATHER], "temperature": 0})
    assert says in assert_openai_error(r, 400, "messages")["message"]


def test_a_tool_call_cut_by_max_tokens_is_a_length_finish_and_no_call(client):
    # 40 tokens cut it before its arguments, 60 inside them ('{"city": "Pa': it came back as a "tool_calls" finish)
    for limit in (40, 60):
        body = {"messages": user(CALL), "tools": [WEATHER], "temperature": 0, "max_tokens": limit}
        r = client.post("/v1/chat/completions", json=body).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "length" and not choice["message"].get("tool_calls"), choice
        assert not choice["message"]["content"]  # the half call is not shown as text either
        got = events(client, "/v1/chat/completions", body | {"stream": True})
        assert [c["finish_reason"] for e in got[:-1] for c in e["choices"] if c["finish_reason"]] == ["length"]
    # the whole call within the limit is a call, as before
    whole = client.post("/v1/chat/completions", json=body | {"max_tokens": CAP}).json()["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and len(whole["message"]["tool_calls"]) == 1


def test_required_parallel_calls_end_once_the_model_wants_no_more(client):
    # the model writes one call and then wants to talk: the grammar may end after the call, so the reply ends there
    # (it used to force call after call until max_tokens, the last one cut in half)
    text = CALL + "\nThat is all I need."
    r = chat(client, text, tools=[WEATHER], tool_choice="required", max_tokens=CAP).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert r["usage"]["completion_tokens"] <= len(CALL) - len("reply: ") + 1  # the call and its newline
    two = CALL + "\n" + CALL.removeprefix("reply: ").replace("Paris", "Rome") + "\nDone."
    r = chat(client, two, tools=[WEATHER], tool_choice="required", max_tokens=CAP).json()
    calls = r["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert r["choices"][0]["finish_reason"] == "tool_calls"


def test_response_format_json_schema_and_json_object(client):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    r = chat(client, 'reply: {"a": 1}', response_format=fmt).json()
    assert json.loads(r["choices"][0]["message"]["content"]) == {"a": 1}
    r = chat(client, "reply: not json at all", response_format={"type": "json_object"}, max_tokens=CAP).json()
    assert r["choices"][0]["message"]["content"].lstrip().startswith("{")


def _ref_chain(links: int, nest: int = 1) -> dict:
    """A schema whose $defs form a chain `links` long, each link `nest` objects deep (100-odd KB at most)."""

    def link(i: int) -> dict:
        node = {"$ref": f"#/$defs/d{i + 1}"}
        for _ in range(nest):
            node = {"type": "object", "properties": {"x": node}, "required": ["x"]}
        return node

    return {
        "$defs": {f"d{i}": link(i) for i in range(links)} | {f"d{links}": {"type": "integer"}},
        "$ref": "#/$defs/d0",
    }


def test_schemas_nested_too_deep_through_refs_are_400_not_a_crash(client):
    """llguidance compiles $refs recursively: a chain of them overflowed its stack and killed the server (segfault)."""
    for schema in (_ref_chain(5000), _ref_chain(1000), _ref_chain(40, 50)):
        fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}
        error = assert_openai_error(chat(client, response_format=fmt), 400)
        assert "levels deep" in error["message"]
        tool = {"type": "function", "function": {"name": "deep", "parameters": {"type": "object", **schema}}}
        error = assert_openai_error(chat(client, tools=[tool]), 400, "tools")
        assert "levels deep" in error["message"]
    # a $ref loop that never reaches a type matches nothing: 400, not an empty reply that cannot validate
    loop = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    fmt = {"type": "json_schema", "json_schema": {"name": "loop", "schema": loop}}
    assert "can match nothing" in assert_openai_error(chat(client, response_format=fmt), 400)["message"]
    # a $ref through a list index that only str.isdigit() reads as a number
    odd = {"type": "object", "properties": {"a": {"$ref": "#/anyOf/²"}}, "anyOf": [{"type": "object"}]}
    fmt = {"type": "json_schema", "json_schema": {"name": "odd", "schema": odd}}
    assert chat(client, response_format=fmt).status_code == 400
    # a recursive schema (a list of nodes) and a short chain are fine
    node = {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#"}}, "required": ["v"]}
    for schema in (node, _ref_chain(50)):
        fmt = {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}
        assert chat(client, 'reply: {"v": 1}', response_format=fmt, max_tokens=8).status_code == 200


def test_a_model_without_a_tool_format_refuses_tools(engine, monkeypatch):
    from catdog_glm.chat.formats import TemplateFormat

    monkeypatch.setattr(engine.model, "format", TemplateFormat(engine.model.tokenizer))
    client = TestClient(create_api(engine, ApiLimits()))
    error = assert_openai_error(chat(client, tools=[WEATHER]), 400, "tools")
    assert "tool" in error["message"]


# ---- legacy completions --------------------------------------------------------------------------------------------
def test_completions(client):
    from openai.types import Completion

    r = Completion.model_validate(
        client.post("/v1/completions", json={"prompt": "reply: abc", "temperature": 0}).json()
    )
    assert r.choices[0].text == "abc" and r.choices[0].finish_reason == "stop"
    r = client.post("/v1/completions", json={"prompt": ["reply: a", "reply: b"], "temperature": 0, "n": 2}).json()
    assert [c["text"] for c in r["choices"]] == ["a", "a", "b", "b"] and [c["index"] for c in r["choices"]] == [
        0,
        1,
        2,
        3,
    ]
    r = client.post("/v1/completions", json={"prompt": "reply: abc", "echo": True, "temperature": 0}).json()
    assert r["choices"][0]["text"] == "reply: abcabc"
    r = client.post("/v1/completions", json={"prompt": "reply: abc", "logprobs": 2, "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"] and lp["text_offset"] == [0, 1, 2] and len(lp["top_logprobs"][0]) == 2
    # part of a UTF-8 character is named by its bytes, as OpenAI does: "\ufffd" for each would collide as a key
    r = client.post("/v1/completions", json={"prompt": "reply: 世", "logprobs": 2, "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == "世" and lp["tokens"] == ["bytes:\\xe4", "bytes:\\xb8", "bytes:\\x96"]
    assert all(len(top) == 2 for top in lp["top_logprobs"])
    # text_offset counts characters of the text: the three byte tokens of one character before "x" share offset 0
    r = client.post("/v1/completions", json={"prompt": "reply: 世x", "logprobs": 1, "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == "世x" and lp["text_offset"] == [0, 0, 0, 1]
    got = events(client, "/v1/completions", {"prompt": "reply: abc", "temperature": 0, "stream": True})
    assert got[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in got[:-1]) == "abc"
    assert_openai_error(client.post("/v1/completions", json={"prompt": "x", "suffix": "y"}), 400, "suffix")
    assert_openai_error(client.post("/v1/completions", json={"prompt": []}), 400, "prompt")
    assert_openai_error(client.post("/v1/completions", json={"prompt": "x", "best_of": 3}), 400, "best_of")


# ---- /docs offline -------------------------------------------------------------------------------------------------
def test_openapi_has_the_request_and_response_schemas(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for name in ("ChatCompletionRequest", "ChatCompletionResponse", "CompletionRequest", "BookChatRequest"):
        assert name in schemas
    assert "temperature" in schemas["ChatCompletionRequest"]["properties"] and "HTTPValidationError" not in schemas
    page = client.get("/docs").text
    assert "cdn" not in page and "/docs-assets/swagger-ui-bundle.js" in page
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


@requires_chromium
def test_docs_render_offline_in_a_browser(engine, tmp_path):
    import uvicorn
    from playwright.sync_api import sync_playwright

    from tests.conftest import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_api(engine, ApiLimits()), host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    shots = screenshot_dir(tmp_path)
    blocked: list[str] = []
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, "about:blank")

            def only_local(route):
                if route.request.url.startswith(f"http://127.0.0.1:{port}/"):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", only_local)
            page.goto(f"http://127.0.0.1:{port}/docs", wait_until="networkidle")
            page.get_by_text("/v1/chat/completions", exact=True).first.wait_for(timeout=20_000)
            page.get_by_text("ChatCompletionRequest", exact=True).first.click(timeout=20_000)
            page.get_by_text("frequency_penalty", exact=True).first.wait_for(timeout=20_000)
            page.screenshot(path=str(shots / "serve_chat_docs.png"), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    assert not blocked, blocked
    assert (shots / "serve_chat_docs.png").stat().st_size > 10_000


# ---- property test -------------------------------------------------------------------------------------------------
def test_no_request_body_makes_the_server_answer_5xx(engine):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = TestClient(create_api(engine, ApiLimits(max_tokens=8, max_messages=8)), raise_server_exceptions=False)
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    anything = st.recursive(
        scalars,
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
        max_leaves=8,
    )
    roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "observation", "bad"])
    text = st.text(max_size=20) | st.just("\ud800") | st.just('reply: {"a": 1}') | st.just(CALL)
    message = st.fixed_dictionaries(
        {"role": roles},
        optional={"content": text | anything, "tool_call_id": text, "name": text, "tool_calls": anything},
    )
    wild = {  # any JSON value where a parameter goes
        "model": st.none() | st.just("fake-chat") | text,
        "temperature": scalars,
        "top_p": scalars,
        "max_tokens": st.integers(-2, 10) | scalars,
        "n": st.integers(-1, 3) | scalars,
        "stop": anything | st.lists(text, max_size=5),
        "seed": st.integers() | scalars,
        "stream": scalars,
        "frequency_penalty": scalars,
        "presence_penalty": scalars,
        "logit_bias": st.dictionaries(st.sampled_from(["1", "97", "-1", "x", "99999"]), scalars, max_size=2),
        "stream_options": anything,
    }
    sane = {  # values a client may well send (in range or near it), so many requests generate
        "model": st.just("fake-chat"),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "max_tokens": st.integers(1, 8),
        "n": st.integers(1, 3),
        "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
        "seed": st.integers(-(2**63), 2**64 - 1),
        "stream": st.booleans(),
        "frequency_penalty": st.floats(-2, 2),
        "presence_penalty": st.floats(-2, 2),
        "logit_bias": st.dictionaries(st.sampled_from(["1", "97", "120"]), st.floats(-100, 100), max_size=2),
        "stream_options": st.just({"include_usage": True}),
    }
    sane_message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(min_size=1, max_size=20)}
    )
    chat_wild = {
        "logprobs": scalars,
        "top_logprobs": st.integers(-1, 22) | scalars,
        "tools": st.just([WEATHER]) | anything,
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | anything,
        "response_format": anything,
        "max_completion_tokens": st.integers(-1, 10) | scalars,
    }
    chat_sane = {
        "logprobs": st.just(True),
        "top_logprobs": st.integers(0, 20),
        "tools": st.just([WEATHER]),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]),
    }
    chat_body = st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=3) | anything}, optional=wild | chat_wild
    ) | st.fixed_dictionaries({"messages": st.lists(sane_message, min_size=1, max_size=3)}, optional=sane | chat_sane)
    completion_body = st.fixed_dictionaries(
        {"prompt": text | st.lists(text, max_size=3) | anything},
        optional=wild | {"echo": scalars, "logprobs": st.integers(-1, 6) | scalars, "suffix": text},
    ) | st.fixed_dictionaries(
        {
            "prompt": st.text(min_size=1, max_size=20)
            | st.lists(st.text(min_size=1, max_size=9), min_size=1, max_size=2)
        },
        optional=sane | {"echo": st.booleans(), "logprobs": st.integers(0, 5)},
    )
    book_body = st.fixed_dictionaries(
        {"query": text | anything},
        optional={"history": anything | st.just(""), "max_length": scalars, "max_new_tokens": st.integers(-1, 10)},
    )
    bodies = (
        st.tuples(st.just("/v1/chat/completions"), chat_body)
        | st.tuples(st.just("/v1/completions"), completion_body)
        | st.tuples(st.just("/chat"), book_body)
        | st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/chat"]), anything)
    )

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(bodies)
    def check(case):
        route, body = case
        content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
        with client.stream("POST", route, content=content) as r:
            raw = r.read().decode("utf-8", "replace")
        assert r.status_code < 500, (route, body, raw)
        seen[(route, r.status_code)] = seen.get((route, r.status_code), 0) + 1
        if r.status_code == 200 and "text/event-stream" in r.headers.get("content-type", ""):
            assert raw.rstrip().endswith("data: [DONE]") and '"server_error"' not in raw, (route, body, raw)

    seen: dict[tuple[str, int], int] = {}
    check()
    assert client.get("/health").json()["active_requests"] == 0
    for route in ("/v1/chat/completions", "/v1/completions", "/chat"):  # bodies that got through did generate
        assert seen.get((route, 200), 0) >= 20, seen


def test_encoding_a_prompt_does_not_stall_the_event_loop():
    """A long conversation takes a while to encode (and a grammar to compile): meanwhile the server keeps answering
    others. The fake model's encoder blocks here until /health has been answered on the same event loop."""
    import httpx

    chat_model = fake_chat_model()
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    encode = chat_model.encode_chat

    def slow_encode(messages, **options):
        entered.set()
        release.wait(10)
        finished.set()
        return encode(messages, **options)

    chat_model.encode_chat = slow_encode
    engine = ChatEngine(chat_model, max_batch_size=2, max_batch_tokens=1 << 14)
    app = create_api(engine, ApiLimits(max_tokens=CAP))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://catdog") as client:
            body = {"messages": user("reply: done"), "temperature": 0}
            pending = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            assert await asyncio.to_thread(entered.wait, 10)
            health = await client.get("/health")
            answered_while_encoding = not finished.is_set()
            release.set()
            reply = await pending
            return health.status_code, answered_while_encoding, reply

    try:
        status, answered_while_encoding, reply = asyncio.run(scenario())
    finally:
        release.set()
        engine.close()
    assert status == 200 and answered_while_encoding
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "done"
