"""The AI layer: the provider around the openai SDK, and the OpenAI-compatible mock model server.

`everything_server.ai.provider` is what services use. `everything_server.ai.mock` (aiohttp) is
imported only where the mock is needed (start-up without an API key, tests, benchmarks) and runs on
its own with `python -m everything_server.ai.mock` (or `python -m everything_server.ai`).
"""

from everything_server.ai.provider import (
    ChatEnd,
    ChatMessage,
    ChatProvider,
    ImageCompleted,
    ImageEvent,
    ImagePartial,
    Usage,
)

__all__ = [
    "ChatEnd",
    "ChatMessage",
    "ChatProvider",
    "ImageCompleted",
    "ImageEvent",
    "ImagePartial",
    "Usage",
]
