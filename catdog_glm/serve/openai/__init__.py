"""The chat HTTP API in vLLM's layout (`vllm/entrypoints/openai/`).

- protocol.py: the wire types (requests with `to_sampling()`, responses and stream chunks, sent as they are)
- errors.py: `ApiError`, OpenAI's error shape, the body guard and the exception handlers
- serving.py: what every endpoint shares (`ApiLimits`, `ChatService`, usage, the streams' one tail)
- serving_chat.py, serving_completion.py, book.py: `/v1/chat/completions`, `/v1/completions`, the book's `/chat`
- docs.py: `/docs` offline
- api_router.py: `create_api(engine)` and its routes (parse -> admit -> generate -> render)
"""
