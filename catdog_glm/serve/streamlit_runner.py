"""Starting the Streamlit page from `catdog serve-chat --ui streamlit`: the user never needs `streamlit` on PATH
(the book warns it may not be there on Windows) nor to know where the app file lives."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

from catdog_glm.errors import ConfigError
from catdog_glm.serve.net import port_is_free

APP_FILE = Path(__file__).with_name("streamlit_app.py")
STOP_GRACE_S = 10  # seconds Streamlit gets to exit after SIGTERM before it is killed


def streamlit_command(host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_FILE),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--global.developmentMode",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "minimal",  # no "Deploy" button
    ]


def streamlit_env(
    *,
    model=None,
    quantize=None,
    dtype="auto",
    device="auto",
    api_url=None,
    api_key=None,
    trust_remote_code=False,
    max_batch_size=None,
    max_batch_tokens=None,
) -> dict:
    env = dict(os.environ)
    for key, value in {
        "CATDOG_ST_MODEL": model,
        "CATDOG_ST_QUANTIZE": quantize,
        "CATDOG_ST_DTYPE": dtype,
        "CATDOG_ST_DEVICE": device,
        "CATDOG_ST_API_URL": api_url,
        "CATDOG_ST_API_KEY": api_key,
        "CATDOG_ST_TRUST_REMOTE_CODE": "1" if trust_remote_code else None,
        "CATDOG_ST_MAX_BATCH_SIZE": max_batch_size,
        "CATDOG_ST_MAX_BATCH_TOKENS": max_batch_tokens,
    }.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"  # no telemetry
    return env


def run_streamlit(*, host: str, port: int, on_ready=None, **settings) -> int:
    if importlib.util.find_spec("streamlit") is None:
        raise ConfigError("the Streamlit page needs the streamlit extra: pip install 'catdog-glm[streamlit]'")
    if not port_is_free(host, port):
        raise ConfigError(f"port {port} on {host} is already in use; pass another --port")
    if on_ready:
        on_ready(f"Streamlit chat page: http://{host}:{port}/  (Ctrl+C to stop)")
    # its own process group, so that stopping it reaches everything Streamlit itself starts
    process = subprocess.Popen(
        streamlit_command(host, port),
        env=streamlit_env(**settings),
        start_new_session=hasattr(os, "killpg"),
        preexec_fn=_die_with_parent(),  # noqa: PLW1509 - only an async-signal-safe prctl call runs in the child
    )
    received: list[int] = []

    def stop(signum, _frame) -> None:
        received.append(signum)
        _signal_group(process, signal.SIGTERM)

    handled = [s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {sig: signal.signal(sig, stop) for sig in handled}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)
                process.wait()
        _signal_group(process, signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM)  # stragglers
    return 128 + received[0] if received else code


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent():
    """On Linux, a preexec_fn that makes the child get SIGKILL when this process dies, however it dies: `kill -9` of
    `catdog serve-chat --ui streamlit` runs none of our handlers, and the child would keep the port. Elsewhere
    None (the child is stopped by the signal handlers only, as before)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: nothing is imported after the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would send the signal
            os._exit(1)

    return preexec


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the Streamlit process and everything in its process group (just the process on Windows)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, sig)
        elif process.poll() is None:
            process.terminate()
    except (ProcessLookupError, PermissionError):
        pass
