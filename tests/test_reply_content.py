"""Every front end shows a reply as the model's format reads it: ChatGLM3 starts each reply with a metadata line
(empty for plain text), which the engine's Generation strips once for all of them (`engine.chat`, `catdog chat`, the
Gradio page, the Streamlit page, `/chat` and `/v1`). The model here is the scripted fake (tests/fake_chat.py) told
to write ChatGLM3's replies: "\\n Hello there." is what ChatGLM3 sends for a plain "Hello there."."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from catdog_glm.chat.engine import ChatEngine
from catdog_glm.chat.formats.chatglm3 import ChatGLM3Parser
from tests.fake_chat import FakeFormat, fake_chat_model

RAW = "\n Hello there."  # the empty metadata line, then the content after SentencePiece's space
SHOWN = "Hello there."
QUESTION = [{"role": "user", "content": "hi"}]


class GLMReadingFormat(FakeFormat):
    """The fake's prompts, with replies read by ChatGLM3's parser (the metadata line, then the content)."""

    def parser(self, tools=None, *, parallel=True, continued=False):
        return ChatGLM3Parser(tools or [], parallel=parallel, continued=continued)


def glm_engine() -> ChatEngine:
    model = fake_chat_model(lambda prompt: RAW)
    model.format = GLMReadingFormat(model.tokenizer)  # replies are read as ChatGLM3 writes them
    return ChatEngine(model, max_batch_size=4, max_batch_tokens=1 << 14)


@pytest.fixture(scope="module")
def engine():
    engine = glm_engine()
    yield engine
    engine.close()


def test_engine_chat_stream_and_async_pieces(engine):
    reply = engine.chat(QUESTION, temperature=0)
    assert reply.text == SHOWN and reply.tool_calls == [] and reply.finish_reason == "stop"
    assert "".join(engine.stream(QUESTION, temperature=0)) == SHOWN

    async def read() -> str:
        return "".join([p async for p in engine.stream(QUESTION, temperature=0)])

    assert asyncio.run(read()) == SHOWN


def test_catdog_chat(monkeypatch):
    from typer.testing import CliRunner

    from catdog_glm.cli import app
    from catdog_glm.cli import chat as chat_cli

    monkeypatch.setattr(chat_cli, "load_engine", lambda *a, **k: glm_engine())
    result = CliRunner().invoke(app, ["chat", "--temperature", "0"], input="hi\nagain\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:2] == [SHOWN, SHOWN]


def test_gradio_page_handler(engine):
    pytest.importorskip("gradio")
    from catdog_glm.serve.chat_page import build_chat_page

    page = build_chat_page(engine)
    respond = next(f.fn for f in page.fns.values() if getattr(f.fn, "__name__", "") == "respond")
    request = SimpleNamespace(session_hash="s1")
    *_, (_, history) = respond("hi", [], "", 4096, 0.8, 0.0, request)
    assert history[-1] == {"role": "assistant", "content": SHOWN}


def test_streamlit_page(monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    import catdog_glm.chat.engine as engine_module
    from catdog_glm.serve.streamlit_runner import APP_FILE

    monkeypatch.delenv("CATDOG_ST_API_URL", raising=False)
    monkeypatch.setattr(engine_module, "load_engine", lambda *a, **k: glm_engine())
    import streamlit as st

    at = AppTest.from_file(str(APP_FILE), default_timeout=60)
    try:
        at.run()
        at.chat_input(key="prompt").set_value("hi").run()
        assert not at.exception
        assert at.session_state["history"][-1] == {"role": "assistant", "content": SHOWN}
    finally:
        # the page keeps its engine in st.cache_resource for the whole process: the next page test must not get
        # this fake one
        st.cache_resource.clear()


def test_http_book_and_openai_routes(engine):
    from fastapi.testclient import TestClient

    from catdog_glm.serve.chat_api import create_api

    client = TestClient(create_api(engine))
    book = client.post("/chat", json={"query": "hi", "history": []}).json()
    assert book["response"] == SHOWN and book["history"][-1] == {"role": "assistant", "content": SHOWN}
    r = client.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0}).json()
    assert r["choices"][0]["message"]["content"] == SHOWN
