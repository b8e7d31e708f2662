"""`catdog export chat`: a ChatGLM3 folder -> a plain transformers folder that loads, tokenizes, templates and
generates exactly like catdog's own ChatGLM3 path, with no remote code."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from catdog_glm.chat.chatglm3 import ChatGLM3Tokenizer, load_chatglm3
from catdog_glm.chat.engine import ChatEngine
from catdog_glm.chat.export import build_fast_tokenizer
from catdog_glm.chat.loading import load_chat_model
from tests.chatglm_tiny import CHATGLM3_NORMALIZER, make_tiny_chatglm3, train_tokenizer
from tests.conftest import catdog_env, start_catdog

CATDOG = [sys.executable, "-m", "catdog_glm"]


def run(*args, timeout=300):
    return subprocess.run([*CATDOG, *map(str, args)], capture_output=True, text=True, env=catdog_env(), timeout=timeout)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_chatglm3(tmp_path_factory.mktemp("chatglm3") / "chatglm3-tiny", "bin")


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "chatglm3-tiny-hf"
    done = run("export", "chat", "--model", source, "--out", out, "--dtype", "bf16")
    assert done.returncode == 0, done.stderr
    assert "Wrote" in done.stdout
    return out


CORPUS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "What is the capital of France?",
    "你好，很高兴认识你。今天天气很好。",
    "猫和狗是人类的好朋友。",
    "emoji 😀🐱🐶 and a flag 🇨🇳",
    "two  spaces,   three, and eight        spaces",
    "  leading and trailing  ",
    "tab\tseparated\t\tcolumns",
    "line one\nline two\n\nafter a blank line\n",
    "\n\nstarts with newlines",
    "def main():\n\treturn 42  # code with tabs and   spaces",
    "byte fallback: 龘 𠀀 ꙮ ᚠᛇᚻ 한국어 العربية ☃ ∑∫√",
    "mixed 中文 English 123 和 符号！？",
    "",
    " ",
    "\n",
    "x" * 100,
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefgh xyz  \t\n你好猫狗很高兴😀🐱é,.!?0123") + [
        chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(20)
    ]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))) for _ in range(n)]


@pytest.mark.parametrize(
    "normalizer", [CHATGLM3_NORMALIZER, {}], ids=["chatglm3-identity", "sentencepiece-default-nfkc"]
)
def test_tokenizer_json_encodes_like_sentencepiece(normalizer, tmp_path):
    from tokenizers import Tokenizer

    train_tokenizer(tmp_path, **normalizer)
    fast_path = tmp_path / "tokenizer.json"
    build_fast_tokenizer(tmp_path / "tokenizer.model").save(str(fast_path))
    fast = Tokenizer.from_file(str(fast_path))  # what vLLM, SGLang and TGI read
    ours = ChatGLM3Tokenizer(tmp_path / "tokenizer.model")
    texts = CORPUS + _random_texts(300)
    mismatched = [t for t in texts if fast.encode(t, add_special_tokens=False).ids != ours.encode(t)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts differ, e.g. {mismatched[:3]!r}"
    for text in CORPUS:
        assert fast.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    n = ours.n_pieces
    assert [fast.token_to_id(name) for name in ours.special] == list(range(n, n + 9))


def test_exported_folder_loads_in_plain_transformers_without_remote_code(source, exported):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith(".py") for name in names)  # nothing for trust_remote_code to run
    config = AutoConfig.from_pretrained(exported, trust_remote_code=False)
    assert config.model_type == "glm" and config.architectures == ["GlmForCausalLM"]
    raw = json.loads((exported / "config.json").read_text())
    assert "auto_map" not in raw
    # engines on transformers 4.x read the rotary settings and dtype under their old names
    assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"] and raw["partial_rotary_factor"] == 0.5
    assert raw["torch_dtype"] == raw["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=False)
    assert type(model).__name__ == "GlmForCausalLM" and model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=False)
    ours = ChatGLM3Tokenizer(source / "tokenizer.model")
    n = ours.n_pieces
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, n + 6, n + 8]  # </s>, <|user|>, <|observation|>
    assert model.generation_config.eos_token_id == [2, n + 6, n + 8]
    assert "chat_template" in json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer("hello").input_ids == [n + 1, n + 3, *ours.encode("hello")]  # [gMASK] sop, as ChatGLM3 does


CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "你好，今天天气很好。"},
    ],
    [
        {"role": "user", "content": "  indented\n\tcode   here  "},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "\nstarts with a newline 😀"},
    ],
    [
        {"role": "system", "content": "tools follow"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "metadata": "get_weather", "content": "call()"},
        {"role": "observation", "content": '{"temp": 21}'},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "system-multi-turn", "whitespace", "metadata"])
def test_chat_template_renders_exactly_our_prompt_ids(source, exported, messages):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == ChatGLM3Tokenizer(source / "tokenizer.model").build_prompt(messages)


def test_chat_template_refuses_an_unknown_role(exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    with pytest.raises(Exception, match="not tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], add_generation_prompt=True)


def test_greedy_generation_equals_catdogs_engine_token_for_token(source, exported, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from catdog_glm.chat.scheduler import LEAN_DECODER_ENV

    # the engine through transformers' own modules, bit for bit what the exported model computes in bf16; the lean
    # decoder's fused ops round within one bf16 step of them (tests/test_decoder.py, test_kernels.py), which can
    # turn a greedy near-tie after a few dozen tokens
    monkeypatch.setenv(LEAN_DECODER_ENV, "0")
    engine = ChatEngine(load_chat_model(str(source), dtype="bf16", device="cpu"))
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    for messages in CONVERSATIONS[:3]:
        reply = engine.chat(messages, temperature=0, max_new_tokens=40)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=40, do_sample=False)
        generated = out[0, prompt.shape[1] :].tolist()
        if generated and generated[-1] in model.generation_config.eos_token_id:
            generated = generated[:-1]  # generate() keeps the stop token; catdog's reply does not
        assert len(reply.token_ids) > 5
        assert generated == reply.token_ids


def test_fp32_export_has_the_source_logits(source, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fp32"
    done = run("export", "chat", "--model", source, "--out", out, "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    reference, tokenizer = load_chatglm3(source, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([tokenizer.build_prompt([{"role": "user", "content": "你好 hello"}])])
    with torch.inference_mode():
        torch.testing.assert_close(exported(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.slow
def test_serve_chat_serves_the_exported_folder(source, exported):
    import httpx

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = ChatEngine(load_chat_model(str(exported), dtype="bf16")).chat(messages, temperature=0, max_new_tokens=12)
    proc, url = start_catdog(["serve-chat", "--model", str(exported), "--dtype", "bf16"])
    try:
        [model] = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert model["id"] == exported.name
        body = {"model": model["id"], "messages": messages, "temperature": 0, "max_tokens": 12}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["message"]["content"] == expected.text
        assert answer["usage"]["completion_tokens"] == expected.completion_tokens
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_large_export_is_sharded_with_an_index_and_memory_stays_below_one_copy(tmp_path):
    """~90 MB of fp32 weights in 8 shards, exported as bf16 in 8 MB shards: every weight lands in exactly one shard,
    and the exporting process grows by about one input shard plus two output shards (about 32 MB measured here),
    never by the whole model."""
    source = make_tiny_chatglm3(
        tmp_path / "medium",
        "safetensors",
        shards=8,
        hidden_size=512,
        num_layers=8,
        num_attention_heads=8,
        kv_channels=64,
        multi_query_group_num=2,
        ffn_hidden_size=1376,
    )
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    out = tmp_path / "medium-hf"
    probe = f"""
import resource, json
from catdog_glm.chat.export import export_chatglm3, build_fast_tokenizer
from transformers import GlmForCausalLM, GlmConfig
build_fast_tokenizer({str(source / "tokenizer.model")!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
result = export_chatglm3({str(source)!r}, {str(out)!r}, dtype="bf16", max_shard_size="8MB")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"growth": after - before, "shards": result.shards, "bytes": result.bytes}}))
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=catdog_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert source_bytes > 80e6
    assert stats["growth"] < 0.5 * source_bytes, (stats, source_bytes)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert stats["shards"] == len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == stats["bytes"] == pytest.approx(source_bytes / 2, rel=0.01)
    from safetensors import safe_open

    seen = []
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            seen += list(f.keys())
            assert f.metadata() == {"format": "pt"}
    assert len(seen) == len(set(seen)) == len(index["weight_map"])
    assert not list(tmp_path.glob(".*tmp*"))  # the temp folder became the export


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "int3"], "--dtype must be one of"),
        (["--max-shard-size", "lots"], "--max-shard-size must look like"),
        (["--max-shard-size", "10KB"], "at least 1MB"),
    ],
)
def test_bad_options_are_one_line_errors(source, tmp_path, args, message):
    out = tmp_path / "never"
    done = run("export", "chat", "--model", source, "--out", out, *args)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def test_bad_sources_and_existing_out_are_refused_without_loss(source, exported, tmp_path):
    before = sorted((p.name, p.stat().st_size) for p in exported.iterdir())
    done = run("export", "chat", "--model", source, "--out", exported)
    assert done.returncode == 1 and "already exists" in done.stderr and "--overwrite" in done.stderr
    assert sorted((p.name, p.stat().st_size) for p in exported.iterdir()) == before

    done = run("export", "chat", "--model", exported, "--out", tmp_path / "x")
    assert done.returncode == 1 and "not a ChatGLM3 folder" in done.stderr

    broken = make_tiny_chatglm3(tmp_path / "broken", "bin")
    (broken / "pytorch_model-00002-of-00002.bin").write_bytes(b"not a torch file")
    done = run("export", "chat", "--model", broken, "--out", tmp_path / "broken-hf")
    assert done.returncode == 1 and "pytorch_model-00002-of-00002.bin" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "broken-hf").exists() and not list(tmp_path.glob(".broken-hf.tmp-*"))
