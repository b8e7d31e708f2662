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
    process_response strips it, and so does the engine's Generation, once for every front end
    (tests/test_reply_content.py checks each)."""
    parser = engine.model.format.parser()
    parser.feed("\n Hello there.\n")
    parser.finish()
    assert parser.content == "Hello there."
    client = TestClient(create_api(engine, ApiLimits(max_tokens=8)))
    body = {"max_new_tokens": 6, "temperature": 0}
    book = client.post("/chat", json={"query": "hello", **body}).json()["response"]
    openai = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0},
    ).json()["choices"][0]["message"]["content"]
    chat = engine.chat([{"role": "user", "content": "hello"}], max_new_tokens=6, temperature=0).text
    assert book == openai == chat and not chat.startswith(("\n", " "))


def test_cors_stays_off_on_the_page_routes_too(engine):
    """Gradio answers preflights on its own routes with allow-credentials and reflects localhost origins; with CORS
    off (the README's default) no route grants anything, and an allowed origin is granted without credentials."""
    pytest.importorskip("gradio")
    from catdog_glm.serve.chat_server import create_chat_app

    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for origins, origin in (([], "http://localhost:7860"), ([], "http://evil.example"), (["http://app.example"], None)):
        client = TestClient(create_chat_app(engine, ApiLimits(cors_origins=origins)), base_url="http://localhost:7860")
        for path in ("/", "/gradio_api/queue/join", "/v1/chat/completions"):
            r = client.options(path, headers={"Origin": origin or origins[0], **preflight})
            assert "access-control-allow-credentials" not in r.headers, (path, dict(r.headers))
            if origins:
                assert r.headers["access-control-allow-origin"] == origins[0], path
            else:
                assert "access-control-allow-origin" not in r.headers, (path, dict(r.headers))


def test_a_401_names_the_scheme_it_wants(engine):
    client = TestClient(create_api(engine, ApiLimits(api_key="k")))
    for r in (
        client.get("/v1/models"),
        client.post("/chat", json={"query": "hi"}, headers={"Authorization": "Bearer x"}),
    ):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.headers


def test_completions_keep_the_leading_space_chatglm3_tokens_spell(engine):
    """SentencePiece decodes a text's first piece without its space ("\u2581the" alone is "the"): a continuation
    decoded alone lost the space its tokens spell, so `text` differed from the joined tokens, text_offset did not
    line up and `echo` glued prompt and continuation."""
    tokenizer = engine.model.tokenizer
    the = tokenizer.sp.piece_to_id("\u2581the")  # a word piece: its text is " the"
    assert tokenizer.decode([the]) == "the"
    client = TestClient(create_api(engine, ApiLimits(max_tokens=8)))
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0, "logit_bias": {str(the): 100}}
    choice = client.post("/v1/completions", json=body | {"logprobs": 0}).json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "".join(lp["tokens"]) == " the the the"
    assert all(choice["text"][o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"], strict=True))
    echoed = client.post("/v1/completions", json=body | {"echo": True}).json()["choices"][0]["text"]
    assert echoed == "hello the the the"
    streamed = client.post("/v1/completions", json=body | {"stream": True}).text
    pieces = [json.loads(x[6:])["choices"][0]["text"] for x in streamed.splitlines() if x.startswith("data: {")]
    assert "".join(pieces) == " the the the"
