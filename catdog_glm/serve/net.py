"""Network helpers every server shares (the classifier page, the chat server, the Streamlit runner)."""

from __future__ import annotations

import socket

from catdog_glm.errors import ConfigError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860  # loopback: exposing a server to the network is an explicit choice


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind `host:port` now. With SO_REUSEADDR, as uvicorn and Gradio bind: a port whose
    last connections sit in TIME_WAIT is free to them (on Linux a listening socket still makes it taken)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def require_free_port(host: str, port: int) -> None:
    """Raise ConfigError, before any model loads, when `host:port` is taken or cannot be bound."""
    if not port_is_free(host, port):
        raise ConfigError(f"port {port} on {host} is already in use; pass another --port")
