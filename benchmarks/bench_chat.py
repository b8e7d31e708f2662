"""Chat speed on the embedded SmolLM2-135M-Instruct: load time, time to first token, decode tokens/s, peak RSS.

Each configuration runs in its own process (so peak RSS is its own): transformers' plain `generate()` in bf16
as the naive baseline, then catdog's ChatEngine in bf16, int8 and int4 weight-only, the quantized ones both with
catdog's CPU kernels and with torch's (CATDOG_KERNELS=0). Same prompt, greedy, same number of new tokens, same
machine, one run.

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
QUALITY_PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Explain in one sentence what a neural network is.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me a tip for learning Python.",
    "What do cats like to eat?",
    "Translate 'good morning' into French.",
]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
mode, new_tokens = sys.argv[2].removesuffix("-torch"), int(sys.argv[3])
kernels_mode = sys.argv[2]
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
from catdog_glm.chat.quantize import greedy_agreement, weight_bytes
weights = weight_bytes(chat.model)
agreement = None
if mode in ("int8", "int4"):  # quality: greedy next-token agreement with the unquantized model
    from catdog_glm.chat.engine import ChatEngine
    reference = ChatEngine(load_chat_model(None))
    prompts = [[{"role": "user", "content": q}] for q in json.loads(sys.argv[5])]
    sequences, starts = [], []
    for p in prompts:
        ids = reference.model.encode_chat(p)
        reply = reference.chat(p, temperature=0, max_new_tokens=32)
        cont = reference.model.encode_chat(p + [{"role": "assistant", "content": reply.text}])
        sequences.append(cont)
        starts.append(len(ids))
    agreement = greedy_agreement(reference.model.model, chat.model, sequences, starts)
print(json.dumps({"mode": kernels_mode, "load_s": load_s, "ttft_ms": ttft * 1e3, "decode_tps": decode, "tokens": n,
                  "peak_rss_mib": rss, "weight_mib": weights / 2**20, "agreement": agreement}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    results = []
    import os

    from catdog_glm.chat import kernels

    status = kernels.status()
    print(f"CPU: {status['cpu']}; catdog kernel path: {status['path'] or 'none (' + str(status['why_not']) + ')'}")
    for mode in ("generate", "bf16", "int8-torch", "int8", "int4-torch", "int4"):
        env = dict(os.environ, CATDOG_KERNELS="0" if mode.endswith("-torch") else "1")
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(REPO),
                mode,
                str(args.new_tokens),
                json.dumps(PROMPT),
                json.dumps(QUALITY_PROMPTS),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode != 0:
            print(f"{mode}: failed\n{done.stderr[-2000:]}")
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"bench_chat: SmolLM2-135M-Instruct (embedded GGUF), greedy, {args.new_tokens} new tokens")
    print(
        f"{'configuration':28s} {'load s':>7s} {'TTFT ms':>8s} {'decode tok/s':>13s} {'peak RSS MiB':>13s} "
        f"{'weights MiB':>12s} {'agreement':>10s}"
    )
    names = {
        "generate": "transformers generate() bf16",
        "bf16": "catdog engine bf16",
        "int8-torch": "catdog int8, torch kernel",
        "int8": "catdog int8, own kernel",
        "int4-torch": "catdog int4, torch kernel",
        "int4": "catdog int4, own kernel",
    }
    for r in results:
        agreement = f"{r['agreement']:.1%}" if r["agreement"] is not None else "-"
        print(
            f"{names[r['mode']]:28s} {r['load_s']:7.1f} {r['ttft_ms']:8.0f} {r['decode_tps']:13.1f} "
            f"{r['peak_rss_mib']:13.0f} {r['weight_mib']:12.0f} {agreement:>10s}"
        )
    base = next((r for r in results if r["mode"] == "generate"), None)
    bf16 = next((r for r in results if r["mode"] == "bf16"), None)
    if base:
        for r in results:
            if r is not base:
                print(
                    f"ratio {names[r['mode']]:22s} decode {r['decode_tps'] / base['decode_tps']:.2f}x vs generate()"
                    + (f", weights {r['weight_mib'] / bf16['weight_mib']:.2f}x of bf16" if bf16 else "")
                )
    by_mode = {r["mode"]: r for r in results}
    for bits in ("int8", "int4"):
        if bits in by_mode and f"{bits}-torch" in by_mode:
            ratio = by_mode[bits]["decode_tps"] / by_mode[f"{bits}-torch"]["decode_tps"]
            print(f"ratio {bits} own kernel vs torch's kernel: decode {ratio:.2f}x")


if __name__ == "__main__":
    main()
