"""Run WatchLLM's store and writer with a host app's lifespan.

A sub-app mounted with `host.mount(...)` does not get lifespan events, so its writer would
never start. Give the host this lifespan instead:

    wl = create_app(settings)
    host = FastAPI(lifespan=lifespan(wl))          # or Starlette(lifespan=...)
    host.mount("/watchllm", wl)

A host with a lifespan of its own passes it as `host_lifespan=` and it runs inside ours.
"""

from __future__ import annotations

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
                await stack.enter_async_context(app.state.watchllm.running())
            if host_lifespan is None:
                yield None
            else:
                async with host_lifespan(host) as state:
                    yield state

    return _lifespan
