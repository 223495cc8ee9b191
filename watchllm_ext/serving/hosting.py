"""Run WatchLLM's store and writer with a host app's lifespan.

A sub-app mounted with `host.mount(...)` does not get lifespan events, so its writer would
never start. Give the host this lifespan instead:

    wl = create_app(settings)
    host = FastAPI(lifespan=lifespan(wl))          # or Starlette(lifespan=...)
    host.mount("/watchllm", wl)

A host with a lifespan of its own passes it as `host_lifespan=` and it runs inside ours.

An app that something else runs already (WatchLLMMiddleware, from the same host's lifespan)
is left to it. Before stopping an app, this flushes what a WatchLLMMiddleware recording into
it still holds (a host mounted under a prefix, which starts its middleware on first request).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from starlette.applications import Starlette

HostLifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def lifespan(
    *apps: Starlette, host_lifespan: HostLifespan | None = None
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    for app in apps:
        if not hasattr(app.state, "watchllm"):
            raise TypeError(f"{app!r} is not an app made by watchllm_ext.create_app")

    @asynccontextmanager
    async def _lifespan(host: Any) -> AsyncIterator[Any]:
        async with AsyncExitStack() as stack:
            for app in apps:
                wl = app.state.watchllm
                if wl.writer is None:
                    await stack.enter_async_context(wl.running())
                    stack.push_async_callback(_flush_middleware, wl)  # runs before it stops
            if host_lifespan is None:
                yield None
            else:
                async with host_lifespan(host) as state:
                    yield state

    return _lifespan


async def _flush_middleware(wl: Any) -> None:
    """Hand a middleware's recorded events to `wl` while it still runs."""
    if "watchllm_ext.middleware.asgi" not in sys.modules:
        return  # no middleware in this process: nothing to flush (and nothing to import)
    from ..middleware.asgi import find_owner

    owner = find_owner(wl)
    if owner is not None:
        await owner.stop()
