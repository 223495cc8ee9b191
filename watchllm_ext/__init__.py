"""WatchLLM: LLM observability that runs inside the service you already have.

The server side (`create_app`, `Settings`, `hookimpl`) needs the `server` extra; the client
(`watchllm_ext.sdk`) needs only the base install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .app import create_app
    from .hookspecs import hookimpl
    from .serving.hosting import lifespan
    from .settings import Settings

__all__ = ["Settings", "__version__", "create_app", "hookimpl", "lifespan"]

_LAZY = {
    "create_app": ("app", "create_app"),
    "hookimpl": ("hookspecs", "hookimpl"),
    "lifespan": ("serving.hosting", "lifespan"),
    "Settings": ("settings", "Settings"),
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import watchllm_ext.sdk` never pulls the server's dependencies.
    if name in _LAZY:
        from importlib import import_module

        module, attr = _LAZY[name]
        try:
            return getattr(import_module(f"{__name__}.{module}"), attr)
        except ModuleNotFoundError as exc:
            raise server_extra_missing(exc, f"watchllm_ext.{name}") from exc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def server_extra_missing(exc: ModuleNotFoundError, what: str) -> ModuleNotFoundError:
    """The error of a base install (the client only) importing a part of the server: which
    extra installs what is missing, not only the missing module's name."""
    if exc.name is None or exc.name.startswith(__name__):
        return exc  # one of ours is missing: a broken install, said as it is
    return ModuleNotFoundError(
        f"{what} needs the 'server' extra (no module named {exc.name!r}):"
        " pip install -e '.[server]' in WatchLLM's folder",
        name=exc.name,
    )
