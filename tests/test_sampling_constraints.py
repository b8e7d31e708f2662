"""Sampling options, logprobs and constrained decoding through the real engine: the scripted fake model
(tests/fake_chat.py) for exact expectations, the tiny ChatGLM3 and the embedded SmolLM2 for real tokenizers."""

from __future__ import annotations

import pytest

from catdog_glm.chat.engine import ChatEngine
from tests.fake_chat import fake_chat_model


@pytest.fixture(scope="module")
def fake():
    engine = ChatEngine(fake_chat_model(), max_batch_size=8, max_batch_tokens=65536)
    yield engine
    engine.close()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_fake_model_replies_its_script_greedy_and_streamed(fake):
    reply = fake.chat(user("reply: Grüß dich, 世界!"), temperature=0)
    assert reply.text == "Grüß dich, 世界!" and reply.finish_reason == "stop"
    assert reply.completion_tokens == len("Grüß dich, 世界!".encode())
    pieces = list(fake.stream(user("how are you?"), temperature=0))
    assert len(pieces) > 1 and "".join(pieces) == "Hello! You said: how are you?"
    assert fake.chat(user("reply: abcdef"), temperature=0, max_new_tokens=3).text == "abc"
