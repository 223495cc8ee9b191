"""WatchLLM inside a host Starlette/FastAPI app: the middleware, the recorder, the dependency.

    from watchllm_ext.middleware import WatchLLMMiddleware, Recorder, get_recorder

See docs/EMBEDDING.md.
"""

from .asgi import HostStartError, RouteOptions, WatchLLMMiddleware, watchllm_route
from .budget import UserDailyBudget
from .dependency import get_recorder
from .recorder import Recorder, current_recorder

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
