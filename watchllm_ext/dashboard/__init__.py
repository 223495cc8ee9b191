"""The dashboard: server-rendered pages at `/` and `/dashboard/...` of the app (docs/DASHBOARD.md).

A built-in plugin: it adds its routes through `register_routes`, like a third party's would,
so the pages are served wherever the app is (alone, or mounted in a host app), and
`disable_plugins = ["dashboard"]` turns them off.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from ..hookspecs import hookimpl
from ..settings import Settings
from .views import Dashboard


class DashboardPlugin:
    def __init__(self, settings: Settings) -> None:
        self.dashboard = Dashboard(settings)

    @hookimpl
    def register_routes(self, settings: Settings) -> list[BaseRoute]:
        return self.dashboard.routes()


def make_plugin(settings: Settings) -> DashboardPlugin:
    return DashboardPlugin(settings)
