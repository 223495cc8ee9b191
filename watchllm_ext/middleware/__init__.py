"""WatchLLM inside a host Starlette/FastAPI app: the middleware, the recorder, the dependency.

    from watchllm_ext.middleware import WatchLLMMiddleware, Recorder, get_recorder

See docs/EMBEDDING.md.
"""

try:
    from .asgi import HostStartError, RouteOptions, WatchLLMMiddleware, watchllm_route
    from .budget import UserDailyBudget
    from .dependency import get_recorder
    from .recorder import Recorder, current_recorder
except ModuleNotFoundError as exc:  # the base install: say which extra
    from .. import server_extra_missing

    raise server_extra_missing(exc, "watchllm_ext.middleware") from exc

__all__ = [
    "HostStartError",
    "Recorder",
    "RouteOptions",
    "UserDailyBudget",
    "WatchLLMMiddleware",
    "current_recorder",
    "get_recorder",
    "watchllm_route",
]
