"""Built-in plugin: the OTLP/HTTP trace receiver's routes, added through `register_routes`
like a third party's (`disable_plugins = ["otel.plugin"]` turns the receiver off)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from ..hookspecs import hookimpl
from ..settings import Settings
from .receiver import routes


@hookimpl
def register_routes(settings: Settings) -> list[BaseRoute]:
    return routes()
