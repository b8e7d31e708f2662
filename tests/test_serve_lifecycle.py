"""SIGTERM or SIGINT to `catdog serve-chat` (Gradio, or the Streamlit page it starts as a child) ends everything the
command started and frees the port; requests running or queued at that moment get a clean end."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import start_catdog

pytestmark = pytest.mark.slow


def _port_is_free(port: int) -> bool:
    """Nothing listens and a new server could bind it (with SO_REUSEADDR, as uvicorn does: connections the old
    server closed may sit in TIME_WAIT for a minute, which only a plain bind() minds)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop_and_check(proc, url: str, sig: int) -> None:
    import psutil

    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"still running after the signal: {[p.cmdline() for p in alive]}"
    port = int(url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 10
    while not _port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _port_is_free(port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_streamlit_page_process_ends_with_its_parent(sig):
    pytest.importorskip("streamlit")
    import psutil

    proc, url = start_catdog(["serve-chat", "--ui", "streamlit"], health="/_stcore/health")
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("streamlit" in " ".join(c.cmdline()) for c in children)
    _stop_and_check(proc, url, sig)


def test_sigterm_ends_running_and_queued_requests_cleanly():
    proc, url = start_catdog(["serve-chat", "--max-batch-size", "1", "--queue-size", "4"])
    events: list[str] = []
    queued: dict = {}
    first_piece = threading.Event()

    def stream():
        body = {
            "messages": [{"role": "user", "content": "Write a very long story about a cat."}],
            "stream": True,
            "max_tokens": 2000,
            "temperature": 0.8,
            "seed": 1,
        }
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) >= 3:
                        first_piece.set()

    def wait_in_queue():
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            queued.update(status=r.status_code, body=r.json())
        except httpx.HTTPError as e:  # a closed connection is a clean end too
            queued.update(status=None, error=repr(e))

    streamer = threading.Thread(target=stream)
    streamer.start()
    assert first_piece.wait(120)
    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health").json()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{url}/health").json()["waiting"] == 1
    _stop_and_check(proc, url, signal.SIGTERM)
    streamer.join(30)
    waiter.join(30)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2]).get("error")
    assert error and error["code"] == "shutting_down"
    assert queued.get("status") in (503, None), queued
    if queued.get("status") == 503:
        assert queued["body"]["error"]["code"] == "shutting_down"


def test_a_port_left_in_time_wait_by_a_stopped_server_counts_as_free():
    """`--port` is checked before the model loads: a port a server still listens on is taken, but one whose old
    connections sit in TIME_WAIT after a restart is free, since uvicorn and Gradio bind with SO_REUSEADDR too."""
    from catdog_glm.serve.net import port_is_free

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's listener
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert not port_is_free("127.0.0.1", port)
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server closes first: its side of the connection enters TIME_WAIT
    client.close()
    server.close()
    assert port_is_free("127.0.0.1", port)
