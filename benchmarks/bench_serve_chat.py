"""serve-chat under load with the embedded model: requests/s and p50/p95 latency for 16 concurrent non-streaming
clients, and time to first streamed token; beside it, the book's API pattern measured in the same run (a FastAPI
`async def` route calling the model directly, which blocks the event loop and cannot stream).

    python benchmarks/bench_serve_chat.py [--clients 16] [--requests-per-client 2] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

BOOK_SERVER = r"""
import sys, uvicorn
sys.path.insert(0, sys.argv[1])
from fastapi import FastAPI, Request
from catdog_glm.chat.engine import ChatEngine
from catdog_glm.chat.loading import load_chat_model
engine = ChatEngine(load_chat_model(None))
app = FastAPI()

@app.get("/health")
async def health():
    return {"status": "ok"}

@app.post("/chat")
async def chat(request: Request):  # as the book: blocking generation inside async def
    body = await request.json()
    reply = engine.chat([{"role": "user", "content": body["query"]}], temperature=0,
                        max_new_tokens=body.get("max_new_tokens", 32))
    return {"response": reply.text}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server at {url} did not start")


def load(url: str, route: str, make_body, clients: int, per_client: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()

    def client():
        with httpx.Client(timeout=600) as http:
            for _ in range(per_client):
                t = time.perf_counter()
                r = http.post(url + route, json=make_body())
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - started), latencies


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def ttft_stream(url: str, max_tokens: int, runs: int = 5) -> float:
    times = []
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    for _ in range(runs):
        t = time.perf_counter()
        first = None
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():  # read to the end so the next request finds the engine free
                if first is None and line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        first = time.perf_counter() - t
        times.append(first)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    port = free_port()
    ours_url = f"http://127.0.0.1:{port}"
    ours = start(
        [sys.executable, "-m", "catdog_glm", "serve-chat", "--port", str(port), "--queue-size", str(args.clients * 2)],
        ours_url,
    )
    try:
        rps, lat = load(
            ours_url,
            "/v1/chat/completions",
            lambda: {"messages": QUESTION, "temperature": 0, "max_tokens": args.max_tokens},
            args.clients,
            args.requests_per_client,
        )
        ttft = ttft_stream(ours_url, args.max_tokens)
    finally:
        ours.terminate()
        ours.wait(timeout=30)

    port = free_port()
    book_url = f"http://127.0.0.1:{port}"
    book = start([sys.executable, "-c", BOOK_SERVER, str(REPO), str(port)], book_url)
    try:
        book_rps, book_lat = load(
            book_url,
            "/chat",
            lambda: {"query": QUESTION[0]["content"], "max_new_tokens": args.max_tokens},
            args.clients,
            args.requests_per_client,
        )
        t = time.perf_counter()
        httpx.post(
            f"{book_url}/chat", json={"query": QUESTION[0]["content"], "max_new_tokens": args.max_tokens}, timeout=600
        )
        book_first = time.perf_counter() - t  # no streaming: the first token arrives with the last
    finally:
        book.terminate()
        book.wait(timeout=30)

    print(
        f"bench_serve_chat: embedded SmolLM2-135M, {args.clients} concurrent clients x {args.requests_per_client} "
        f"requests, {args.max_tokens} tokens max, greedy"
    )
    print(
        f"catdog serve-chat  {rps:6.2f} req/s   p50 {p(lat, 0.5):6.2f} s   p95 {p(lat, 0.95):6.2f} s   "
        f"first streamed token {ttft * 1e3:6.0f} ms"
    )
    print(
        f"book-style API     {book_rps:6.2f} req/s   p50 {p(book_lat, 0.5):6.2f} s   p95 {p(book_lat, 0.95):6.2f} s   "
        f"first token (no streaming) {book_first * 1e3:6.0f} ms"
    )
    print(f"ratio              {rps / book_rps:6.2f}x req/s   time to first token {book_first / ttft:.1f}x sooner")


if __name__ == "__main__":
    main()
