"""`catdog serve-chat --ui streamlit`: Streamlit's AppTest drives the page against the embedded model (in process and
as a client of a live serve-chat), and a real browser checks the running page."""

from __future__ import annotations

import pytest

from tests.conftest import free_port, open_page, requires_chromium, screenshot_dir, start_catdog

pytest.importorskip("streamlit", reason="the streamlit extra is not installed (pip install 'catdog-glm[streamlit]')")
pytestmark = pytest.mark.slow


def _app():
    from streamlit.testing.v1 import AppTest

    from catdog_glm.serve.streamlit_runner import APP_FILE

    return AppTest.from_file(str(APP_FILE), default_timeout=300)


def _assistant_texts(at) -> list[str]:
    return [" ".join(md.value for md in m.markdown) for m in at.chat_message if m.name == "assistant"]


def test_send_sliders_and_clear_in_process(monkeypatch):
    for key in ("CATDOG_ST_API_URL", "CATDOG_ST_MODEL"):
        monkeypatch.delenv(key, raising=False)
    at = _app()
    at.run()
    assert not at.exception
    at.slider(key="temperature").set_value(0.0)
    at.slider(key="top_p").set_value(0.5)
    at.slider(key="max_length").set_value(4096)
    at.chat_input(key="prompt").set_value("What is the capital of France?").run()
    assert not at.exception
    assert at.session_state["last_sampling"] == {
        "max_length": 4096,
        "top_p": 0.5,
        "temperature": 0.0,
        "max_new_tokens": 512,
    }
    assert "Paris" in _assistant_texts(at)[-1]
    at.chat_input(key="prompt").set_value("And of Germany?").run()
    assert len(at.session_state["history"]) == 4 and "Berlin" in _assistant_texts(at)[-1]
    at.button(key="clear").click().run()
    assert len(at.chat_message) == 0 and at.session_state["history"] == []


def _start(args: list[str], health: str):
    return start_catdog(["serve-chat", *args], health=health)


def test_page_as_a_client_of_a_running_server(monkeypatch):
    proc, url = _start(["--api-key", "k123"], "/health")
    try:
        monkeypatch.setenv("CATDOG_ST_API_URL", url)
        monkeypatch.setenv("CATDOG_ST_API_KEY", "k123")
        at = _app()
        at.run()
        assert not at.exception and url in at.caption[0].value
        at.slider(key="temperature").set_value(0.0)
        at.chat_input(key="prompt").set_value("What is the capital of France?").run()
        assert not at.exception and "Paris" in _assistant_texts(at)[-1]
        monkeypatch.setenv("CATDOG_ST_API_KEY", "wrong")
        bad = _app()
        bad.run()
        bad.chat_input(key="prompt").set_value("hello").run()
        assert "401" in bad.error[0].value and bad.session_state["history"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_streamlit_child_dies_with_its_parent_on_kill_9(tmp_path):
    """`kill -9` of `catdog serve-chat --ui streamlit` runs no handler of ours; the child (here a stand-in for
    Streamlit, started by the real runner) must not outlive it and keep the port."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child_code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent_code = (
        "import sys\n"
        "from catdog_glm.serve import streamlit_runner as r\n"
        f"r.streamlit_command = lambda host, port: [sys.executable, '-c', {child_code!r}]\n"
        f"r.run_streamlit(host='127.0.0.1', port={free_port()})\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie waits only to be reaped
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = not alive(child)
    if not gone:
        os.kill(child, signal.SIGKILL)
    assert gone, "the child outlived its parent"


def test_without_the_extra_the_command_says_how_to_install(monkeypatch):
    import importlib.util

    from catdog_glm.errors import ConfigError
    from catdog_glm.serve import streamlit_runner

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'catdog-glm\[streamlit\]'"):
        streamlit_runner.run_streamlit(host="127.0.0.1", port=free_port())


@requires_chromium
def test_real_browser_on_the_running_streamlit_page(tmp_path):
    from playwright.sync_api import sync_playwright

    proc, url = _start(["--ui", "streamlit"], "/_stcore/health")
    shots = screenshot_dir(tmp_path)
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, url + "/")
            box = page.locator("[data-testid='stChatInputTextArea']")
            box.wait_for(timeout=180_000)
            box.fill("What is the capital of France?")
            box.press("Enter")
            page.locator("[data-testid='stChatMessage']").nth(1).wait_for(timeout=180_000)
            page.wait_for_function(
                "() => { const m = document.querySelectorAll('[data-testid=\"stChatMessage\"]');"
                " return m.length >= 2 && m[1].innerText.trim().length > 3; }",
                timeout=180_000,
            )
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots / "serve_chat_streamlit.png"), full_page=True)
            browser.close()
        assert (shots / "serve_chat_streamlit.png").stat().st_size > 10_000
    finally:
        proc.terminate()
        proc.wait(timeout=30)
