"""serve-chat under concurrent streaming clients: the batching scheduler's aggregate decode tok/s and p50/p95 time to
first token and latency for 1, 4, 16 and 32 clients, on the embedded SmolLM2 with --quantize 4 and in bf16.
The baselines are measured in the same run: one client alone (goal: 16 clients >= 4x its tok/s) and the in-process
engine on the same model (goal: one stream through the API >= 0.9x its decode tok/s).

With a full-size ChatGLM3-6B folder (--fullsize DIR or $CATDOG_FULLSIZE_DIR; benchmarks/fullsize_chatglm3.py builds
a random-weight one) it also runs that model with --quantize 4 at 1 and 8 clients (goal: 8 clients >= 3x one).

    python benchmarks/bench_serve_chat.py [--clients 1,4,16,32] [--max-tokens 64] [--fullsize DIR]
        [--llama-python PYTHON]

With --llama-python (a Python that has llama-cpp-python, see benchmarks/llama_cpp/) llama.cpp runs the same embedded
GGUF file in the same run, one greedy stream with the same thread count, as the peer for one stream through the API.

BENCH_THREADS=N sets torch's threads in every process (default: torch's own choice).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["cat", "dog", "robot", "dragon", "fox", "owl", "whale", "bee"]
PLACES = ["in Paris", "on the moon", "under the sea", "in a library"]


def prompt(i: int) -> list[dict]:
    """Distinct long-answer prompts, so replies run to max_tokens and every client asks something else."""
    return [{"role": "user", "content": f"Write a long story about a {TOPICS[i % 8]} {PLACES[i // 8 % 4]}."}]


IN_PROCESS = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
from catdog_glm.chat.engine import load_engine
model, quantize, max_tokens = sys.argv[2] or None, int(sys.argv[3]) or None, int(sys.argv[4])
messages = json.loads(sys.argv[5])
engine = load_engine(model, quantize=quantize, dtype="bf16")
engine.chat(messages, temperature=0, max_new_tokens=8)  # warm-up
rates = []
for _ in range(3):
    t = time.perf_counter()
    times = []
    gen = engine.stream(messages, temperature=0, max_new_tokens=max_tokens)
    for _piece in gen:
        times.append(time.perf_counter())
    n = gen.reply.completion_tokens
    rates.append((n - 1) / (times[-1] - times[0]))
print(json.dumps({"decode_tok_s": max(rates)}))
"""


def precision_flag() -> str:
    """serve-chat's name for the weights' precision option (--dtype, renamed --precision)."""
    done = subprocess.run(
        [sys.executable, "-m", "catdog_glm", "serve-chat", "--help"], capture_output=True, text=True, env=os.environ
    )
    return "--precision" if "--precision" in done.stdout else "--dtype"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    if os.environ.get("BENCH_THREADS"):
        env["OMP_NUM_THREADS"] = os.environ["BENCH_THREADS"]
    cmd = [sys.executable, "-m", "catdog_glm", "serve-chat", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"`catdog serve-chat {' '.join(args)}` did not start")


def stream_once(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streaming request: time to first token, latency, completion tokens, decode rate after the first token."""
    body = {
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    end = time.perf_counter()
    return {
        "ttft": (first or end) - started,
        "latency": end - started,
        "tokens": tokens,
        "decode_tok_s": (tokens - 1) / (last - first) if first and last and last > first else 0.0,
    }


def wave(url: str, clients: int, max_tokens: int) -> dict:
    """`clients` streaming requests at once: aggregate tok/s over the wave's wall time, per-request timings."""
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        r = stream_once(url, prompt(i), max_tokens)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "agg_tok_s": sum(r["tokens"] for r in results) / wall,
        "ttft": [r["ttft"] for r in results],
        "latency": [r["latency"] for r in results],
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in results),
        "tokens": sum(r["tokens"] for r in results),
    }


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_model(label: str, server_args: list[str], clients: list[int], max_tokens: int) -> list[dict]:
    proc, url = start_server(server_args)
    try:
        stream_once(url, prompt(0), 8)  # warm-up
        # one stream alone, best of 3 as for the in-process engine: the API's own cost, not the machine's noise
        single = max(stream_once(url, prompt(0), max_tokens)["decode_tok_s"] for _ in range(3))
        rows = []
        for n in clients:
            rows.append(wave(url, n, max_tokens) | {"label": label})
            print(f"  {label}: {n} clients done", file=sys.stderr)
        rows[0]["load"] = httpx.get(f"{url}/health").json()
        rows[0]["single_decode_tok_s"] = single
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def in_process(model: str | None, quantize: int | None, max_tokens: int) -> float:
    done = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, str(REPO), model or "", str(quantize or 0), str(max_tokens)]
        + [json.dumps(prompt(0))],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["decode_tok_s"]


def print_table(rows: list[dict]) -> None:
    print(
        f"{'model':24} {'clients':>7} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9} {'lat. p50':>9} "
        f"{'lat. p95':>9} {'per-stream tok/s':>17}"
    )
    for r in rows:
        print(
            f"{r['label']:24} {r['clients']:7d} {r['agg_tok_s']:10.1f} {pct(r['ttft'], 0.5):8.2f}s "
            f"{pct(r['ttft'], 0.95):8.2f}s {pct(r['latency'], 0.5):8.2f}s {pct(r['latency'], 0.95):8.2f}s "
            f"{r['decode_tok_s']:17.1f}"
        )


LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama, llama_get_logits_ith
path, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
chat = b"<|im_start|>user\nTell me a short story about a cat in Paris.<|im_end|>\n<|im_start|>assistant\n"
prompt = llm.tokenize(chat, special=True)
def next_token():
    return int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))))
llm.eval(prompt); token = next_token(); llm.reset()
llm.eval(prompt); token = next_token()
t = time.perf_counter()
for _ in range(new_tokens - 1):
    llm.eval([token]); token = next_token()
print(json.dumps({"decode_tok_s": (new_tokens - 1) / (time.perf_counter() - t)}))
"""


def llama_cpp_tok_s(python: str, max_tokens: int) -> float:
    """llama.cpp's greedy decode tok/s on the embedded GGUF (the file catdog converts), in another Python."""
    from catdog_glm.chat.sources import embedded_model_file

    threads = os.environ.get("BENCH_THREADS") or str(os.cpu_count())
    out = subprocess.run(
        [python, "-c", LLAMA_CHILD, str(embedded_model_file()), str(max_tokens), threads],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"llama.cpp child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["decode_tok_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--configs", default="int4,bf16", help="which embedded-model configurations: int4, bf16")
    parser.add_argument("--fullsize", type=Path, default=os.environ.get("CATDOG_FULLSIZE_DIR") or None)
    parser.add_argument("--fullsize-max-tokens", type=int, default=16)
    parser.add_argument("--llama-python", help="a Python with llama-cpp-python: llama.cpp on the same GGUF")
    args = parser.parse_args()
    llama = llama_cpp_tok_s(args.llama_python, args.max_tokens) if args.llama_python else None
    clients = [int(c) for c in args.clients.split(",")]
    queue = ["--queue-size", str(2 * max(clients))]

    summary = []
    all_rows = []
    precision = precision_flag()
    for config in args.configs.split(","):
        quantize = {"int4": 4, "bf16": None}[config]
        label = f"SmolLM2-135M {config}"
        server_args = [*queue, precision, "bf16"] + (["--quantize", str(quantize)] if quantize else [])
        engine_tok_s = in_process(None, quantize, args.max_tokens)
        rows = run_model(label, server_args, clients, args.max_tokens)
        all_rows += rows
        by_n = {r["clients"]: r for r in rows}
        line = f"{label}: max batch {rows[0]['load'].get('peak_batch', '?')} seen"
        if 1 in by_n and 16 in by_n:
            line += f"; 16 clients / 1 client = {by_n[16]['agg_tok_s'] / by_n[1]['agg_tok_s']:.2f}x (goal >= 4x)"
        if 1 in by_n:
            api = rows[0]["single_decode_tok_s"]
            line += (
                f"; one stream: API {api:.1f} tok/s / in-process engine {engine_tok_s:.1f} tok/s = "
                f"{api / engine_tok_s:.2f}x (goal >= 0.9x)"
            )
            if llama and config == "int4":
                line += f"; API / llama.cpp {llama:.1f} tok/s on the same GGUF = {api / llama:.2f}x (goal >= 1.0x)"
        summary.append(line)

    if args.fullsize and (Path(args.fullsize) / "config.json").is_file():
        label = "ChatGLM3-6B int4"
        rows = run_model(
            label,
            [*queue, "--model", str(args.fullsize), "--quantize", "4"],
            [1, 8],
            args.fullsize_max_tokens,
        )
        all_rows += rows
        summary.append(
            f"{label}: 8 clients / 1 client = {rows[1]['agg_tok_s'] / rows[0]['agg_tok_s']:.2f}x (goal >= 3x)"
        )
    elif args.fullsize:
        summary.append(f"full-size part skipped: {args.fullsize} has no config.json")

    threads = os.environ.get("BENCH_THREADS", "default")
    print(
        f"\nbench_serve_chat: catdog serve-chat, concurrent streaming clients, greedy, up to {args.max_tokens} new "
        f"tokens each ({args.fullsize_max_tokens} for the 6B), torch threads {threads}"
    )
    print_table(all_rows)
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
