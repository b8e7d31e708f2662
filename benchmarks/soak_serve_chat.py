"""Soak test of a live `catdog serve-chat`: thousands of mixed requests (valid, malformed, streamed, cancelled
mid-stream, constrained, tools, logprobs, the book's /chat), `--concurrency` at a time, within a bounded time.

Passes (exit 0) when no request got a 5xx, none got an unexpected status (a malformed request answered 2xx, a valid
one 4xx, a stream that ended without [DONE] or with an error event, a client timeout), the server's RSS (its
children included) grew by at most --max-rss-growth MB between the end of the warm-up and the end, the scheduler
drained (nothing running or waiting once the clients are done) and the server still answers /health and a chat.

    python benchmarks/soak_serve_chat.py [--requests 3000] [--duration 1800] [--concurrency 8] [--seed 0]
        [--model MODEL] [--quantize 4] [--warmup 0.1] [--max-rss-growth 50] [--kinds chat,bad_json,...]
        [--json PATH]

--quantize 0 serves unquantized weights. BENCH_THREADS=N sets torch's threads in the server (as bench_serve_chat.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

try:
    import psutil
except ImportError:  # RSS from /proc instead (Linux)
    psutil = None

REPO = Path(__file__).resolve().parents[1]
CHAT, COMPLETIONS, BOOK = "/v1/chat/completions", "/v1/completions", "/chat"
WORDS = ["cat", "dog", "robot", "dragon", "fox", "owl", "whale", "bee", "Paris", "the moon", "a library", "the sea"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}
PET_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "kind": {"type": "string", "enum": ["cat", "dog"]}},
    "required": ["name", "kind"],
    "additionalProperties": False,
}


@dataclass
class Req:
    """One request to send: `expect` is "ok" (2xx) or "4xx"; `mode` plain, stream or cancel (close after a chunk)."""

    kind: str
    method: str
    path: str
    expect: str = "ok"
    mode: str = "plain"
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def ask(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about a {rng.choice(WORDS)} and {rng.choice(WORDS)}."}]


def sampled(rng: random.Random, low: int = 1, high: int = 16) -> dict:
    return {"max_tokens": rng.randint(low, high), "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 999)}


def chat(rng: random.Random, kind: str, mode: str = "plain", **extra: Any) -> Req:
    body = {"messages": ask(rng), **sampled(rng), **extra}
    if mode != "plain":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return Req(kind, "POST", CHAT, mode=mode, json=body)


HI = [{"role": "user", "content": "Hi"}]
BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "wibble"}}}
# malformed kind -> (weight, variants); a variant is a body (POST /v1/chat/completions), raw bytes sent as JSON, or
# (method, path, body). Each must be answered with a 4xx.
MALFORMED: dict[str, tuple[float, list]] = {
    "bad_json": (2, [b'{"messages": [{"role": "user", "content": "Hi"', b"", b"\xff\xfe{}"]),
    "wrong_types": (
        2,
        [
            {"messages": "Hi"},
            {"messages": HI, "max_tokens": "ten"},
            {"messages": HI, "temperature": "hot"},
            {"messages": [{"role": "user", "content": 42}]},
            [1, 2, 3],
        ],
    ),
    "out_of_range": (
        2,
        [
            {"messages": HI, "temperature": 5},
            {"messages": HI, "top_p": 0},
            {"messages": HI, "logprobs": True, "top_logprobs": 50},
            {"messages": HI, "seed": 2**70},
            {"messages": HI, "stop": ["a", "b", "c", "d", "e"]},
            {"messages": HI, "max_tokens": 0},
            {"messages": HI, "presence_penalty": 3},
            b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        ],
    ),
    "unknown_role": (2, [{"messages": [{"role": "wizard", "content": "Hi"}]}]),
    "empty_messages": (2, [{"messages": []}]),
    "oversize_body": (1, []),  # built from --max-body
    "huge_max_tokens": (2, [{"messages": HI, "max_tokens": 10**6}, {"messages": HI, "max_completion_tokens": 10**6}]),
    "bad_tool_schema": (
        2,
        [
            {"messages": HI, "tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]},
            {"messages": HI, "tools": [{"type": "function", "function": {"name": "f", "parameters": "a schema"}}]},
            {"messages": HI, "tools": [BAD_TOOL], "tool_choice": "required"},
            {"messages": HI, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            {"messages": HI, "tool_choice": "required"},
        ],
    ),
    "n_over_limit": (1, [{"messages": HI, "n": 9}, ("POST", COMPLETIONS, {"prompt": "Hi", "n": 9})]),
    "unsupported": (
        1,
        [{"messages": HI, "functions": [WEATHER["function"]]}, ("POST", COMPLETIONS, {"prompt": "Hi", "suffix": "!"})],
    ),
    "book_bad": (1, [("POST", BOOK, {"query": ""}), ("POST", BOOK, {"history": ""}), ("POST", BOOK, {"query": 3})]),
    "unknown_route": (1, [("GET", "/v1/nope", None), ("POST", "/v1/nope", {"messages": HI})]),
    "wrong_method": (1, [("GET", CHAT, None), ("PUT", CHAT, None), ("DELETE", COMPLETIONS, None)]),
}


def malformed(kind: str, variant: Any) -> Req:
    method, path, body = variant if isinstance(variant, tuple) else ("POST", CHAT, variant)
    if isinstance(body, bytes):
        return Req(kind, method, path, expect="4xx", content=body, headers={"content-type": "application/json"})
    return Req(kind, method, path, expect="4xx", json=body)


def tool_reply(rng: random.Random) -> Req:
    """A follow-up turn: the assistant's call and the tool's answer in the history."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21, "sky": "clear"}'},
    ]
    return Req("tool_reply", "POST", CHAT, json={"messages": messages, "tools": [WEATHER], **sampled(rng)})


def completion(rng: random.Random) -> Req:
    stream = rng.random() < 0.3
    body = {"prompt": f"Once upon a time, a {rng.choice(WORDS)}", **sampled(rng), "stream": stream}
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 5)
    return Req("completions", "POST", COMPLETIONS, mode="stream" if stream else "plain", json=body)


def book(rng: random.Random) -> Req:
    history = rng.choice(["", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])
    body = {"query": f"Tell me about a {rng.choice(WORDS)}.", "history": history, "max_new_tokens": rng.randint(1, 16)}
    return Req("book_chat", "POST", BOOK, json=body)


def constrained(rng: random.Random, kind: str) -> Req:
    if kind == "json_schema":
        fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True}}
    else:
        fmt = {"type": "json_object"}
    req = chat(rng, kind, "stream" if rng.random() < 0.3 else "plain", response_format=fmt)
    req.json["max_tokens"] = rng.randint(8, 32)
    return req


def tools(rng: random.Random, kind: str) -> Req:
    choice = {"tools_auto": "auto", "tools_required": "required"}.get(kind)
    choice = choice or {"type": "function", "function": {"name": "get_weather"}}
    req = chat(rng, kind, "stream" if rng.random() < 0.3 else "plain", tools=[WEATHER, CLOCK], tool_choice=choice)
    req.json["messages"] = [{"role": "user", "content": f"What is the weather in {rng.choice(WORDS)}?"}]
    req.json["max_tokens"] = rng.randint(8, 32)
    return req


def logprobs(rng: random.Random) -> Req:
    return chat(rng, "logprobs", rng.choice(["plain", "stream"]), logprobs=True, top_logprobs=rng.randint(0, 5))


def cancelled(rng: random.Random) -> Req:
    req = chat(rng, "chat_cancel", "cancel")
    req.json["max_tokens"] = rng.randint(8, 64)
    return req


# valid kind -> (weight, make(rng) -> Req); each must be answered with a 2xx. About 70% of the mix.
VALID: dict[str, tuple[float, Any]] = {
    "chat": (14, lambda r: chat(r, "chat")),
    "chat_stream": (10, lambda r: chat(r, "chat_stream", "stream")),
    "chat_cancel": (8, cancelled),
    "chat_n2": (3, lambda r: chat(r, "chat_n2", n=2)),
    "completions": (6, completion),
    "book_chat": (5, book),
    "json_schema": (4, lambda r: constrained(r, "json_schema")),
    "json_object": (3, lambda r: constrained(r, "json_object")),
    "tools_auto": (3, lambda r: tools(r, "tools_auto")),
    "tools_required": (3, lambda r: tools(r, "tools_required")),
    "tools_named": (3, lambda r: tools(r, "tools_named")),
    "tool_reply": (2, tool_reply),
    "logprobs": (4, logprobs),
    "models_health": (2, lambda r: Req("models_health", "GET", r.choice(["/v1/models", "/health"]))),
}


def build_kinds(max_body: int) -> dict[str, tuple[float, Any]]:
    """kind -> (weight, make(rng) -> Req) over the valid and the malformed kinds."""
    kinds = dict(VALID)
    for kind, (weight, variants) in MALFORMED.items():
        if kind == "oversize_body":
            variants = [{"messages": [{"role": "user", "content": "x" * (max_body + 1024)}]}]
        kinds[kind] = (weight, lambda r, kind=kind, variants=variants: malformed(kind, r.choice(variants)))
    return kinds


def check_body(req: Req, data: Any) -> str | None:
    """A 2xx answer's content: the shape its route promises. None when fine, else why not."""
    if req.path == BOOK:
        return None if isinstance(data, dict) and "response" in data else "no 'response' in the /chat answer"
    if req.method == "GET":
        return None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices:
        return "no choices"
    if req.kind in ("json_schema", "json_object"):
        for c in choices:
            if c.get("finish_reason") != "stop":  # cut by max_tokens: a prefix of JSON
                continue
            try:
                value = json.loads(c["message"]["content"])
            except (TypeError, ValueError):
                return f"content is not JSON: {c['message']['content']!r}"
            if not isinstance(value, dict):
                return f"content is not a JSON object: {value!r}"
            if req.kind == "json_schema" and (set(value) != {"name", "kind"} or value["kind"] not in ("cat", "dog")):
                return f"content does not follow the schema: {value!r}"
    if req.kind in ("tools_required", "tools_named"):
        for c in choices:
            calls = c["message"].get("tool_calls")
            if c.get("finish_reason") != "length" and not calls:
                return f"no tool call with tool_choice {req.json['tool_choice']!r}"
            if req.kind == "tools_named" and calls and calls[0]["function"]["name"] != "get_weather":
                return f"called {calls[0]['function']['name']!r}, not the named get_weather"
    return None


@dataclass
class Result:
    kind: str
    status: int | str
    latency: float
    problem: str | None = None
    request: str = ""
    response: str = ""


async def send(client: httpx.AsyncClient, req: Req) -> Result:
    """Send one request, classify the answer; never raises (a transport error becomes the status string)."""
    started = time.perf_counter()
    kwargs: dict[str, Any] = {"headers": req.headers}
    if req.content is not None:
        kwargs["content"] = req.content
    elif req.json is not None:
        kwargs["json"] = req.json
    status: int | str = "?"
    body_text = ""
    problem = None
    try:
        async with client.stream(req.method, req.path, **kwargs) as r:
            status = r.status_code
            if req.mode in ("stream", "cancel") and r.status_code == 200:
                events = []
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[6:])
                    if req.mode == "cancel" and line.startswith("data: {"):
                        break  # leaving the block closes the connection mid-stream
                body_text = "\n".join(events)[-2000:]
                if req.mode == "stream":
                    if not events or events[-1] != "[DONE]":
                        problem = "stream ended without data: [DONE]"
                    elif any('"error"' in e and e.startswith('{"error"') for e in events):
                        problem = "error event in the stream"
            else:
                raw = await r.aread()
                body_text = raw.decode("utf-8", "replace")[:2000]
                if 200 <= r.status_code < 300 and req.method == "POST":
                    try:
                        problem = check_body(req, json.loads(raw))
                    except ValueError:
                        problem = "2xx answer is not JSON"
    except httpx.TimeoutException:
        status = "timeout"
    except httpx.HTTPError as e:
        status = type(e).__name__
    latency = time.perf_counter() - started
    if isinstance(status, str):
        problem = f"transport: {status}"
    elif status >= 500:
        problem = problem or "5xx"
    elif req.expect == "ok" and not 200 <= status < 300:
        problem = problem or "valid request refused"
    elif req.expect == "4xx" and not 400 <= status < 500:
        problem = problem or "malformed request not refused with a 4xx"
    shown = ""
    if problem:
        payload = req.json if req.content is None else req.content.decode("utf-8", "replace")
        shown = f"{req.method} {req.path} {json.dumps(payload)[:600] if payload is not None else ''}"
    return Result(req.kind, status, latency, problem, shown, body_text if problem else "")


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server_args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`catdog serve-chat` from this checkout on a free port; returns once /health answers 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if os.environ.get("BENCH_THREADS"):
        env["OMP_NUM_THREADS"] = os.environ["BENCH_THREADS"]
    cmd = [sys.executable, "-m", "catdog_glm", "serve-chat", "--host", "127.0.0.1", "--port", str(port), *server_args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"`{' '.join(cmd)}` did not start; its log:\n{log.read_text()[-3000:]}")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def soak(url: str, pid: int, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    kinds = build_kinds(args.max_body)
    if args.kinds:  # a subset, e.g. to find which kind of request makes the RSS grow
        unknown = set(args.kinds) - set(kinds)
        if unknown:
            raise SystemExit(f"unknown kinds {sorted(unknown)}; the kinds: {', '.join(kinds)}")
        kinds = {k: kinds[k] for k in args.kinds}
    names = list(kinds)
    weights = [kinds[k][0] for k in names]
    # every kind once first, so the warm-up has been down every path (grammars compiled, caches filled)
    plan = [kinds[k][1](rng) for k in names + rng.choices(names, weights, k=max(0, args.requests - len(names)))]
    warmup_n = max(len(names), int(args.warmup * len(plan)))
    results: list[Result] = []
    rss: dict[str, float] = {}
    trace: list[dict] = []  # RSS every tenth of the run
    peak = [0]
    started = time.perf_counter()
    next_index = [0]

    async def sample_rss() -> None:
        while True:
            peak[0] = max(peak[0], tree_rss(pid))
            await asyncio.sleep(1)

    async def worker(client: httpx.AsyncClient) -> None:
        while next_index[0] < len(plan) and time.perf_counter() - started < args.duration:
            req = plan[next_index[0]]
            next_index[0] += 1
            results.append(await send(client, req))
            if len(results) == warmup_n and "warmup" not in rss:
                rss["warmup"] = tree_rss(pid) / 2**20
            if len(results) % max(1, len(plan) // 10) == 0:
                now, mb = time.perf_counter() - started, tree_rss(pid) / 2**20
                trace.append({"requests": len(results), "s": round(now, 1), "rss_mb": round(mb, 1)})
                print(f"  {len(results)}/{len(plan)} done, {now:.0f} s, RSS {mb:.0f} MB", file=sys.stderr)

    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency)
    sampler = asyncio.create_task(sample_rss())
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
        # cancelled streams must not linger: the scheduler drains to nothing running or waiting
        drained, health = False, {}
        for _ in range(60):
            try:
                health = (await client.get("/health")).json()
                if not health.get("running") and not health.get("waiting") and not health.get("active_requests"):
                    drained = True
                    break
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.5)
        rss["end"] = tree_rss(pid) / 2**20
        sampler.cancel()
        alive = await send(client, Req("final_health", "GET", "/health"))
        final = await send(client, Req("final_chat", "POST", CHAT, json={"messages": ask(rng), "max_tokens": 8}))
    rss.setdefault("warmup", rss["end"])
    return {
        "results": results,
        "wall_s": wall,
        "rss": rss | {"peak": peak[0] / 2**20},
        "drained": drained,
        "health_after": health,
        "alive": alive.status == 200 and final.status == 200 and not final.problem,
        "planned": len(plan),
        "warmup_requests": warmup_n,
        "rss_trace": trace,
    }


def report(run: dict, args: argparse.Namespace, server_args: list[str]) -> tuple[dict, list[str]]:
    results: list[Result] = run["results"]
    by_kind: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_kind[r.kind].append(r)
    rows = []
    for kind in sorted(by_kind):
        rs = by_kind[kind]
        lat = [r.latency for r in rs]
        statuses = Counter(str(r.status) for r in rs)
        rows.append(
            {
                "kind": kind,
                "count": len(rs),
                "statuses": dict(sorted(statuses.items())),
                "p50_s": pct(lat, 0.5),
                "p99_s": pct(lat, 0.99),
                "problems": sum(1 for r in rs if r.problem),
            }
        )
    server_errors = [r for r in results if isinstance(r.status, int) and r.status >= 500]
    unexpected = [r for r in results if r.problem and r not in server_errors]
    growth = run["rss"]["end"] - run["rss"]["warmup"]
    failures = []
    if server_errors:
        failures.append(f"{len(server_errors)} 5xx")
    if unexpected:
        failures.append(f"{len(unexpected)} unexpected")
    if growth > args.max_rss_growth:
        failures.append(f"RSS grew {growth:.1f} MB > {args.max_rss_growth} MB")
    if not run["drained"]:
        failures.append(f"scheduler not drained: {run['health_after']}")
    if not run["alive"]:
        failures.append("server no longer answers /health and a chat")
    lat = [r.latency for r in results]
    summary = {
        "server_args": server_args,
        "requests": len(results),
        "planned": run["planned"],
        "concurrency": args.concurrency,
        "seed": args.seed,
        "wall_s": run["wall_s"],
        "requests_per_s": len(results) / run["wall_s"] if run["wall_s"] else 0.0,
        "p50_s": pct(lat, 0.5),
        "p99_s": pct(lat, 0.99),
        "server_errors_5xx": len(server_errors),
        "unexpected": len(unexpected),
        "warmup_requests": run["warmup_requests"],
        "rss_mb": run["rss"],
        "rss_growth_mb": growth,
        "rss_trace": run["rss_trace"],
        "drained": run["drained"],
        "alive": run["alive"],
        "peak_batch": run["health_after"].get("peak_batch"),
        "passed": not failures,
        "failures": failures,
        "kinds": rows,
        "problems": [r.__dict__ for r in server_errors + unexpected],
    }
    return summary, failures


def print_report(summary: dict) -> None:
    print(
        f"\nsoak_serve_chat: catdog serve-chat {' '.join(summary['server_args'])}, {summary['requests']} requests "
        f"(seed {summary['seed']}), {summary['concurrency']} at a time, {summary['wall_s']:.0f} s "
        f"({summary['requests_per_s']:.1f} req/s)"
    )
    print(f"{'kind':16} {'count':>6} {'p50':>8} {'p99':>8}  statuses")
    for row in summary["kinds"]:
        statuses = " ".join(f"{k}x{v}" for k, v in row["statuses"].items())
        flag = f"  ({row['problems']} unexpected)" if row["problems"] else ""
        print(f"{row['kind']:16} {row['count']:6d} {row['p50_s']:7.3f}s {row['p99_s']:7.3f}s  {statuses}{flag}")
    print(f"{'all':16} {summary['requests']:6d} {summary['p50_s']:7.3f}s {summary['p99_s']:7.3f}s")
    rss = summary["rss_mb"]
    print(
        f"5xx: {summary['server_errors_5xx']}; unexpected: {summary['unexpected']}; RSS after "
        f"{summary['warmup_requests']} warm-up requests {rss['warmup']:.1f} MB, at the end {rss['end']:.1f} MB "
        f"(growth {summary['rss_growth_mb']:+.1f} MB, peak {rss['peak']:.1f} MB); drained: {summary['drained']}; "
        f"still answers: {summary['alive']}; peak batch {summary['peak_batch']}"
    )
    for p in summary["problems"][:20]:
        print(f"  [{p['kind']}] {p['status']} {p['problem']}")
        print(f"    request: {p['request']}\n    answer: {p['response'][:400]}")
    if len(summary["problems"]) > 20:
        print(f"  ... and {len(summary['problems']) - 20} more (see --json)")
    print("PASS" if summary["passed"] else "FAIL: " + "; ".join(summary["failures"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="how many mixed requests to send")
    parser.add_argument("--duration", type=float, default=1800, help="stop sending new requests after this many s")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--model", help="serve-chat --model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--quantize", type=int, default=4, help="serve-chat --quantize: 4, 8, or 0 for none")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of requests before the first RSS sample")
    parser.add_argument("--max-rss-growth", type=float, default=50.0, help="MB allowed after the warm-up")
    parser.add_argument("--max-body", type=int, default=1 << 20, help="the server's --max-body (the oversize kind)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="client timeout per request, s")
    parser.add_argument("--kinds", type=lambda v: v.split(","), help="only these kinds, comma-separated (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()

    server_args = ["--max-body", str(args.max_body)]
    if args.model:
        server_args += ["--model", args.model]
    if args.quantize:
        server_args += ["--quantize", str(args.quantize)]
    log = Path(tempfile.mkstemp(prefix="soak_serve_chat_", suffix=".log")[1])
    proc, url = start_server(server_args, log)
    try:
        run = asyncio.run(soak(url, proc.pid, args))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    summary, failures = report(run, args, server_args)
    summary["server_log"] = str(log)
    print_report(summary)
    if failures:
        print(f"server log: {log}")
    else:
        log.unlink(missing_ok=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
