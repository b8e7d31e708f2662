"""The Streamlit chat page (the book's `web_demo2.py`), started by `catdog serve-chat --ui streamlit`.

Settings come from environment variables set by the command (CATDOG_ST_*), so `streamlit run` needs no
arguments. The model is loaded once per server process (`st.cache_resource`), not per browser session; with
CATDOG_ST_API_URL the page is instead a client of a running `catdog serve-chat` (its OpenAI-compatible route).
"""

import json
import os

import streamlit as st

from catdog_glm.chat.sampling import DEFAULT_MAX_LENGTH, DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P

API_URL = os.environ.get("CATDOG_ST_API_URL", "").rstrip("/")
API_KEY = os.environ.get("CATDOG_ST_API_KEY") or None


@st.cache_resource(show_spinner="Loading the model ...")
def get_engine():
    from catdog_glm.chat.engine import load_engine

    def number(name: str) -> int | None:
        value = os.environ.get(name)
        return int(value) if value else None

    return load_engine(
        os.environ.get("CATDOG_ST_MODEL") or None,
        quantize=number("CATDOG_ST_QUANTIZE"),
        dtype=os.environ.get("CATDOG_ST_DTYPE", "auto"),
        device=os.environ.get("CATDOG_ST_DEVICE", "auto"),
        trust_remote_code=os.environ.get("CATDOG_ST_TRUST_REMOTE_CODE") == "1",
        max_batch_size=number("CATDOG_ST_MAX_BATCH_SIZE"),
        max_batch_tokens=number("CATDOG_ST_MAX_BATCH_TOKENS"),
    )


def stream_from_api(messages: list[dict], sampling: dict):
    """Text pieces from a catdog serve-chat (or any OpenAI-compatible) server's streaming route."""
    import httpx

    body = {
        "messages": messages,
        "stream": True,
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        "max_tokens": sampling["max_new_tokens"],
    }
    headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}
    with httpx.stream("POST", f"{API_URL}/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise RuntimeError(f"{API_URL} answered {r.status_code}: {message}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0]["delta"].get("content"):
                    yield choices[0]["delta"]["content"]


def api_sampling_defaults() -> dict:
    """The server's own defaults for its model (its /health says them), so the sliders start where it would."""
    import httpx

    try:
        return httpx.get(f"{API_URL}/health", timeout=5).json().get("sampling_defaults") or {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return {}


def stream_from_engine(messages: list[dict], sampling: dict):
    yield from get_engine().stream(messages, **sampling)


st.set_page_config(page_title="catdog chat", page_icon="💬")
st.title("catdog chat")
if API_URL:
    st.caption(f"Client of {API_URL}")
    defaults = api_sampling_defaults()
else:
    info = get_engine().info()
    defaults = info["sampling_defaults"]  # the model's own, where it has them (chat/sampling.py)
    st.caption(
        f"{info['name']} · {info['kind']} · quantization {info['quantization']} · {info['dtype']} on {info['device']}"
    )

history = st.session_state.setdefault("history", [])
with st.sidebar:
    max_length = st.slider("Maximum length", 16, 32768, DEFAULT_MAX_LENGTH, step=1, key="max_length")
    top_p = st.slider("Top P", 0.01, 1.0, float(defaults.get("top_p", DEFAULT_TOP_P)), step=0.01, key="top_p")
    temperature = st.slider(
        "Temperature", 0.0, 1.5, float(defaults.get("temperature", DEFAULT_TEMPERATURE)), step=0.01, key="temperature"
    )
    system = st.text_area("System prompt", key="system")
    if st.button("Clear history", key="clear"):
        history.clear()

for message in history:
    with st.chat_message(message["role"]):
        st.markdown(message["content"])

if prompt := st.chat_input("Ask something", key="prompt"):
    history.append({"role": "user", "content": prompt})
    with st.chat_message("user"):
        st.markdown(prompt)
    sampling = {
        "max_length": int(max_length),
        "top_p": float(top_p),
        "temperature": float(temperature),
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
    }
    st.session_state["last_sampling"] = sampling  # what the engine was asked for (shown to tests)
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + history
    with st.chat_message("assistant"):
        try:
            source = stream_from_api if API_URL else stream_from_engine
            reply = st.write_stream(source(messages, sampling))
        except Exception as e:  # shown in the page; the conversation stays as it was
            history.pop()
            st.error(str(e))
            reply = None
    if reply is not None:
        history.append({"role": "assistant", "content": reply if isinstance(reply, str) else "".join(reply)})
