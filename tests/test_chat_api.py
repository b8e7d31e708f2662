"""The chat API in process over a tiny random ChatGLM3 (fast): CORS, truncation signal, timeout, book history forms."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from catdog_glm.chat.engine import ChatEngine
from catdog_glm.chat.loading import load_chat_model
from catdog_glm.serve.chat_api import ApiLimits, create_api
from tests.chatglm_tiny import make_tiny_chatglm3


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ChatEngine(load_chat_model(str(make_tiny_chatglm3(tmp_path_factory.mktemp("tiny"), "bin")), dtype="fp32"))


def test_cors_is_off_unless_an_origin_is_allowed(engine):
    closed = TestClient(create_api(engine, ApiLimits()))
    r = closed.options(
        "/v1/chat/completions", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers
    opened = TestClient(create_api(engine, ApiLimits(cors_origins=["http://app.example"])))
    r = opened.options(
        "/v1/chat/completions", headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    )
    assert r.headers["access-control-allow-origin"] == "http://app.example"


def test_truncated_conversations_are_signalled(engine, monkeypatch):
    monkeypatch.setattr(engine.model, "context_window", 64)
    client = TestClient(create_api(engine, ApiLimits(max_tokens=16)))
    history = [{"role": "user", "content": "hello world " * 5}, {"role": "assistant", "content": "hi " * 10}] * 3
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [*history, {"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0},
    )
    assert r.status_code == 200
    dropped = r.json()["catdog"]["truncated_messages"]
    assert dropped > 0 and r.headers["x-catdog-truncated-messages"] == str(dropped)


def test_book_history_forms(engine):
    client = TestClient(create_api(engine, ApiLimits(max_tokens=8)))
    first = client.post("/chat", content=b'{"query": "hello", "history": ""}').json()  # no Content-Type
    assert isinstance(first["response"], str) and len(first["history"]) == 2
    pairs = client.post("/chat", json={"query": "again", "history": [["hello", "hi"]], "max_new_tokens": 4})
    assert pairs.status_code == 200 and len(pairs.json()["history"]) == 4


def test_requests_that_run_too_long_are_stopped(engine, monkeypatch):
    monkeypatch.setattr(engine.model, "stop_ids", set())  # the random model must generate all 200 tokens
    client = TestClient(create_api(engine, ApiLimits(max_tokens=200, request_timeout_s=0.05)))
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 200, "temperature": 1.0},
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert client.get("/health").json()["active_requests"] == 0
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 200, "temperature": 1.0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
    assert client.get("/health").json()["active_requests"] == 0


def test_streamed_pieces_arrive_through_the_event_loop_and_match_the_whole_reply(engine):
    import json

    client = TestClient(create_api(engine, ApiLimits(max_tokens=16)))
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_a_closed_engine_answers_503_shutting_down(engine):
    closed = ChatEngine(engine.model)  # a second engine over the same model, shut down as a stopping server does
    closed.close()
    client = TestClient(create_api(closed, ApiLimits(max_tokens=8)))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert r.headers["retry-after"] == "5" and client.get("/health").json()["active_requests"] == 0


def test_chatglm3_replies_come_without_their_metadata_line(engine):
    """Every ChatGLM3 reply starts with a metadata line (empty for plain text: "\\n Hello"); THUDM's
    process_response strips it, and so do both routes, the same way."""
    from catdog_glm.serve.chat_api import _reply_content

    assert _reply_content("chatglm3", "\n Hello there.\n") == "Hello there."
    assert _reply_content(None, "\n Hello") == "\n Hello"  # other models' text is theirs
    client = TestClient(create_api(engine, ApiLimits(max_tokens=8)))
    body = {"max_new_tokens": 6, "temperature": 0}
    book = client.post("/chat", json={"query": "hello", **body}).json()["response"]
    openai = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0},
    ).json()["choices"][0]["message"]["content"]
    raw = engine.chat([{"role": "user", "content": "hello"}], max_new_tokens=6, temperature=0).text
    assert book == openai == _reply_content("chatglm3", raw)
