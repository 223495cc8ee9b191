"""The built-in flag provider: `flags` from the settings (env `WATCHLLM_FLAGS`, watchllm.toml)
and the JSON `flags_file`, which is read again when it changes (checked at most every
`flags_refresh_s`), so a flag flips without a restart. The file beats the settings.

A flag name that nothing asks for (flags/known.py) is a warning: once at start for the
settings, and at each load of the file (the app's watcher rereads it when it changes, whether
or not anything asks for a flag meanwhile)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import anyio
from pydantic import TypeAdapter, ValidationError

from ..auth import Principal
from ..hookspecs import BackgroundTask, hookimpl
from ..settings import Settings
from .known import unknown_flags_warning
from .spec import FlagSpec

log = logging.getLogger("watchllm.flags")

_FILE_ADAPTER = TypeAdapter(dict[str, FlagSpec])
# The file watcher's shortest pause, whatever flags_refresh_s says.
MIN_WATCH_S = 0.05


class FlagsFile:
    """A JSON object of flags, reloaded when its modification time or size changes. A file
    that cannot be read or parsed keeps the last good flags (and is logged once per change)."""

    def __init__(self, path: Path, refresh_s: float) -> None:
        self.path = path
        self.refresh_s = refresh_s
        self._flags: dict[str, FlagSpec] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def flags(self) -> dict[str, FlagSpec]:
        now = time.monotonic()
        if now - self._checked >= self.refresh_s:
            with self._lock:
                self._checked = now
                self._reload()
        return self._flags

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._flags, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._flags = _FILE_ADAPTER.validate_python(json.loads(self.path.read_text()))
        except (OSError, ValueError, ValidationError) as exc:
            log.error(
                "flags file %s is not valid (%s); keeping the flags read before", self.path, exc
            )
            return
        warning = unknown_flags_warning(self._flags, f"flags file {self.path}")
        if warning is not None:
            log.warning("%s", warning)


class BuiltinFlags:
    def __init__(self, settings: Settings) -> None:
        self.settings_flags: dict[str, FlagSpec] = dict(settings.flags)
        self.file = (
            FlagsFile(settings.flags_file, settings.flags_refresh_s)
            if settings.flags_file is not None
            else None
        )
        self._settings_checked = False

    def check_settings(self) -> None:
        """Warn once about the names in the `flags` setting that nothing asks for. Not at
        construction: plugins loaded after this one declare their flags when imported."""
        if self._settings_checked:
            return
        self._settings_checked = True
        warning = unknown_flags_warning(self.settings_flags, "setting flags (env WATCHLLM_FLAGS)")
        if warning is not None:
            log.warning("%s", warning)

    @hookimpl
    def register_background_tasks(self, settings: Settings) -> BackgroundTask | None:
        # Called at start, every plugin loaded: unknown names are reported before any request.
        self.check_settings()
        return self.watch_file if self.file is not None else None

    async def watch_file(self) -> None:
        """Reread the flags file when it changes, so its unknown names are reported then."""
        assert self.file is not None
        while True:
            self.file.flags()
            await anyio.sleep(max(self.file.refresh_s, MIN_WATCH_S))

    @hookimpl(trylast=True)
    def feature_enabled(self, name: str, principal: Principal, user_id: str | None) -> bool | None:
        self.check_settings()  # a plugin manager used without an app (no start)
        spec = self.file.flags().get(name) if self.file is not None else None
        if spec is None:
            spec = self.settings_flags.get(name)
        return None if spec is None else spec.value(principal.project_id, user_id)


def make_plugin(settings: Settings) -> Any:
    return BuiltinFlags(settings)
