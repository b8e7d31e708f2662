"""ChatGLM3-6B at the size users run: load time (first and cached), peak memory, weight size, prefill and decode speed
in bf16, int8 and int4, each against the memory-bandwidth ceiling measured in the same run, and llama.cpp (Q4_0) on
the same model when a GGUF of it is given.

The model is the full-size random ChatGLM3-6B in THUDM's published layout (benchmarks/fullsize_chatglm3.py builds it
once, 12.5 GB, about 2 minutes). Each configuration runs in its own process, so each peak RSS is its own. Not part of
`make test` or `make bench` (too big): run it by hand.

    python benchmarks/bench_chat_fullsize.py [--model DIR] [--modes bf16,int8,int4] [--llama-gguf FILE.gguf]

The Q4_0 GGUF for --llama-gguf comes from benchmarks/llama_cpp/ (llama.cpp's own converter, with ChatGLM3's
vocabulary read from tokenizer.model, then llama.cpp's quantizer); run with --llama-python set to a Python that has
llama-cpp-python.

Decode is bound by reading every weight once per token, so `ceiling tok/s = read GiB/s / weight GiB` is the best any
implementation can do here; `of ceiling` says how close each one gets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import fullsize_chatglm3  # noqa: E402

PREFILL_TOKENS = 256
# llama.cpp as measured on a quiet 2-core Intel Xeon (AVX-512 VNNI/BF16, AMX) on 2026-12-03 with llama-cpp-python
# 0.3.36 built without AMX (see benchmarks/llama_cpp/), Q4_0, 2 threads, used when no GGUF is given: load s, peak RSS
# GiB, weights GiB, decode tok/s, prefill tok/s. Pass --llama-gguf for a side-by-side run.
LLAMA_CPP_QUOTED = {
    "load_s": 4.0,
    "peak_rss_gib": 6.41,
    "weight_gib": 3.34,
    "decode_tok_s": 4.22,
    "prefill_tok_s": 22.3,
}

BANDWIDTH_CHILD = r"""
import json, time, torch
torch.set_num_threads(int(__import__("os").environ.get("BENCH_THREADS", "2")))
x = torch.ones(2 * 2**30 // 4)  # 2 GiB of fp32
x.sum()
times = []
for _ in range(7):
    t = time.perf_counter(); x.sum(); times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"read_gib_s": 2 / times[len(times) // 2]}))
"""

CATDOG_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
model_dir, mode, use_cache = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
new_tokens, prefill = int(sys.argv[5]), int(sys.argv[6])
import torch
from catdog_glm.chat.loading import load_chat_model
started = time.perf_counter()
chat = load_chat_model(model_dir, dtype="bf16", quantize={"int8": 8, "int4": 4}.get(mode), use_cache=use_cache)
load_s = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
from catdog_glm.chat.engine import ChatEngine
engine = ChatEngine(chat)
chat.stop_ids = set()  # random weights: decode exactly new_tokens tokens
prompt = [{"role": "user", "content": "hello"}]
engine.chat(prompt, temperature=0, max_new_tokens=2)  # warm-up
with torch.inference_mode():
    ids = torch.randint(10, 400, (1, prefill))
    chat.model(input_ids=ids[:, :16], logits_to_keep=1)
    t = time.perf_counter()
    chat.model(input_ids=ids, logits_to_keep=1)
    prefill_s = time.perf_counter() - t
# random weights often make tokens with no visible text, so time tokens, not text pieces: decode = the tokens after
# the first over the time after the first (a 1-token reply's time)
t = time.perf_counter()
engine.chat(prompt, temperature=0, max_new_tokens=1)
first_token_s = time.perf_counter() - t
t = time.perf_counter()
reply = engine.chat(prompt, temperature=0, max_new_tokens=new_tokens)
decode = (reply.completion_tokens - 1) / max(time.perf_counter() - t - first_token_s, 1e-9)
# where a decode step's time goes: a plain forward with transformers' cache, profiled per op (self CPU time)
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache
groups = {"int4 matmul": ("_weight_int4pack", "catdog::q4_linear"),
          "int8 matmul": ("_weight_int8pack", "catdog::q8_linear"),
          "dense matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "attention": ("scaled_dot_product",)}
with torch.inference_mode():
    cache = DynamicCache()
    chat.model(input_ids=ids[:, :32], use_cache=True, cache=cache, logits_to_keep=1)
    token = torch.tensor([[5]])
    chat.model(input_ids=token, use_cache=True, cache=cache, logits_to_keep=1)
    steps = 4
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            chat.model(input_ids=token, use_cache=True, cache=cache, logits_to_keep=1)
    wall_ms = (time.perf_counter() - t) * 1000 / steps
breakdown = dict.fromkeys(groups, 0.0)
ops = 0
for event in prof.key_averages():
    if event.key.startswith("aten::"):
        ops += event.count
    for group, keys in groups.items():
        if any(k in event.key for k in keys):
            breakdown[group] += event.self_cpu_time_total / 1000 / steps
            break
breakdown = {k: round(v, 1) for k, v in breakdown.items() if v}
breakdown["everything else"] = round(wall_ms - sum(breakdown.values()), 1)
print(json.dumps({
    "load_s": load_s, "peak_rss_gib": peak, "weight_gib": chat.info["weight_bytes"] / 2**30,
    "from_cache": bool(chat.info.get("conversion_cache")), "prefill_tok_s": prefill / prefill_s, "decode_tok_s": decode,
    "step_ms": {"profiled step (wall)": round(wall_ms, 1), **breakdown}, "aten_ops_per_step": ops // steps,
}))
"""

LLAMA_CHILD = r"""
import json, resource, sys, time
import numpy as np
from llama_cpp import Llama, llama_get_logits_ith
path, new_tokens, prefill, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512, verbose=False)
load_s = time.perf_counter() - t
rng = np.random.default_rng(0)
tokens = [int(x) for x in rng.integers(10, 400, prefill)]
llm.eval(tokens[:16]); llm.reset()  # warm-up
def next_token():  # greedy, from the last logits (llm.scores is not filled without logits_all)
    return int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))))
t = time.perf_counter(); llm.eval(tokens); prefill_s = time.perf_counter() - t
token = next_token()
t = time.perf_counter()
for _ in range(new_tokens - 1):
    llm.eval([token]); token = next_token()
decode = (new_tokens - 1) / (time.perf_counter() - t)
print(json.dumps({
    "load_s": load_s, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    "weight_gib": __import__("os").path.getsize(path) / 2**30,
    "prefill_tok_s": prefill / prefill_s, "decode_tok_s": decode,
}))
"""


def run_child(code: str, *args: str, python: str = sys.executable, env: dict | None = None) -> dict:
    out = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def needs_build(model_dir: Path) -> bool:
    if model_dir == fullsize_chatglm3.DEFAULT_DIR:
        return not (model_dir / ".complete").is_file()
    return not (model_dir / "config.json").is_file()


def enough_room(model_dir: Path) -> str | None:
    import psutil

    free = shutil.disk_usage(model_dir.parent if not model_dir.exists() else model_dir).free
    ram = psutil.virtual_memory().total
    if needs_build(model_dir) and free < 40e9:
        return f"skipped: {free / 1e9:.0f} GB free disk, the full-size model and its caches need 40 GB"
    if ram < 20 * 2**30:
        return f"skipped: {ram / 2**30:.0f} GiB RAM, loading the 6B model in bf16 needs 20 GiB"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=fullsize_chatglm3.DEFAULT_DIR)
    parser.add_argument("--modes", default="bf16,int8,int4")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--llama-gguf", type=Path, help="a Q4_0 GGUF of the same model, run with llama-cpp-python")
    parser.add_argument("--llama-python", default=sys.executable, help="the Python that has llama_cpp installed")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    reason = enough_room(args.model)
    if reason:
        print(reason)
        return
    if needs_build(args.model):
        print(f"building/checking the full-size random ChatGLM3-6B in {args.model} ...", file=sys.stderr)
        fullsize_chatglm3.build(args.model)
    bandwidth = run_child(BANDWIDTH_CHILD)["read_gib_s"]
    rows: list[tuple[str, dict]] = []
    sys.path.insert(0, str(REPO))
    from catdog_glm.chat.kernels import kernels_root

    # the kernels `make install` built stay in use (a user's first load does not compile them either)
    os.environ.setdefault("CATDOG_KERNELS_DIR", str(kernels_root()))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CATDOG_CACHE_DIR"] = cache  # first loads convert, second loads read this run's conversions
        for label in args.modes.split(","):
            # "int4-torch": the same layers with torch's kernels (CATDOG_KERNELS=0), in their own cache entry
            mode = label.removesuffix("-torch")
            env = dict(os.environ, CATDOG_KERNELS="0" if label.endswith("-torch") else "1")
            child = (str(REPO), str(args.model), mode, "1", str(args.new_tokens), "256")
            first = run_child(CATDOG_CHILD, *child, env=env)
            rows.append((f"catdog {label}", first))
            if mode != "bf16":
                cached = run_child(CATDOG_CHILD, *child, env=env)
                assert cached["from_cache"], "the second load did not come from the conversion cache"
                first["cached_load_s"] = cached["load_s"]
                first["cached_peak_rss_gib"] = cached["peak_rss_gib"]
                first["decode_tok_s"] = max(first["decode_tok_s"], cached["decode_tok_s"])
                first["prefill_tok_s"] = max(first["prefill_tok_s"], cached["prefill_tok_s"])
    if args.llama_gguf:
        llama = run_child(
            LLAMA_CHILD, str(args.llama_gguf), str(args.new_tokens), "256", str(args.threads), python=args.llama_python
        )
        rows.append(("llama.cpp Q4_0", llama))
    else:
        rows.append(("llama.cpp Q4_0 (quoted)", dict(LLAMA_CPP_QUOTED)))
    reference = rows[-1][1]

    from catdog_glm.chat import kernels

    status = kernels.status()
    from catdog_glm.device import cpu_flags

    flags = " ".join(f for f in kernels.RELEVANT_FLAGS if f in cpu_flags())
    print(f"\nCPU: {status['cpu']} ({flags}); catdog kernel path: {status['path'] or status['why_not']}")
    print(f"ChatGLM3-6B full size (random weights), {args.threads} threads; read bandwidth {bandwidth:.1f} GiB/s")
    header = (
        f"{'':26} {'load s':>7} {'cached s':>8} {'peak GiB':>8} {'weights':>8} {'prefill/s':>9} {'decode/s':>9}"
        f" {'ceiling':>8} {'of ceil.':>8} {'vs llama':>8}"
    )
    print(header)
    for name, r in rows:
        ceiling = bandwidth / r["weight_gib"]
        cached = f"{r['cached_load_s']:8.1f}" if "cached_load_s" in r else f"{'-':>8}"
        print(
            f"{name:26} {r['load_s']:7.1f} {cached} {r['peak_rss_gib']:8.2f} {r['weight_gib']:8.2f}"
            f" {r['prefill_tok_s']:9.1f} {r['decode_tok_s']:9.2f} {ceiling:8.1f} {r['decode_tok_s'] / ceiling:8.0%}"
            f" {r['decode_tok_s'] / reference['decode_tok_s']:7.2f}x"
        )
    print("\nWhere one decode step goes (ms, profiled, self CPU time per op group):")
    for name, r in rows:
        if "step_ms" in r:
            parts = ", ".join(f"{k} {v}" for k, v in r["step_ms"].items())
            print(f"  {name}: {parts}; {r['aten_ops_per_step']} aten ops")
    int4 = dict(rows).get("catdog int4")
    if int4:
        print(
            f"\nint4 vs llama.cpp: decode {int4['decode_tok_s'] / reference['decode_tok_s']:.2f}x, prefill "
            f"{int4['prefill_tok_s'] / reference['prefill_tok_s']:.2f}x; "
            f"peak load memory {int4['peak_rss_gib']:.2f} GiB "
            f"(budget 6), cached load {int4.get('cached_load_s', float('nan')):.1f} s (budget 5)"
        )


if __name__ == "__main__":
    main()
