"""Sampling options, logprobs and constrained decoding through the real engine: the scripted fake model
(tests/fake_chat.py) for exact expectations, the tiny ChatGLM3 and the embedded SmolLM2 for real tokenizers."""

from __future__ import annotations

import json

import pytest

from catdog_glm.chat.engine import ChatEngine, Constraint
from catdog_glm.errors import ConfigError
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


# ---- sampling options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"frequency_penalty": 2.0}, "aaaxax"),  # 'a' loses its lead after 3 (10 - 3*2 < 5), 'x' after one
        ({"presence_penalty": 6.0}, "axaaaa"),  # any 'a' at all costs 6: the second 'a' is beaten once by 'x'
        ({"logit_bias": {ord("a"): -100.0}}, "xxxxxx"),
        # over prompt + reply: 'a' is in the prompt, so 10 / 3 < 5 loses to 'x' at once; then 'x' is seen too
        ({"repetition_penalty": 3.0}, "xaaaaa"),
    ],
)
def test_penalties_and_bias_change_the_greedy_reply_as_specified(fake, options, expected):
    reply = fake.chat(user("reply: aaaaaa"), temperature=0, **options)
    assert reply.text == expected


def test_logit_bias_can_force_a_token_until_the_length_limit(fake):
    reply = fake.chat(user("reply: abc"), temperature=0, max_new_tokens=5, logit_bias={ord("x"): 6})
    assert reply.text == "xxxxx" and reply.finish_reason == "length"


def test_repetition_penalty_is_transformers_rule():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from catdog_glm.chat.sampling import Sampling, TokenSampler

    torch.manual_seed(0)
    row = torch.randn(50) * 3
    prompt, made = [1, 2, 3, 7], [7, 9, 11]
    sampler = TokenSampler(Sampling(repetition_penalty=1.7, temperature=0), prompt)
    sampler.adjust(row)  # the first call sets up its state from the prompt
    for token in made:
        sampler.observe(token)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + made]), row[None].clone())[0]
    assert torch.allclose(sampler.adjust(row), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": float("inf")}, "top_p must be a finite number"),
        ({"frequency_penalty": float("-inf")}, "frequency_penalty"),
        ({"logit_bias": {5: float("nan")}}, r"logit_bias\[5\]"),
        ({"logit_bias": {259: 1.0}}, "outside this model's vocabulary"),
        ({"logit_bias": {-1: 1.0}}, "outside this model's vocabulary"),
        ({"logit_bias": {"5": 1.0}}, "token id"),
        ({"seed": 2**64}, "seed must be a 64-bit integer"),
        ({"seed": 99999999999999999999999}, "seed must be a 64-bit integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temprature": 0.5}, "unknown sampling option"),
    ],
)
def test_bad_sampling_options_are_one_line_config_errors(fake, options, message):
    from catdog_glm.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as caught:
        fake.stream(user("hi"), **options)
    assert "\n" not in str(caught.value)


def test_a_vanishing_temperature_samples_greedily_instead_of_overflowing(fake):
    """logits / 4e-195 overflow to inf and softmax to NaN: below 1e-5 (vLLM's epsilon) the engine picks greedily."""
    expected = fake.chat(user("reply: tiny temperature"), temperature=0).text
    assert fake.chat(user("reply: tiny temperature"), temperature=4e-195, top_p=0.5).text == expected


def test_seeds_across_the_64_bit_range_replay(fake):
    for seed in (0, -1, 2**63, 2**64 - 1):
        first = fake.chat(user("reply: a fairly long reply to sample from"), temperature=2.0, seed=seed)
        again = fake.chat(user("reply: a fairly long reply to sample from"), temperature=2.0, seed=seed)
        assert first.token_ids == again.token_ids


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (user("\ud800 hi"), "lone surrogate"),
        ([{"role": "wizard", "content": "hi"}], "unknown role 'wizard'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "'image_url'"),
        ([], "no messages"),
        ([{"role": "user", "content": None}], "needs a 'role' and a 'content'"),
    ],
)
def test_bad_messages_are_config_errors(fake, messages, message):
    from catdog_glm.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        fake.stream(messages)


def test_messages_keep_tool_keys_and_text_parts():
    from catdog_glm.chat.engine import normalize_messages

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = normalize_messages(
        [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "f"},
        ]
    )
    assert messages == [
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1", "name": "f"},
    ]


# ---- logprobs -------------------------------------------------------------------------------------------------------
def _expected_logprobs():
    import math

    # the fake's row: 10 on the scripted token, 5 on "x", 0 on the 257 others
    total = math.log(math.exp(10) + math.exp(5) + 257)
    return 10 - total, 5 - total


def test_logprobs_cover_every_token_and_ride_with_their_text(fake):
    import math

    top, second = _expected_logprobs()
    generation = fake.stream(user("reply: hé!"), temperature=0, logprobs=True, top_logprobs=2)
    chunks = list(generation.iter_chunks())
    reply = generation.reply
    assert [c.text for c in chunks] == ["h", "é", "!"]
    assert [[lp.bytes for lp in c.logprobs] for c in chunks] == [[[104]], [[0xC3], [0xA9]], [[33]]]
    assert [lp.token for lp in reply.logprobs] == ["h", "\ufffd", "\ufffd", "!"]  # half characters
    assert len(reply.logprobs) == reply.completion_tokens == 4
    first = reply.logprobs[0]
    assert math.isclose(first.logprob, top, abs_tol=1e-5)
    assert [(t, b) for t, _, b in first.top] == [("h", [104]), ("x", [120])]
    assert math.isclose(first.top[1][1], second, abs_tol=1e-5)


def test_logprobs_of_tokens_held_by_a_stop_string_come_in_a_last_piece(fake):
    generation = fake.stream(user("reply: hello world"), temperature=0, logprobs=True, stop=["wor"])
    chunks = list(generation.iter_chunks())
    assert "".join(c.text for c in chunks) == generation.reply.text == "hello "
    assert chunks[-1].text == "" and [lp.token for lp in chunks[-1].logprobs] == ["w", "o", "r"]
    assert [lp for c in chunks for lp in c.logprobs] == generation.reply.logprobs
    assert all(c.top == [] for c in generation.reply.logprobs)


def test_plain_requests_carry_no_logprobs_and_pieces_stay_strings(fake):
    generation = fake.stream(user("reply: hé!"), temperature=0)
    chunks = list(generation.iter_chunks())
    assert generation.reply.logprobs is None and all(c.logprobs == [] for c in chunks)
    assert list(fake.stream(user("reply: hé!"), temperature=0, logprobs=True)) == ["h", "é", "!"]


def test_chunks_in_an_event_loop(fake):
    import asyncio

    async def read():
        generation = fake.stream(user("reply: ok"), temperature=0, logprobs=True)
        return [chunk async for chunk in generation.chunks()]

    chunks = asyncio.run(read())
    assert [(c.text, [lp.token for lp in c.logprobs]) for c in chunks] == [("o", ["o"]), ("k", ["k"])]


# ---- constrained decoding -------------------------------------------------------------------------------------------
def test_json_object_cuts_a_reply_to_its_json(fake):
    reply = fake.chat(
        user('reply: {"a": [1, 2]} and some chatter'), temperature=0, constraint=Constraint("json_object")
    )
    assert reply.text == '{"a": [1, 2]}' and reply.finish_reason == "stop"
    assert reply.completion_tokens == len(reply.text)  # ended as the grammar completed: no step for a stop token


def _whitespace_run(state) -> str:
    """The longest whitespace a matcher lets come next, greedily: line breaks first, then tabs, then spaces."""
    import torch

    run = ""
    while len(run) < 200:
        mask = state.allowed(torch.zeros(259))
        byte = next((b for b in b"\n\t " if mask is not None and mask[b]), None)
        if byte is None:
            return run
        state.consume(byte)
        run += chr(byte)
    return run


def test_json_whitespace_is_bounded_in_the_grammar(fake):
    """A weak model must not spend max_tokens on whitespace: between JSON tokens at most one line break and a short
    indent (it was 48 characters of any whitespace, line breaks included, per gap); also inside the JSON arguments
    of a forced ChatGLM3 call, which had llguidance's unbounded default."""
    from catdog_glm.chat import constrained
    from catdog_glm.chat.constrained import Constraint
    from catdog_glm.chat.formats import ChatGLM3Format

    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"xs": {"type": "array", "items": {"type": "integer"}}},
                "required": ["xs"],
            },
        },
    }
    cases = [
        (Constraint("json_object"), "{"),
        (Constraint("json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}}), "{"),
        (ChatGLM3Format(None).tool_constraint([tool], "required"), "f\n```python\ntool_call(xs=["),
    ]
    for constraint, prefix in cases:
        state = constrained.compile(fake.model, constraint).start()
        for byte in prefix.encode():
            state.consume(byte)
        run = _whitespace_run(state)
        assert run.count("\n") <= 1 and len(run) <= 33, (constraint.kind, prefix, run)


def test_masked_tokens_never_come_the_next_best_allowed_does(fake):
    # '!' is not allowed after the letters: the second-best 'x' is; then the script's end: the stop token
    reply = fake.chat(user("reply: 123-abc!"), temperature=0, constraint=Constraint("regex", r"[0-9]{3}-[a-z]+"))
    assert reply.text == "123-abcx" and reply.finish_reason == "stop"
    lark = Constraint("lark", 'start: "yes" | "no"')
    assert fake.chat(user("reply: maybe"), temperature=0, constraint=lark).text == "no"


def test_json_schema_replies_validate_even_when_the_model_wants_otherwise(fake):
    import json

    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green"]}, "n": {"type": "integer"}},
        "required": ["colour", "n"],
        "additionalProperties": False,
    }
    for temperature in (0, 1.0):
        reply = fake.chat(
            user('reply: {"colour": "blue", "n": 3.5}'),
            temperature=temperature,
            seed=1,
            max_new_tokens=400,
            constraint=Constraint("json_schema", schema),
        )
        value = json.loads(reply.text)
        assert reply.finish_reason == "stop" and value["colour"] in ("red", "green") and isinstance(value["n"], int)
        assert set(value) == {"colour", "n"}


def test_constrained_and_plain_requests_share_a_batch(fake):
    plain_alone = fake.chat(user("reply: plain text, not JSON"), temperature=0).text
    gens = [
        fake.stream(user('reply: {"k": true} tail'), temperature=0, constraint=Constraint("json_object")),
        fake.stream(user("reply: plain text, not JSON"), temperature=0),
        fake.stream(user("reply: 42"), temperature=0.5, seed=3, constraint=Constraint("regex", "[0-9]+")),
    ]
    texts = [g.text() for g in gens]
    assert texts == ['{"k": true}', plain_alone, "42"]


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (Constraint("json_schema", {"type": "nonsense"}), "invalid json_schema constraint"),
        (Constraint("json_schema", "{not json"), "not valid JSON"),
        (Constraint("json_schema", [1]), "must be a JSON object"),
        (Constraint("lark", "start: foo("), "invalid lark constraint"),
        (Constraint("regex", "a["), "invalid regex constraint"),
        (Constraint("regex", ""), "needs its regex"),
        (Constraint("yaml", "a: 1"), "unknown constraint kind 'yaml'"),
    ],
)
def test_bad_constraints_are_one_line_config_errors(fake, constraint, message):
    from catdog_glm.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as caught:
        fake.stream(user("hi"), constraint=constraint)
    assert "\n" not in str(caught.value)


def test_compiled_constraints_are_cached_per_model():
    from catdog_glm.chat import constrained

    one, two = fake_chat_model(), fake_chat_model()
    schema = Constraint("json_schema", {"type": "object", "properties": {"a": {"type": "string"}}})
    same = Constraint("json_schema", {"properties": {"a": {"type": "string"}}, "type": "object"})
    assert constrained.compile(one, schema) is constrained.compile(one, same)
    assert constrained.compile(two, schema) is not constrained.compile(one, schema)


# ---- the tiny ChatGLM3 (SentencePiece vocabulary) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from catdog_glm.chat.loading import load_chat_model
    from tests.chatglm_tiny import make_tiny_chatglm3

    engine = ChatEngine(load_chat_model(str(make_tiny_chatglm3(tmp_path_factory.mktemp("tiny"))), dtype="fp32"))
    yield engine
    engine.close()


def test_chatglm3_token_bytes_spell_its_pieces(tiny):
    tokenizer = tiny.model.tokenizer
    table = tokenizer.token_bytes()
    assert len(table) == tokenizer.vocab_size
    ids = tokenizer.encode("hello world 猫")
    assert b"".join(table[i] for i in ids).decode() == " hello world 猫"  # SentencePiece's leading "▁" is a space
    assert table[tokenizer.special["<|user|>"]] == b"<|user|>" and table[2] == b"</s>"


def test_chatglm3_greedy_logprobs_are_the_top_choice_and_change_nothing(tiny):
    question = user("hello world")
    plain = tiny.chat(question, temperature=0, max_new_tokens=12)
    reply = tiny.chat(question, temperature=0, max_new_tokens=12, logprobs=True, top_logprobs=3)
    assert reply.token_ids == plain.token_ids and len(reply.logprobs) == reply.completion_tokens
    for lp in reply.logprobs:
        assert lp.logprob <= 0 and (lp.token, lp.logprob, lp.bytes) == lp.top[0] and len(lp.top) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chatglm3_random_model_follows_json_schema_and_regex(tiny, seed):
    import json
    import re

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    reply = tiny.chat(
        user("hello"), temperature=1.0, seed=seed, max_new_tokens=150, constraint=Constraint("json_schema", schema)
    )
    assert reply.finish_reason == "stop" and isinstance(json.loads(reply.text)["ok"], bool)
    digits = tiny.chat(user("hello"), temperature=1.0, seed=seed, constraint=Constraint("regex", "[0-9]{3}"))
    assert re.fullmatch(r"\s*[0-9]{3}", digits.text) and digits.finish_reason == "stop"


# ---- the embedded SmolLM2 (a Hugging Face tokenizer) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    from catdog_glm.chat.loading import load_chat_model

    engine = ChatEngine(load_chat_model(None, dtype="fp32"), max_batch_size=8, max_batch_tokens=8192)
    yield engine
    engine.close()


@pytest.mark.slow
def test_smollm2_json_schema_reply_parses_and_validates(smol):
    import json

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer"},
            "colour": {"enum": ["black", "white", "ginger"]},
        },
        "required": ["name", "age", "colour"],
        "additionalProperties": False,
    }
    question = user("Describe a cat as JSON with its name, age and colour.")
    reply = smol.chat(question, temperature=0, max_new_tokens=60, constraint=Constraint("json_schema", schema))
    value = json.loads(reply.text)
    assert reply.finish_reason == "stop" and set(value) == {"name", "age", "colour"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 30 and isinstance(value["age"], int)
    assert value["colour"] in ("black", "white", "ginger")
    free = smol.chat(question, temperature=0, max_new_tokens=8)
    assert not free.text.startswith("{")  # left alone, it would have opened a code fence: the mask did this


@pytest.mark.slow
def test_smollm2_logprobs_spell_the_reply(smol):
    reply = smol.chat(user("What is the capital of France?"), temperature=0, max_new_tokens=12, logprobs=True)
    assert len(reply.logprobs) == reply.completion_tokens
    assert bytes(b for lp in reply.logprobs for b in lp.bytes).decode() == reply.text


# ---- tools, prefill and plain-text prompts ---------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def test_tools_and_continue_final_reach_the_prompt():
    def script(prompt: str) -> str:
        if prompt.endswith("<|im_start|>assistant\nThe answer is"):
            return " 42"
        return "tools: weather" if '"name": "weather"' in prompt else "no tools"

    engine = ChatEngine(fake_chat_model(script), max_batch_size=4, max_batch_tokens=65536)
    try:
        assert engine.chat(user("hi"), temperature=0).text == "no tools"
        assert engine.chat(user("hi"), tools=[WEATHER], temperature=0).text == "tools: weather"
        prefill = [*user("what is 6 x 7?"), {"role": "assistant", "content": "The answer is"}]
        assert engine.chat(prefill, continue_final=True, temperature=0).text == " 42"
        assert engine.chat(prefill, temperature=0).text == "no tools"  # closed and answered anew
    finally:
        engine.close()


def test_history_with_tool_turns_is_cut_to_fit_and_keeps_its_last_turn():
    engine = ChatEngine(fake_chat_model(context_window=1000), max_batch_size=4, max_batch_tokens=65536)
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "system", "content": "be brief"}]
    for i in range(8):
        history += [*user(f"weather {i}? " * 5), {"role": "assistant", "content": None, "tool_calls": [call]}]
        history.append({"role": "tool", "content": "sunny " * 5, "tool_call_id": "call_1"})
    try:
        reply = engine.chat([*history, *user("reply: done")], tools=[WEATHER], temperature=0, max_new_tokens=8)
        assert reply.text == "done" and reply.truncated_messages > 0 and reply.prompt_tokens <= 1000
    finally:
        engine.close()


def test_a_prompt_that_cannot_fit_names_what_fills_it():
    engine = ChatEngine(fake_chat_model(context_window=300), max_batch_size=4, max_batch_tokens=65536)
    try:
        with pytest.raises(ConfigError, match="the last message alone is"):
            engine.stream(user("x" * 400), max_new_tokens=8)
        with pytest.raises(ConfigError, match="the last message with the system message and the tool definitions"):
            engine.stream([{"role": "system", "content": "be brief"}, *user("hi " * 60)], tools=[WEATHER] * 3)
    finally:
        engine.close()


def test_stream_text_continues_plain_text(fake):
    generation = fake.stream_text("reply: raw text", temperature=0, logprobs=True)
    assert "".join(generation) == "raw text" and generation.reply.prompt_tokens == len("reply: raw text")
    assert len(generation.reply.logprobs) == len("raw text")
    constrained = fake.stream_text("reply: 12", temperature=0, constraint=Constraint("regex", "[0-9]+ apples"))
    assert constrained.text() == "12 apples"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("", "the prompt is empty"), ("\udc80 hi", "lone surrogate"), ("x" * 5000, "more than the"), (None, "string")],
)
def test_stream_text_refuses_bad_prompts(fake, prompt, message):
    from catdog_glm.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        fake.stream_text(prompt, max_new_tokens=16)


def test_chatglm3_stream_text_and_prefill(tiny):
    text = tiny.stream_text("hello world", temperature=0, max_new_tokens=6)
    assert text.text() is not None and text.reply.prompt_tokens == len(tiny.model.encode_text("hello world"))
    prefill = [*user("hello"), {"role": "assistant", "content": "Paris is"}]
    continued = tiny.chat(prefill, continue_final=True, temperature=0, max_new_tokens=4)
    closed = tiny.chat(prefill, temperature=0, max_new_tokens=4)
    assert continued.prompt_tokens == closed.prompt_tokens - 1  # no new <|assistant|> turn


def test_a_reader_that_stops_early_cancels_at_once(fake):
    import asyncio

    generation = fake.stream(user("reply: " + "a" * 300), temperature=0)
    for _ in generation:
        break
    assert generation.cancelled

    async def read_one():
        generation = fake.stream(user("reply: " + "a" * 300), temperature=0)
        pieces = generation.pieces()
        async for _ in pieces:
            break
        await pieces.aclose()  # what a server does when its client goes away
        return generation

    assert asyncio.run(read_one()).cancelled


def test_a_request_whose_matcher_fails_ends_with_stop_alone(fake, caplog):
    from catdog_glm.chat import constrained
    from catdog_glm.chat.sampling import Sampling
    from catdog_glm.chat.scheduler import Request
    from catdog_glm.chat.streaming import END, ThreadInbox

    state = constrained.compile(fake.model, Constraint("json_object")).start()
    state._matcher.consume_token(ord("x"))  # not JSON: the matcher is in its error state from now on
    broken = Request(
        fake.model.encode_chat(user("reply: {}")),
        20,
        Sampling(temperature=0),
        stop_ids=fake.model.stop_ids,
        decode=fake.model.decode,
        inbox=ThreadInbox(),
        constraint=state,
    )
    beside = fake.stream(user("reply: fine"), temperature=0)
    fake._scheduler.submit(broken)
    assert beside.text() == "fine"
    while broken.inbox.get() is not END:
        pass
    assert broken.reply.finish_reason == "stop" and broken.reply.text == "" and broken.error is None
    assert "constrained decoding stopped" in caplog.text


def test_fit_drops_the_fewest_oldest_turns_with_a_few_encodes():
    """The same turns as dropping one at a time would, found by bisection: a handful of encodes, not one per turn."""
    chat_model = fake_chat_model(context_window=4096)
    calls = []
    encode = chat_model.encode_chat

    def counting_encode(messages, **options):
        calls.append(len(messages))
        return encode(messages, **options)

    chat_model.encode_chat = counting_encode
    engine = ChatEngine(chat_model, max_batch_size=2, max_batch_tokens=1 << 16)
    history = [{"role": "system", "content": "be brief"}]
    for i in range(40):
        history += [*user(f"question {i} " * (1 + i % 5)), {"role": "assistant", "content": f"answer {i} " * 3}]
    history += user("reply: done")
    try:
        for budget in (150, 700, 1500):
            expected = next(
                k
                for k in range(len(history))
                if len(encode([history[0], *history[1 + k :]])) <= budget  # linear: drop k oldest after the system
            )
            calls.clear()
            ids, dropped = engine.fit(history, budget)
            assert dropped == expected and ids == encode([history[0], *history[1 + expected :]])
            assert len(calls) <= 9  # 1 + 1 + log2(80) rounded up
    finally:
        engine.close()


def test_fit_keeps_working_when_the_template_refuses_the_shortest_conversation():
    """A template that refuses some cut of the conversation (Qwen3's raises without a user message) must not fail a
    conversation that dropping one turn at a time fits: here the shortest cut, a continued assistant message alone."""
    chat_model = fake_chat_model(context_window=4096)
    encode = chat_model.encode_chat

    def needs_a_user(messages, **options):
        if not any(m["role"] == "user" for m in messages):
            raise ConfigError("the model's chat template refused these messages: No user query found in messages.")
        return encode(messages, **options)

    chat_model.encode_chat = needs_a_user
    engine = ChatEngine(chat_model, max_batch_size=2, max_batch_tokens=1 << 16)
    history = []
    for i in range(6):
        history += [*user(f"question {i} " * 5), {"role": "assistant", "content": f"answer {i} " * 5}]
    history[-1] = {"role": "assistant", "content": "Sure: "}  # continued (prefill)
    budget = len(encode(history[-2:], continue_final=True)) + 10  # only the last question and the prefill fit
    try:
        ids, dropped = engine.fit(history, budget, continue_final=True)
        assert dropped == len(history) - 2 and ids == encode(history[-2:], continue_final=True)
    finally:
        engine.close()


# ---- where a request's sampling defaults come from ------------------------------------------------------------------
def test_sampling_defaults_come_from_the_model_and_requests_override_them(tmp_path):
    from catdog_glm.chat.sampling import DEFAULT_TOP_P, generation_config_defaults

    shipped = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}
    (tmp_path / "generation_config.json").write_text(json.dumps({**shipped, "do_sample": True, "eos_token_id": 2}))
    assert generation_config_defaults(tmp_path) == shipped  # what vLLM's --generation-config auto reads
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "generation_config.json").write_text(json.dumps({"temperature": -1, "top_p": 0.5}))
    assert generation_config_defaults(bad) == {"top_p": 0.5}  # a value Sampling refuses is left out
    assert generation_config_defaults(tmp_path / "none") == {}
    model = fake_chat_model()
    model.sampling_defaults = {"temperature": 0.0}
    engine = ChatEngine(model, max_batch_size=2, max_batch_tokens=1 << 14)
    try:
        assert engine.sampling_defaults()["temperature"] == 0.0 and engine.info()["sampling_defaults"]["top_p"] == 0.8
        assert engine._sampling({"temperature": None}).temperature == 0.0  # None: not set
        assert engine._sampling({"temperature": 0.7}).temperature == 0.7  # the request wins
        assert engine._sampling({}).top_p == DEFAULT_TOP_P
        assert engine.chat(user("reply: greedy by the model's default")).text == "greedy by the model's default"
    finally:
        engine.close()
