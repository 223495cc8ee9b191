"""Feature flags: `feature_enabled(pm, name, principal, user_id, default)` asks the
`feature_enabled` hook (first non-None wins) and caches the answer for the current request.

Providers are plugins: `builtin` (settings and a flags file, always loaded, answers last),
`openfeature_provider` (any OpenFeature provider) and `configcat_provider` (ConfigCat, with
its local-override file). docs/OPERATIONS.md says how fast a change is seen with each.

The flag names something asks for are declared (`declare_flag`, flags/known.py); the built-in
provider warns about any other name in its settings or file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from ..auth import Principal
from .known import GUARDIAN, declare_flag, known_flags

__all__ = ["GUARDIAN", "declare_flag", "feature_enabled", "known_flags", "request_flags"]

# One dict per request (set by the app's request middleware): a flag asked twice while one
# request is handled gets the same answer, even if the provider flips in between.
_REQUEST_CACHE: ContextVar[dict[tuple[str, str, str | None], bool] | None] = ContextVar(
    "watchllm_flag_cache", default=None
)


@contextmanager
def request_flags() -> Iterator[dict[tuple[str, str, str | None], bool]]:
    """Give the code run inside (one request) its own flag cache."""
    cache: dict[tuple[str, str, str | None], bool] = {}
    token = _REQUEST_CACHE.set(cache)
    try:
        yield cache
    finally:
        _REQUEST_CACHE.reset(token)


def feature_enabled(
    pm: Any, name: str, principal: Principal, user_id: str | None = None, default: bool = False
) -> bool:
    """The flag's value for this project (and user): the first provider that knows the flag,
    else `default`. Cached for the rest of the request when called inside one."""
    cache = _REQUEST_CACHE.get()
    key = (name, principal.project_id, user_id)
    if cache is not None and key in cache:
        return cache[key]
    found = pm.hook.feature_enabled(
        name=name, principal=principal, user_id=user_id, default=default
    )
    value = default if found is None else bool(found)
    if cache is not None:
        cache[key] = value
    return value
