"""What structured output costs: decode speed of JSON-schema-constrained and forced-tool-call replies against the
same model's plain replies, on the embedded SmolLM2-135M-Instruct, greedy, one request at a time, same machine, same
run. Each mode runs `--runs` times; medians are printed, with the ratio to plain decoding and the time llguidance
takes to compute one step's mask (its share of a step).

    python benchmarks/bench_constrained.py [--new-tokens 48] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog"]}},
    },
    "required": ["name", "age", "pets"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def decode_rate(engine, messages, new_tokens: int, **options) -> tuple[float, int]:
    """(tokens/s from the first token to the last, tokens) of one greedy reply, timed by watching the token count
    from this thread (every 2 ms): the prompt's prefill is left out, and tokens that have no text yet (random
    weights) count too."""
    generation = engine.stream(messages, temperature=0, max_new_tokens=new_tokens, **options)
    while generation.completion_tokens < 1 and generation.reply is None and generation.error is None:
        time.sleep(0.002)
    first, counted = time.perf_counter(), generation.completion_tokens
    while generation.reply is None and generation.error is None:
        time.sleep(0.002)
    seconds = time.perf_counter() - first
    if generation.error is not None:
        raise generation.error
    tokens = generation.reply.completion_tokens
    return (tokens - counted) / max(seconds, 1e-9), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=None, help="a model path or id (default: the embedded SmolLM2)")
    parser.add_argument("--quantize", type=int, choices=(4, 8), default=None)
    args = parser.parse_args()

    import torch

    from catdog_glm.chat import constrained
    from catdog_glm.chat.constrained import Constraint
    from catdog_glm.chat.engine import ChatEngine
    from catdog_glm.chat.loading import load_chat_model

    started = time.perf_counter()
    chat = load_chat_model(args.model, quantize=args.quantize)
    load_s = time.perf_counter() - started
    engine = ChatEngine(chat, max_batch_size=4)
    person = [{"role": "user", "content": "Describe a pet owner as JSON with name, age and pets."}]
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    modes = {
        "plain": (person, {}),
        "json_schema": (person, {"constraint": Constraint("json_schema", SCHEMA)}),
        "tool_call": (
            weather,
            {"tools": [WEATHER], "constraint": chat.format.tool_constraint([WEATHER], "required")},
        ),
    }
    for messages, options in modes.values():  # warm-up: compiles and caches each grammar
        engine.chat(messages, temperature=0, max_new_tokens=4, **options)
    print(
        f"bench_constrained: {chat.name}, {str(chat.dtype).replace('torch.', '')}, weights {chat.quantization},"
        f" {torch.get_num_threads()} threads,"
        f" greedy, up to {args.new_tokens} new tokens, {args.runs} runs per mode; loaded in {load_s:.1f} s"
    )
    stop_ids = chat.stop_ids
    speed: dict[str, float] = {}
    for name, (messages, options) in modes.items():
        rates, counts = [], []
        chat.stop_ids = set() if name == "plain" and args.model else stop_ids  # random weights stop at random
        for _ in range(args.runs):
            rate, tokens = decode_rate(engine, messages, args.new_tokens, **options)
            rates.append(rate)
            counts.append(tokens)
        speed[name] = statistics.median(rates)
        runs = ", ".join(f"{r:.1f}" for r in rates)
        print(f"  {name:12s} decode {speed[name]:6.1f} tok/s (runs: {runs}; tokens: {counts[0]})")

    # llguidance's own cost: one step's mask, measured alone on the schema's matcher
    state = constrained.compile(chat, Constraint("json_schema", SCHEMA)).start()
    row = torch.zeros(chat.model.config.vocab_size)
    times = []
    for _ in range(50):
        t = time.perf_counter()
        state.allowed(row)
        times.append(time.perf_counter() - t)
    mask_ms = statistics.median(times) * 1000
    step_ms = 1000 / speed["plain"]
    print(f"  mask per step {mask_ms:.2f} ms median ({mask_ms / step_ms:.1%} of a plain decode step)")
    for name in ("json_schema", "tool_call"):
        print(f"ratio {name} / plain decode speed: {speed[name] / speed['plain']:.2f}x")
    engine.close()


if __name__ == "__main__":
    main()
