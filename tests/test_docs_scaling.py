"""docs/scaling.md: every block marked `<!-- run -->` runs as written, in order, in a scratch folder laid out as the
guide assumes; every other block says why it is not run here."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.chatglm_tiny import make_tiny_chatglm3
from tests.conftest import REPO, SHARED_CATDOG, catdog_env, free_port, save_image

pytestmark = pytest.mark.slow
GUIDE = REPO / "docs" / "scaling.md"
BLOCK = re.compile(r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def guide_blocks() -> list[tuple[str, str, str]]:
    """(marker, language, body) of every fenced block in the guide."""
    return [(m["marker"] or "", m["lang"], m["body"]) for m in BLOCK.finditer(GUIDE.read_text(encoding="utf-8"))]


def test_every_block_is_run_or_says_why_not():
    blocks = guide_blocks()
    assert len(blocks) >= 10
    for marker, _, body in blocks:
        assert marker == "run" or marker.startswith("not run here: "), f"unmarked block:\n{body}"
    run = [body for marker, _, body in blocks if marker == "run"]
    assert any("catdog export chat" in b for b in run) and any("catdog export classifier" in b for b in run)
    assert any("torchrun" in b for b in run)


@pytest.fixture
def scratch(tmp_path, synthetic_data, tiny_checkpoint):
    """The layout the guide assumes: chatglm3-6b/, data/catdog, checkpoint/best.pt, photo.jpg."""
    make_tiny_chatglm3(tmp_path / "chatglm3-6b", "bin")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "catdog").symlink_to(synthetic_data, target_is_directory=True)
    (tmp_path / "checkpoint").mkdir()
    shutil.copy(tiny_checkpoint, tmp_path / "checkpoint" / "best.pt")
    photos = sorted((SHARED_CATDOG / "val" / "cat").glob("*.jpg"))[:1]
    if photos:
        shutil.copy(photos[0], tmp_path / "photo.jpg")
    else:
        save_image(tmp_path / "photo.jpg", size=(320, 240), color=(180, 120, 60))
    return tmp_path


def test_the_guide_runs_as_written(scratch):
    env = catdog_env() | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    servers: list[subprocess.Popen] = []
    outputs: list[str] = []
    try:
        for marker, lang, body in guide_blocks():
            if marker != "run":
                continue
            if lang == "python":
                done = subprocess.run(
                    [sys.executable, "-c", body], cwd=scratch, env=env, capture_output=True, text=True, timeout=600
                )
            elif body.rstrip().endswith("&"):  # a server: start it on a free port, point the clients at it
                port = free_port()
                command = body.rstrip().rstrip("&").replace("--port 8000", f"--port {port}")
                servers.append(
                    subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=scratch, env=env, stdout=subprocess.DEVNULL)
                )
                _wait_for(f"http://127.0.0.1:{port}/health", servers[-1])
                env["CHAT_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
                continue
            else:
                done = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", body],
                    cwd=scratch,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
            assert done.returncode == 0, f"{body}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            outputs.append(done.stdout)
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)

    rehearsal, export_chat, transformers_check, client, classifier, onnx_only = outputs
    assert "Training summary" in rehearsal and "2 processes" in rehearsal
    assert (scratch / "checkpoint" / "rehearsal" / "best.pt").is_file()
    assert (scratch / "chatglm3-6b-hf" / "tokenizer.json").is_file() and "Wrote" in export_chat
    assert transformers_check.strip()  # the tiny random model's greedy reply: some text
    model, finish, *_ = client.split()
    assert model == "chatglm3-6b-hf" and finish in ("stop", "length")
    assert (scratch / "catdog.onnx").is_file() and "photo.jpg" in classifier
    probabilities = ast.literal_eval(onnx_only.strip())
    assert set(probabilities) == {"cat", "dog"} and abs(sum(probabilities.values()) - 1) < 1e-3


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {timeout} s")
