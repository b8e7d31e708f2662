"""The chat half: model sources (ChatGLM3 without remote code, HF folders, GGUF, an embedded default), the
ChatGLM3 prompt format, and one ChatEngine used by every front end."""
