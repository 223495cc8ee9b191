"""The recorder as a FastAPI dependency: `rec: Recorder = Depends(get_recorder)`.

Needs nothing from FastAPI itself: FastAPI hands a parameter typed `Request` the request.
"""

from __future__ import annotations

from starlette.requests import Request

from .recorder import Recorder


def get_recorder(request: Request) -> Recorder:
    """The request's recorder; a clear error when the middleware is not installed."""
    recorder = getattr(request.state, "watchllm", None)
    if not isinstance(recorder, Recorder):
        raise RuntimeError(
            "no WatchLLM recorder on this request: add WatchLLMMiddleware to the app"
            " (app.add_middleware(WatchLLMMiddleware, watchllm=...))"
        )
    return recorder
