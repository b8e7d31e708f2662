"""The lean decoder (chat/decoder.py) gives the replies transformers' modules give: fp32 greedy tokens identical on
the tiny ChatGLM3 (GLM) and the embedded SmolLM2 (Llama), batched; quantized, a request's reply does not depend on
what shares its batch; fused weights add no memory and leave the transformers modules working; unsupported families
keep the old path."""

from __future__ import annotations

import threading

import pytest
import torch

from catdog_glm.chat.decoder import lean_decoder
from catdog_glm.chat.engine import ChatEngine
from catdog_glm.chat.loading import load_chat_model
from catdog_glm.chat.quantize import weight_bytes
from catdog_glm.chat.scheduler import LEAN_DECODER_ENV
from tests.chatglm_tiny import make_tiny_chatglm3

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colours.", "Hello"]


def _replies(chat, monkeypatch, lean: bool, tokens: int = 12, together: bool = True) -> list[list[int]]:
    """Greedy token ids for every prompt, on a fresh engine: all four requests in flight together (batched as they
    arrive), or one after another. Quantized layers take one after another: their kernel for a step depends on
    how many rows the step has (int8 activations up to 16, a float GEMM above), so batch composition matters there."""
    monkeypatch.setenv(LEAN_DECODER_ENV, "1" if lean else "0")
    engine = ChatEngine(chat)
    out: list = [None] * len(PROMPTS)
    if not together:
        for i, prompt in enumerate(PROMPTS):
            reply = engine.chat([{"role": "user", "content": prompt}], temperature=0, max_new_tokens=tokens)
            out[i] = reply.token_ids
        engine.close()
        return out

    def ask(i: int) -> None:
        reply = engine.chat([{"role": "user", "content": PROMPTS[i]}], temperature=0, max_new_tokens=tokens)
        out[i] = reply.token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.close()
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_chatglm3(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("own_ops", [True, False], ids=["catdog-ops", "torch-ops"])
def test_chatglm3_replies_match_transformers_modules(tiny_dir, monkeypatch, own_ops):
    """With catdog's ops (batched decode attention, fused norms, rotary, SiLU) and without them (no compiler: SDPA
    per request and the modules' own norms)."""
    import catdog_glm.chat.decoder as decoder

    if not own_ops:
        monkeypatch.setattr(decoder, "kernels_available", lambda: False)
    chat = load_chat_model(str(tiny_dir), dtype="fp32")
    chat.stop_ids = set()  # random weights: every request makes all its tokens
    want = _replies(chat, monkeypatch, lean=False)
    got = _replies(chat, monkeypatch, lean=True)
    built = lean_decoder(chat.model)
    assert built is not None and built.fusable
    assert got == want


@pytest.mark.parametrize("quantize", [4, 8])
def test_quantized_replies_do_not_depend_on_what_shares_the_batch(tiny_dir, monkeypatch, quantize):
    """Decode rows always take the int8-activation kernel and prompt rows the dequantized GEMM, however many rows a
    step has, so a request batched with others gives its solo reply."""
    chat = load_chat_model(str(tiny_dir), dtype="fp32", quantize=quantize)
    chat.stop_ids = set()
    solo = _replies(chat, monkeypatch, lean=True, together=False)
    batched = _replies(chat, monkeypatch, lean=True, together=True)
    assert batched == solo


def test_smollm2_replies_match_and_fusing_adds_no_memory(monkeypatch):
    chat = load_chat_model(None, dtype="fp32")
    before = weight_bytes(chat.model)
    want = _replies(chat, monkeypatch, lean=False)
    got = _replies(chat, monkeypatch, lean=True)
    assert got == want
    assert weight_bytes(chat.model) == before  # q/k/v and gate/up are views into the fused matrices
    # the transformers modules still compute the same thing (plain forwards, generate())
    ids = torch.tensor([chat.encode_chat([{"role": "user", "content": "Hi"}])])
    with torch.inference_mode():
        logits = chat.model(input_ids=ids).logits[0, -1]
    assert chat.decode([int(logits.argmax())]) != ""


def test_a_quantized_smollm2_answers_alike_alone_and_batched(monkeypatch):
    chat = load_chat_model(None, quantize=4)
    solo = _replies(chat, monkeypatch, lean=True, tokens=16, together=False)
    batched = _replies(chat, monkeypatch, lean=True, tokens=16, together=True)
    # bf16 prompt rows go through oneDNN's bf16 GEMM, whose rounding may differ with the number of rows batched
    # (fp32, above, is exact): a near tie can then flip one reply
    assert sum(a == b for a, b in zip(batched, solo, strict=True)) >= len(PROMPTS) - 1
    assert "Paris" in chat.decode(solo[0])


def test_an_unsupported_model_keeps_transformers_path():
    class NotADecoder(torch.nn.Module):
        pass

    assert lean_decoder(NotADecoder()) is None
