"""A fake chat model for fast tests (in the manner of simonw/llm's MockModel): its replies are scripted, yet every
token goes through the real scheduler, sampler, constraint mask and streaming, in milliseconds.

- Vocabulary: ids 0..255 are the bytes, then `<|endoftext|>` (eos), `<|im_start|>`, `<|im_end|>`.
- Prompts are ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`, then `<|im_start|>assistant\\n`); tools are written
  into the system turn and tool calls / results as Qwen2.5 writes them (a `HermesFormat` that renders with it).
- The model's forward puts the highest logit (10) on the next byte of the scripted reply, the second highest (5) on
  another byte ("x", or "y" where the reply has an "x"), 0 elsewhere, and eos on top once the script is done.
- The script is a function of the prompt's text: by default, when the last user turn (or a plain-text prompt)
  contains "reply: ", the text after it, verbatim (tool calls, JSON, anything); otherwise "Hello! You said: " and that
  turn. Pass `script=` for anything else.

    chat = fake_chat_model()                       # a ChatModel
    ChatEngine(chat).chat([{"role": "user", "content": "reply: hi"}], temperature=0).text == "hi"
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from types import SimpleNamespace

import torch

from catdog_glm.chat.formats import HermesFormat
from catdog_glm.chat.loading import ChatModel

EOS, IM_START, IM_END = 256, 257, 258
SPECIALS = {EOS: "<|endoftext|>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"}
VOCAB_SIZE = 259
TOP, SECOND = 10.0, 5.0


def default_script(prompt: str) -> str:
    """The reply to a rendered prompt: see the module docstring."""
    turn = prompt
    start = prompt.rfind("<|im_start|>user\n")
    if start >= 0:
        turn = prompt[start + len("<|im_start|>user\n") :].split("<|im_end|>", 1)[0]
    if "reply: " in turn:
        return turn.split("reply: ", 1)[1]
    return f"Hello! You said: {turn}"


class FakeTokenizer:
    """Byte-level tokenizer with three special tokens; `token_bytes()` is what constrained decoding reads."""

    eos_token_id = EOS
    all_special_ids = sorted(SPECIALS)
    vocab_size = VOCAB_SIZE

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [SPECIALS[i].encode() for i in sorted(SPECIALS)]

    def encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))  # a lone surrogate raises UnicodeEncodeError, as a real tokenizer may

    def decode(self, ids: list[int]) -> str:
        """Text of the ids; special tokens never leak into it; half a UTF-8 character decodes to U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def render(self, ids: list[int]) -> str:
        """The prompt as text, special tokens included (what the script reads)."""
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            else:
                out += [run.decode("utf-8", errors="replace"), SPECIALS.get(i, "")]
                run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def encode_chat(self, messages: list[dict], tools: list | None = None, continue_final: bool = False) -> list[int]:
        messages = list(messages)
        if tools:
            described = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
            system = (
                "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                f"<tools>\n{described}\n</tools>\n\nFor each function call, return a json object with function "
                'name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
                '"arguments": <args-json-object>}\n</tool_call>'
            )
            if messages and messages[0].get("role") == "system":
                system = f"{messages[0].get('content') or ''}\n\n{system}"
                messages = messages[1:]
            messages = [{"role": "system", "content": system}, *messages]
        ids: list[int] = []
        for n, m in enumerate(messages):
            role, content = m.get("role"), m.get("content") or ""
            if role == "tool":
                role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
            for call in m.get("tool_calls") or []:
                fn = call.get("function", call)
                arguments = fn.get("arguments", {})
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments or "{}")
                    except ValueError:
                        pass  # written as it came
                call_json = json.dumps({"name": fn.get("name"), "arguments": arguments}, ensure_ascii=False)
                content += f"<tool_call>\n{call_json}\n</tool_call>"
            ids += [IM_START, *self.encode_text(f"{role}\n{content}")]
            if continue_final and n == len(messages) - 1:
                return ids  # the last (assistant) message goes on
            ids += [IM_END, *self.encode_text("\n")]
        return [*ids, IM_START, *self.encode_text("assistant\n")]


class FakeFormat(HermesFormat):
    """Hermes tool calls, with the fake tokenizer's own ChatML rendering (it has no Jinja template)."""

    def __init__(self, tokenizer: FakeTokenizer):
        super().__init__(tokenizer, native=False)

    def encode(self, messages: list[dict], tools: list | None = None, continue_final: bool = False) -> list[int]:
        return self.tokenizer.encode_chat(messages, tools, continue_final)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


class FakeLM(torch.nn.Module):
    """Scripted logits. No attention interface, so the scheduler runs it one request per forward with a cache
    object of its own, which keys the request's state here: the script and the tokens made since the prompt."""

    def __init__(self, tokenizer: FakeTokenizer, script: Callable[[str], str]):
        super().__init__()
        self.tokenizer, self.script = tokenizer, script
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so parameters() and .to() work
        self.config = SimpleNamespace(
            num_attention_heads=1, num_key_value_heads=1, head_dim=1, num_hidden_layers=1, hidden_size=1
        )
        self._state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.calls = 0  # forwards run (tests can check that a request ran)

    def scripted_logits(self, script: bytes, position: int) -> torch.Tensor:
        row = torch.zeros(VOCAB_SIZE)
        top = script[position] if position < len(script) else EOS
        row[top] = TOP
        row[ord("y") if top == ord("x") else ord("x")] = SECOND
        return row

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=1, **_):
        self.calls += 1
        ids = input_ids[0].tolist()
        state = self._state.get(past_key_values) if past_key_values is not None else None
        if state is None:  # the prompt: read it and fix the script
            state = {"script": self.script(self.tokenizer.render(ids)).encode("utf-8"), "made": 0}
            if past_key_values is not None:
                self._state[past_key_values] = state
        else:  # one generated token fed back
            state["made"] += 1
        row = self.scripted_logits(state["script"], state["made"])
        return SimpleNamespace(logits=row.view(1, 1, -1))


def fake_chat_model(script: Callable[[str], str] | None = None, *, context_window: int = 4096) -> ChatModel:
    """A ChatModel over the fake tokenizer and scripted model (see the module docstring)."""
    tokenizer = FakeTokenizer()
    model = FakeLM(tokenizer, script or default_script).eval()
    return ChatModel(
        name="fake-chat",
        source="tests/fake_chat.py",
        kind="fake",
        model=model,
        format=FakeFormat(tokenizer),
        stop_ids={EOS, IM_END},
        context_window=context_window,
        device=torch.device("cpu"),
        dtype=torch.float32,
        parameters=1,
        tokenizer=tokenizer,
        encode_text=tokenizer.encode_text,
    )
