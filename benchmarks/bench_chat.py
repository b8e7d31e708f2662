"""Chat speed on the embedded SmolLM2-135M-Instruct: load time, time to first token, decode tokens/s, peak RSS.

Each configuration runs in its own process (so peak RSS is its own): transformers' plain `generate()` in bf16
as the naive baseline, then catdog's ChatEngine in bf16, int8 and int4 weight-only. Same prompt, greedy, same
number of new tokens, same machine, one run.

    python benchmarks/bench_chat.py [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Write a short paragraph about why cats and dogs make good pets."}]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
mode, new_tokens = sys.argv[2], int(sys.argv[3])
prompt = json.loads(sys.argv[4])
import torch
from catdog_glm.chat.loading import load_chat_model
started = time.perf_counter()
chat = load_chat_model(None, quantize={"int8": 8, "int4": 4}.get(mode))
load_s = time.perf_counter() - started
if mode == "generate":
    ids = torch.tensor([chat.encode_chat(prompt)])
    chat.model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    t = time.perf_counter()
    chat.model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    out = chat.model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    n = out.shape[1] - ids.shape[1]
    decode = (n - 1) / max(time.perf_counter() - t - ttft, 1e-9)
else:
    from catdog_glm.chat.engine import ChatEngine
    engine = ChatEngine(chat)
    engine.chat(prompt, temperature=0, max_new_tokens=4)  # warm-up
    chat.stop_ids = set()  # measure exactly new_tokens tokens
    t = time.perf_counter()
    first = None
    n = 0
    gen = engine.stream(prompt, temperature=0, max_new_tokens=new_tokens)
    for _ in gen:
        first = first or time.perf_counter()
    total = time.perf_counter() - t
    n = gen.reply.completion_tokens
    ttft = (first or time.perf_counter()) - t
    decode = (n - 1) / max(total - ttft, 1e-9)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"mode": mode, "load_s": load_s, "ttft_ms": ttft * 1e3, "decode_tps": decode, "tokens": n,
                  "peak_rss_mib": rss}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    results = []
    for mode in ("generate", "bf16", "int8", "int4"):
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(REPO), mode, str(args.new_tokens), json.dumps(PROMPT)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-2000:]}")
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"bench_chat: SmolLM2-135M-Instruct (embedded GGUF), greedy, {args.new_tokens} new tokens")
    print(f"{'configuration':28s} {'load s':>7s} {'TTFT ms':>8s} {'decode tok/s':>13s} {'peak RSS MiB':>13s}")
    names = {
        "generate": "transformers generate() bf16",
        "bf16": "catdog engine bf16",
        "int8": "catdog engine int8",
        "int4": "catdog engine int4",
    }
    for r in results:
        print(
            f"{names[r['mode']]:28s} {r['load_s']:7.1f} {r['ttft_ms']:8.0f} {r['decode_tps']:13.1f} "
            f"{r['peak_rss_mib']:13.0f}"
        )
    base = next((r for r in results if r["mode"] == "generate"), None)
    if base:
        for r in results:
            if r is not base:
                print(f"ratio {names[r['mode']]:22s} decode {r['decode_tps'] / base['decode_tps']:.2f}x vs generate()")


if __name__ == "__main__":
    main()
