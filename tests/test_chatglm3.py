"""ChatGLM3 without remote code: weights mapped onto GlmForCausalLM, the SentencePiece prompt, stop tokens."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from catdog_glm.chat.chatglm3 import ChatGLM3Tokenizer, load_chatglm3
from catdog_glm.chat.engine import ChatEngine
from catdog_glm.chat.loading import load_chat_model
from catdog_glm.errors import ModelError
from tests.chatglm_tiny import make_tiny_chatglm3, random_weights, reference_logits


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory):
    return make_tiny_chatglm3(tmp_path_factory.mktemp("chatglm3-bin"), "bin")


@pytest.fixture(scope="module")
def tiny_safetensors(tmp_path_factory):
    return make_tiny_chatglm3(tmp_path_factory.mktemp("chatglm3-st"), "safetensors")


@pytest.mark.parametrize("folder", ["tiny_bin", "tiny_safetensors"])
def test_logits_match_an_independent_chatglm3_forward(folder, request):
    path = request.getfixturevalue(folder)
    model, tokenizer = load_chatglm3(path, dtype=torch.float32)
    assert type(model).__name__ == "GlmForCausalLM"
    cfg = json.loads((path / "config.json").read_text())
    ids = tokenizer.build_prompt([{"role": "user", "content": "What is the capital of France? 你好"}])
    with torch.inference_mode():
        ours = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, reference_logits(random_weights(cfg), cfg, ids), atol=1e-4, rtol=1e-4)


def test_remote_code_is_never_run(tiny_bin):
    # the folder ships a modeling_chatglm.py that raises if imported; loading must not touch it
    chat = load_chat_model(str(tiny_bin), dtype="fp32")
    assert chat.kind == "chatglm3"


def test_prompt_layout(tiny_bin):
    tok = ChatGLM3Tokenizer(tiny_bin / "tokenizer.model")
    n = tok.n_pieces
    assert tok.special["[MASK]"] == n and tok.special["<|observation|>"] == n + 8
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "你好"},
    ]
    ids = tok.build_prompt(messages)
    expected = [n + 1, n + 3]  # [gMASK] sop
    for m in messages:
        expected += [tok.special[f"<|{m['role']}|>"], *tok.sp.encode("\n"), *tok.sp.encode(m["content"])]
    expected.append(tok.special["<|assistant|>"])
    assert ids == expected
    assert tok.stop_ids == {2, n + 6, n + 8}
    assert tok.decode(ids) == tok.sp.decode([i for i in ids if i < n])  # special tokens never leak into text


def test_stop_tokens_end_generation(tiny_bin):
    chat = load_chat_model(str(tiny_bin), dtype="fp32")
    engine = ChatEngine(chat)
    user = ChatGLM3Tokenizer(tiny_bin / "tokenizer.model").special["<|user|>"]
    calls = {"n": 0}

    def force_stop_at_third_token(_module, _inputs, output):
        calls["n"] += 1
        if calls["n"] == 3:
            output[..., user] = 1e4
        return output

    handle = chat.model.lm_head.register_forward_hook(force_stop_at_third_token)
    try:
        reply = engine.chat([{"role": "user", "content": "hello"}], temperature=0, max_new_tokens=20)
    finally:
        handle.remove()
    assert reply.finish_reason == "stop" and reply.completion_tokens == 2
    assert "<|user|>" not in reply.text
    free = engine.chat([{"role": "user", "content": "hello"}], temperature=0, max_new_tokens=5)
    assert free.finish_reason in ("length", "stop") and free.completion_tokens <= 5


def test_malicious_pickle_in_a_shard_is_refused(tmp_path):
    folder = make_tiny_chatglm3(tmp_path / "evil", "bin")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with (folder / "pytorch_model-00002-of-00002.bin").open("wb") as f:
        pickle.dump({"transformer.output_layer.weight": Exploit()}, f)
    with pytest.raises(ModelError, match="refused to load"):
        load_chatglm3(folder)
    assert not marker.exists()


def test_missing_files_are_named(tmp_path):
    folder = make_tiny_chatglm3(tmp_path / "partial", "safetensors")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="missing weight shard.*model-00002-of-00002.safetensors"):
        load_chatglm3(folder)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ModelError, match="tokenizer.model is missing"):
        load_chatglm3(folder)
