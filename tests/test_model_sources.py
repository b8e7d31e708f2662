"""Model sources (chat/sources.py): the first registered source that matches a path loads it, a new kind plugs in
through `register_model_source` (with its chat format through chat/formats' registry) as the built-in ones do, and
a path no source takes says what catdog loads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from catdog_glm.chat import sources
from catdog_glm.chat.formats import ChatFormat, base, register
from catdog_glm.chat.loading import load_chat_model
from catdog_glm.chat.sources import LoadedModel, ModelSource, register_model_source
from catdog_glm.errors import ModelError


class EchoFormat(ChatFormat):
    name = "echo"

    @classmethod
    def matches(cls, tokenizer) -> bool:
        return getattr(tokenizer, "echo", False)

    def encode(self, messages, tools=None, continue_final=False):
        return [1, 2, 3]

    def decode(self, ids):
        return " ".join(map(str, ids))


class EchoSource(ModelSource):
    """Files ending in .echo: a one-layer model and a tokenizer of the echo format, read like ChatGLM3's."""

    kind = "echo"

    def matches(self, path):
        return path is not None and path.suffix == ".echo"

    def load(self, path, options):
        import torch

        model = torch.nn.Linear(4, 4)
        model.config = SimpleNamespace(max_position_embeddings=64)
        # a ChatML-looking template, which the built-in Hermes format would take: the plug-in is asked first
        tokenizer = SimpleNamespace(echo=True, chat_template="{{ '<|im_start|>' }}", stop_ids=[2], encode=lambda t: [1])
        return LoadedModel(
            model, tokenizer, self.kind, path.stem, str(path), {2}, 64, tokenizer.encode, info={"echo": True}
        )


def test_a_registered_source_loads_through_the_real_seam(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MODEL_SOURCES", list(sources.MODEL_SOURCES))  # both undone after the test
    monkeypatch.setattr(base, "_REGISTRY", list(base._REGISTRY))
    register(EchoFormat)
    register_model_source(EchoSource())
    assert [s.kind for s in sources.MODEL_SOURCES] == ["echo", "embedded", "gguf", "chatglm3", "hf"]
    path = tmp_path / "tiny.echo"
    path.write_text("")
    chat = load_chat_model(str(path), device="cpu", dtype="fp32")
    assert (chat.kind, chat.source, chat.format.name, chat.info["echo"]) == ("echo", str(path), "echo", True)
    assert chat.encode_chat([{"role": "user", "content": "hi"}]) == [1, 2, 3] and chat.stop_ids == {2}
    assert chat.parameters == 20 and chat.info["weight_bytes"] == 80 and chat.quantization == "none"


def test_paths_no_source_takes_say_what_catdog_loads(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="notes.txt is a file but not a .gguf"):
        load_chat_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelError, match="empty is not a model folder: it has no config.json"):
        load_chat_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="does not exist"):
        sources.find_source(tmp_path / "missing")
