"""Tool calling: tools checked, written into ChatGLM3 and Hermes (Qwen2.5-style) prompts, calls parsed out of streamed
replies, and the llguidance grammars that force a call (checked token by token with the embedded SmolLM2 tokenizer)."""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catdog_glm.chat.chatglm3 import ChatGLM3Tokenizer
from catdog_glm.chat.formats import ChatGLM3Format, HermesFormat, TemplateFormat
from catdog_glm.chat.formats.chatglm3 import (
    CHATGLM3_TOOL_SYSTEM,
    ChatGLM3Parser,
    chatglm3_call_code,
    parse_chatglm3_call,
)
from catdog_glm.chat.formats.hermes import HermesParser, hermes_call_text
from catdog_glm.chat.loading import chat_model_of, load_chat_model
from catdog_glm.chat.sources import chatglm3_loaded, transformers_loaded
from catdog_glm.chat.streaming import IncrementalDetokenizer
from catdog_glm.chat.tools import ContentDelta, ToolCallDelta, ToolCallParser, validate_tools
from catdog_glm.errors import ConfigError
from tests.chatglm_tiny import make_tiny_chatglm3

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["location"],
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, NOW]
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")
PARSERS = {"hermes": HermesParser, "chatglm3": ChatGLM3Parser}
FORMATS = {"hermes": HermesFormat(None, native=False), "chatglm3": ChatGLM3Format(None), None: TemplateFormat(None)}


def tool_constraint(tools, choice, fmt, parallel=True):
    return FORMATS[fmt].tool_constraint(tools, choice, parallel=parallel)


def run(parser: ToolCallParser, text: str, step: int = 1) -> list:
    """Feed `text` in pieces of `step` characters, then finish; all deltas."""
    deltas = []
    for i in range(0, len(text), step):
        deltas += parser.feed(text[i : i + step])
    return deltas + parser.finish()


def joined(deltas) -> tuple[str, dict[int, str]]:
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    arguments: dict[int, str] = {}
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            arguments[d.index] = arguments.get(d.index, "") + d.arguments
    return content, arguments


# ---- validate_tools ------------------------------------------------------------------------------------------------
def test_valid_tools_come_back_clean():
    tools = validate_tools([WEATHER, {"type": "function", "function": {"name": "now", "extra": 1}}])
    assert tools[0] == WEATHER
    assert tools[1] == {"type": "function", "function": {"name": "now"}}
    assert validate_tools(None) == []


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ({"type": "function"}, "must be a list"),
        ([{"type": "code_interpreter"}], r"tools\[0\] must be"),
        ([{"type": "function", "function": {"name": "has space"}}], "must match"),
        ([{"type": "function", "function": {"name": "x" * 65}}], "must match"),
        ([NOW, NOW], "already a function named 'now'"),
        ([{"type": "function", "function": {"name": "f", "description": 3}}], "description must be a string"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "of type 'object'"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "nope"}}}}}],
            "not a usable JSON schema",
        ),
    ],
)
def test_bad_tools_are_refused_in_one_line(tools, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate_tools(tools)
    assert "\n" not in str(error.value)


# ---- the Hermes parser ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_plain_text_streams_through(step):
    text = "Paris is the capital of France. <tool is not a call> </tool_call> done.\n"
    parser = HermesParser(TOOLS)
    deltas = run(parser, text, step)
    assert all(isinstance(d, ContentDelta) for d in deltas)
    assert joined(deltas)[0] == parser.content == text and parser.tool_calls == []


def test_only_a_possible_call_start_is_held_back():
    parser = HermesParser(TOOLS)
    assert parser.feed("Hello <tool") == [ContentDelta("Hello")]  # " <tool" may still become "<tool_call>"
    assert parser.feed("box>") == [ContentDelta(" <toolbox>")]


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_hermes_call_streams_id_name_then_arguments(step):
    call = '{"name": "get_current_weather", "arguments": {"location": "Paris", "days": 2}}'
    text = f"Let me check.\n<tool_call>\n{call}\n</tool_call>"
    parser = HermesParser(TOOLS)
    deltas = run(parser, text, step)
    calls = [d for d in deltas if isinstance(d, ToolCallDelta)]
    assert calls[0].name == "get_current_weather" and CALL_ID.match(calls[0].id) and calls[0].arguments == ""
    assert all(d.id is None and d.name is None for d in calls[1:])
    content, arguments = joined(deltas)
    assert content == parser.content == "Let me check."
    assert json.loads(arguments[0]) == {"location": "Paris", "days": 2}
    assert parser.tool_calls == [
        {
            "id": calls[0].id,
            "type": "function",
            "function": {"name": "get_current_weather", "arguments": arguments[0]},
        }
    ]
    if step == 1:  # the arguments really stream, not only at the end
        assert len(calls) > 3


def test_parallel_calls_and_parallel_off():
    text = hermes_call_text("now", {}) + "\n" + hermes_call_text("get_current_weather", {"location": "Oslo"})
    both = HermesParser(TOOLS)
    run(both, text, 5)
    assert [c["function"]["name"] for c in both.tool_calls] == ["now", "get_current_weather"]
    assert both.content is None and len({c["id"] for c in both.tool_calls}) == 2
    one = HermesParser(TOOLS, parallel=False)
    run(one, text, 5)
    assert [c["function"]["name"] for c in one.tool_calls] == ["now"] and one.content is None


@pytest.mark.parametrize(
    "call",
    [
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # not one of the tools
        "<tool_call>\nnot json at all\n</tool_call>",
        '<tool_call>\n{"arguments": {}, "name": 3}\n</tool_call>',
    ],
)
def test_unknown_or_broken_hermes_calls_stay_content(call):
    parser = HermesParser(TOOLS)
    deltas = run(parser, "Hi " + call, 4)
    assert parser.tool_calls == [] and parser.content == "Hi " + call
    assert all(isinstance(d, ContentDelta) for d in deltas)


def test_a_call_cut_off_by_the_length_limit_keeps_what_came():
    parser = HermesParser(TOOLS)
    run(parser, '<tool_call>\n{"name": "now", "arguments": {"a": [1, 2', 3)
    assert parser.tool_calls[0]["function"] == {"name": "now", "arguments": '{"a": [1, 2'}


def test_a_template_without_a_tool_format_reads_replies_as_plain_text():
    assert TemplateFormat(None).parser(TOOLS) is None  # the engine passes the text through as it comes
    assert HermesFormat(None, native=False).parser([]) is None  # no tools offered: nothing to read out
    assert ChatGLM3Format(None).parser([]) is not None  # ChatGLM3's metadata line is read even then


FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<tool", "\n", " ", "Hi", '{"name": "now", "arguments": {}}',
    '{"name": "get_current_weather", "arguments": {"location": "P}"}}', '{"name": "x"', "}", "<|assistant|>", "now\n",
    "get_current_weather\n", "```python\ntool_call(location='Oslo')\n```", "tool_call(", "interpreter\n", "好",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["hermes", "chatglm3"]),
    st.lists(st.sampled_from(FRAGMENTS), max_size=12),
    st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=8),
)
def test_parsing_does_not_depend_on_how_the_text_is_split(tool_format, fragments, steps):
    text = "".join(fragments)
    whole = PARSERS[tool_format](TOOLS)
    whole_deltas = whole.feed(text) + whole.finish()
    split, deltas, at = PARSERS[tool_format](TOOLS), [], 0
    for n in steps * (len(text) // max(1, sum(steps)) + 1):
        deltas += split.feed(text[at : at + n])
        at += n
    deltas += split.finish()
    for parser, got in ((whole, whole_deltas), (split, deltas)):
        content, arguments = joined(got)
        assert content == (parser.content or "")
        assert [c["function"]["arguments"] for c in parser.tool_calls] == [arguments[i] for i in sorted(arguments)]
    assert split.content == whole.content
    assert [c["function"] for c in split.tool_calls] == [c["function"] for c in whole.tool_calls]


# ---- the ChatGLM3 parser -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_chatglm3_plain_reply_loses_its_empty_metadata_line(step):
    # what the model writes after <|assistant|>: an empty metadata line, then the content (with SentencePiece's space)
    parser = ChatGLM3Parser(TOOLS)
    deltas = run(parser, "\n Hello, I'm ChatGLM3.\n\nHow can I help?\n", step)
    assert joined(deltas)[0] == parser.content == "Hello, I'm ChatGLM3.\n\nHow can I help?"
    assert parser.tool_calls == []


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_chatglm3_call_as_thudm_writes_it(step):
    text = 'get_current_weather\n ```python\ntool_call(location="beijing", unit="celsius")\n```'
    parser = ChatGLM3Parser(TOOLS)
    deltas = run(parser, text, step)
    assert parser.content is None and [d for d in deltas if isinstance(d, ContentDelta)] == []
    first = next(d for d in deltas if isinstance(d, ToolCallDelta))
    assert first.name == "get_current_weather" and CALL_ID.match(first.id)
    assert json.loads(parser.tool_calls[0]["function"]["arguments"]) == {"location": "beijing", "unit": "celsius"}
    assert joined(deltas)[1][0] == parser.tool_calls[0]["function"]["arguments"]


def test_chatglm3_content_then_a_call_in_a_new_turn():
    text = '\n Okay, let me look that up.<|assistant|>get_current_weather\n```python\ntool_call(location="Paris")\n```'
    parser = ChatGLM3Parser(TOOLS)
    run(parser, text, 3)
    assert parser.content == "Okay, let me look that up."
    assert json.loads(parser.tool_calls[0]["function"]["arguments"]) == {"location": "Paris"}


@pytest.mark.parametrize(
    "text",
    [
        "interpreter\n```python\nprint(1)\n```",  # ChatGLM3's code interpreter: not one of the tools
        'get_current_weather\n```python\ntool_call(location=__import__("os").system("touch /tmp/x"))\n```',
        "get_current_weather\n```python\ntool_call(\n```",
        "no metadata line at all, just text",
    ],
)
def test_chatglm3_unknown_or_unsafe_calls_stay_content(text):
    parser = ChatGLM3Parser(TOOLS)
    run(parser, text, 2)
    assert parser.tool_calls == [] and parser.content == text


def test_chatglm3_continued_reply_has_no_metadata_line():
    parser = ChatGLM3Parser(TOOLS, continued=True)
    run(parser, " Paris.\nIt is large.", 2)
    assert parser.content == " Paris.\nIt is large."


def test_chatglm3_call_code_round_trips_through_the_parser():
    args = {"location": "Zürich \"old\" town\n", "days": -3, "ok": True, "none": None, "x": 1.5,
            "tags": ["a", {"b": [False]}], "not-an-identifier": 1}  # fmt: skip
    code = chatglm3_call_code(args)
    assert code.startswith('```python\ntool_call(location="Zürich \\"old\\" town\\n", days=-3, ok=True')
    assert parse_chatglm3_call(code) == args
    assert parse_chatglm3_call("tool_call(a=true, b=null, c=[false])") == {"a": True, "b": None, "c": [False]}


@pytest.mark.parametrize(
    "code",
    ["tool_call(1)", "tool_call(a=b)", "tool_call(a=f())", "other(a=1)", "tool_call(a=1e999)", "tool_call(a=-'x')"],
)
def test_chatglm3_call_parsing_never_evaluates(code):
    with pytest.raises(ValueError):
        parse_chatglm3_call(code)


# ---- ChatGLM3 prompts (golden: THUDM's build_chat_input) ------------------------------------------------------------
@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    folder = make_tiny_chatglm3(tmp_path_factory.mktemp("chatglm3-tools"), "safetensors", shards=1)
    tokenizer = ChatGLM3Tokenizer(folder / "tokenizer.model")
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=256))
    return tokenizer, chat_model_of(chatglm3_loaded(model, tokenizer, folder))


def test_chatglm3_tool_conversation_prompt(glm):
    tok, chat = glm
    messages = [
        {"role": "user", "content": "What's the weather in Beijing today?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_current_weather",
                        "arguments": '{"location": "beijing", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
    ]
    s, e = tok.special, tok.encode
    system = CHATGLM3_TOOL_SYSTEM + "\n" + json.dumps([WEATHER["function"]], indent=4, ensure_ascii=False)
    expected = [s["[gMASK]"], s["sop"], s["<|system|>"], *e("\n"), *e(system)]
    expected += [s["<|user|>"], *e("\n"), *e("What's the weather in Beijing today?")]
    expected += [s["<|assistant|>"], *e("get_current_weather\n")]
    expected += e('```python\ntool_call(location="beijing", unit="celsius")\n```')
    expected += [s["<|observation|>"], *e("\n"), *e('{"temperature": 22}'), s["<|assistant|>"]]
    assert chat.encode_chat(messages, tools=validate_tools([WEATHER])) == expected
    # without tools the same history is still written in ChatGLM3's protocol (tool -> observation)
    assert chat.encode_chat(messages)[2] == s["<|user|>"]
    # a plain conversation is exactly what it was before tools existed
    plain = [{"role": "user", "content": "hello"}]
    assert chat.encode_chat(plain) == [s["[gMASK]"], s["sop"], s["<|user|>"], *e("\n"), *e("hello"), s["<|assistant|>"]]


def test_chatglm3_system_message_is_kept_after_the_tools(glm):
    tok, chat = glm
    ids = chat.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tools=[NOW])
    assert ids.count(tok.special["<|system|>"]) == 2 and tok.decode(ids).rstrip().endswith("hi")


def test_chatglm3_prefill_continues_the_assistant_turn(glm):
    tok, chat = glm
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "The capital is"}]
    ids = chat.encode_chat(messages, continue_final=True)
    assert ids[-len(tok.encode("The capital is")) :] == tok.encode("The capital is")
    assert ids.count(tok.special["<|assistant|>"]) == 1
    with pytest.raises(ConfigError, match="ends with an assistant message"):
        chat.encode_chat([{"role": "user", "content": "hello"}], continue_final=True)


def test_chatglm3_reply_text_shows_a_new_turn_and_parses(glm):
    tok, chat = glm
    s = tok.special
    # a reply as the model would write it: content, a new assistant turn, the call, then <|observation|> (a stop id)
    reply = [*tok.encode("\n"), *tok.encode("hello world"), s["<|assistant|>"], *tok.encode("now\n")]
    reply += tok.encode("```python\ntool_call()\n```")
    text = chat.decode(reply)
    assert "<|assistant|>now\n" in text and "<|user|>" not in text
    detok, parser, deltas = IncrementalDetokenizer(chat.decode), ChatGLM3Parser(TOOLS), []
    for token in reply:  # streamed exactly as the engine streams it
        deltas += parser.feed(detok.push(token))
    deltas += parser.finish()
    assert parser.content == "hello world"
    assert [c["function"] for c in parser.tool_calls] == [{"name": "now", "arguments": "{}"}]


# ---- Hermes prompts with the embedded SmolLM2 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    return load_chat_model(None, dtype="fp32")


def test_embedded_model_samples_as_its_card_recommends(smol):
    """SmolLM2-135M-Instruct's card: temperature 0.2, top_p 0.9 (its GGUF ships no generation_config.json)."""
    assert smol.sampling_defaults == {"temperature": 0.2, "top_p": 0.9}


def test_embedded_model_gets_qwen_style_tools(smol):
    assert isinstance(smol.format, HermesFormat) and not smol.format.native
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "now", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": "12:00"},
        {"role": "tool", "tool_call_id": "d", "content": "sunny"},
    ]
    text = smol.tokenizer.decode(smol.encode_chat(messages, tools=[NOW]))
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "now"}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n12:00\n</tool_response>\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_embedded_model_prefill(smol):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The capital is"}]
    text = smol.tokenizer.decode(smol.encode_chat(messages, continue_final=True))
    assert text.endswith("<|im_start|>assistant\nThe capital is")
    plain = smol.tokenizer.decode(smol.encode_chat(messages[:1]))
    assert plain.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _with_template(smol, template: str):
    tokenizer = copy.deepcopy(smol.tokenizer)
    tokenizer.chat_template = template
    model = SimpleNamespace(
        generation_config=SimpleNamespace(eos_token_id=tokenizer.eos_token_id),
        config=SimpleNamespace(max_position_embeddings=2048),
    )
    return chat_model_of(transformers_loaded(model, tokenizer, "hf", "t", "t"))


def test_template_without_tools_or_chatml_has_no_tool_format(smol):
    chat = _with_template(smol, "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    assert type(chat.format) is TemplateFormat and not chat.format.calls_tools
    assert chat.encode_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ConfigError, match="no tool-calling format"):
        chat.encode_chat([{"role": "user", "content": "hi"}], tools=[NOW])


def test_template_that_renders_tools_gets_them_natively(smol):
    template = (
        "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> answer with <tool_call>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        '{% for c in m.tool_calls or [] %}<tool_call>{{ {"name": c.function.name, "arguments": c.function.arguments}'
        " | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    chat = _with_template(smol, template)
    assert isinstance(chat.format, HermesFormat) and chat.format.native
    call = {"id": "c", "type": "function", "function": {"name": "now", "arguments": '{"tz": "UTC"}'}}
    messages = [{"role": "user", "content": "time?"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    text = chat.tokenizer.decode(chat.encode_chat(messages, tools=[NOW]))
    assert text.startswith('<tools>{"type": "function", "function": {"name": "now"}}</tools>')
    assert '<tool_call>{"name": "now", "arguments": {"tz": "UTC"}}</tool_call>' in text  # arguments as a dict


# ---- forcing a call with a grammar --------------------------------------------------------------------------------
def test_auto_and_none_force_nothing():
    for choice in (None, "auto", "none"):
        assert tool_constraint(TOOLS, choice, "hermes") is None


@pytest.mark.parametrize(
    ("tools", "choice", "fmt", "message"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "hermes", "not among the tools"),
        ([], "required", "hermes", "at least one tool"),
        (TOOLS, "always", "hermes", "tool_choice must be"),
        (TOOLS, "required", None, "no tool-calling format"),
    ],
)
def test_bad_tool_choice(tools, choice, fmt, message):
    with pytest.raises(ConfigError, match=message):
        tool_constraint(tools, choice, fmt)


def _accepts(lltokenizer, hf_tokenizer, grammar: str, text: str) -> bool:
    """Whether llguidance's matcher takes `text` (as SmolLM2 tokens) and is then complete."""
    import llguidance

    matcher = llguidance.LLMatcher(lltokenizer, llguidance.grammar_from("lark", grammar))
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


@pytest.fixture(scope="module")
def lltok(smol):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(smol.tokenizer)


def test_hermes_grammar_takes_the_prompt_format_and_only_allowed_calls(smol, lltok):
    required = tool_constraint(TOOLS, "required", "hermes")
    named = tool_constraint(TOOLS, {"type": "function", "function": {"name": "now"}}, "hermes")
    assert required.kind == "lark"
    weather = hermes_call_text("get_current_weather", {"location": "Paris", "unit": "celsius", "tags": ["x"]})
    now = hermes_call_text("now", {})
    ok = lambda c, t: _accepts(lltok, smol.tokenizer, c.spec, t)  # noqa: E731
    assert ok(required, weather) and ok(required, now) and ok(required, f"{now}\n{weather}")
    assert ok(named, now) and not ok(named, weather) and not ok(named, f"{now}\n{now}")
    single = tool_constraint(TOOLS, "required", "hermes", parallel=False)
    assert ok(single, weather) and not ok(single, f"{now}\n{weather}")
    assert not ok(required, hermes_call_text("get_current_wether", {"location": "Paris"}))
    assert not ok(required, hermes_call_text("get_current_weather", {"unit": "celsius"}))  # location is required
    assert not ok(required, hermes_call_text("get_current_weather", {"location": "P", "unit": "kelvin"}))
    assert not ok(required, "Sure! " + now)


def test_chatglm3_grammar_takes_the_prompt_format_and_only_allowed_calls(smol, lltok):
    required = tool_constraint(TOOLS, "required", "chatglm3")
    ok = lambda t: _accepts(lltok, smol.tokenizer, required.spec, t)  # noqa: E731
    args = {"location": "Paris", "unit": "celsius", "days": 3, "tags": ["a", "b"]}
    golden = "get_current_weather\n" + chatglm3_call_code(args)  # exactly what the prompt writes for a call
    assert ok(golden) and ok(" get_current_weather\n " + chatglm3_call_code({"location": "Paris"}))
    assert ok("now\n" + chatglm3_call_code({}))
    assert not ok("get_current_wether\n" + chatglm3_call_code({"location": "Paris"}))
    assert not ok("get_current_weather\n" + chatglm3_call_code({"unit": "celsius"}))
    assert not ok("get_current_weather\n" + chatglm3_call_code({"location": "Paris", "unit": "kelvin"}))
    assert not ok("\n Sure, the weather is fine.")
    # and what the grammar lets through is what the parser reads back
    parser = ChatGLM3Parser(TOOLS)
    run(parser, golden, 3)
    assert json.loads(parser.tool_calls[0]["function"]["arguments"]) == args


def test_call_arguments_are_json_text_utf8_can_carry():
    """A model that writes the escape \\ud800 (a lone surrogate once parsed): the arguments must still encode as UTF-8
    (they go into JSON responses and SSE events; a raw surrogate made the API answer 500 or cut the stream)."""
    tool = {"type": "function", "function": {"name": "f"}}
    for fmt, text in (
        ("chatglm3", 'f\n```python\ntool_call(city="\\ud800", town="Zürich")\n```'),
        ("hermes", '<tool_call>\n{"name": "f", "arguments": {"city": "\\ud800", "town": "Zürich"}}\n</tool_call>'),
    ):
        parser = PARSERS[fmt]([tool])
        run(parser, text, 4)
        arguments = parser.tool_calls[0]["function"]["arguments"]
        arguments.encode("utf-8")
        assert json.loads(arguments) == {"city": "\ud800", "town": "Zürich"}, fmt


def test_chatglm3_grammar_keeps_argument_order_and_grows_linearly(smol, lltok):
    """Optional arguments before and after a required one, in the schema's order; the grammar for many optional
    arguments stays small (it was quadratic: 1,500 parameters took seconds on the event loop, 5,000 minutes)."""
    props = {k: {"type": "integer"} for k in "abcd"}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": props}}}
    tool["function"]["parameters"]["required"] = ["b"]
    spec = tool_constraint([tool], "required", "chatglm3").spec
    ok = lambda args: _accepts(lltok, smol.tokenizer, spec, "f\n" + chatglm3_call_code(args))  # noqa: E731
    for names in ("b", "ab", "bc", "bd", "abcd", "bcd", "abd"):
        assert ok({k: 1 for k in names}), names
    for names in ("a", "cd", "acd", "ba"):
        assert not ok({k: 1 for k in sorted(names, key=names.index)}), names
    many = {f"p{i}": {"type": "integer"} for i in range(200)}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": many}}}
    assert len(tool_constraint([tool], "required", "chatglm3").spec) < 60_000


def test_chatglm3_grammar_refuses_tools_too_large_to_enforce():
    """A small body must not make the server build a huge grammar (or crash llguidance with a deep rule chain)."""
    many = {f"p{i}": {"type": "integer"} for i in range(5000)}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": many}}}
    with pytest.raises(ConfigError, match="at most 256"):
        tool_constraint([tool], "required", "chatglm3")
    defs = {
        f"d{i}": {"type": "object", "properties": {f"k{j}": {"type": "string"} for j in range(20)}} for i in range(60)
    }
    rich = {f"p{i}": {"type": "array"} for i in range(200)}  # each rich argument's rule carries the $defs
    params = {"type": "object", "$defs": defs, "properties": rich}
    with pytest.raises(ConfigError, match="too large"):
        tool_constraint([{"type": "function", "function": {"name": "f", "parameters": params}}], "required", "chatglm3")


# ---- through the engine: grammar, mask, decode and parser together --------------------------------------------------
def test_tiny_chatglm3_forced_calls_come_back_as_tool_calls(tmp_path):
    from catdog_glm.chat.engine import ChatEngine

    folder = make_tiny_chatglm3(tmp_path / "glm", "safetensors", shards=1, seq_length=2048)  # room for the tools
    chat = load_chat_model(str(folder), dtype="fp32")
    engine = ChatEngine(chat, max_batch_size=2, max_batch_tokens=8192)
    # argument-free functions: random weights, yet every path the grammar leaves ends in a complete call
    tools = validate_tools([NOW, {"type": "function", "function": {"name": "today"}}, WEATHER])
    messages = [{"role": "user", "content": "What is the time?"}]
    try:
        for choice, names in (
            ("required", {"now", "today"}),
            ({"type": "function", "function": {"name": "now"}}, {"now"}),
        ):
            constraint = chat.format.tool_constraint(tools[:2] if choice == "required" else tools, choice)
            reply = engine.chat(
                messages, tools=tools, constraint=constraint, temperature=0.7, seed=1, max_new_tokens=40
            )
            # the engine's reply is already read in the model's format: the call is in tool_calls, no text
            assert reply.finish_reason == "stop" and reply.text == "", reply.text
            assert len(reply.tool_calls) == 1 and reply.tool_calls[0]["function"]["arguments"] == "{}"
            assert reply.tool_calls[0]["function"]["name"] in names
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("tool_format", "text"),
    [
        ("chatglm3", "now\n```python\ntool_call("),
        ("chatglm3", "now\n```python\ntool_call()"),  # parses, yet the limit came before the block's end
        ("hermes", '<tool_call>\n{"name": "now", "arguments": {'),
        ("hermes", '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "n'),
    ],
)
def test_a_call_cut_by_the_token_limit_is_neither_a_call_nor_text(tool_format, text):
    complete = 1 if text.count("</tool_call>") else 0
    parser = PARSERS[tool_format](TOOLS)
    parser.feed(text)
    parser.finish(cut=True)
    assert parser.cut_call and len(parser.tool_calls) == complete and parser.content is None
    whole = PARSERS[tool_format](TOOLS)  # the same text ended by the model itself: as before
    whole.feed(text)
    whole.finish()
    assert not whole.cut_call
