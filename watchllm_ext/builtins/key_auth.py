"""Built-in authentication: API keys from the key file (see keys.py).

With key_store = clickhouse the keys live on the server, shared by every process in front of
it; this plugin copies them into a local file (settings.key_copy_path) at start and every
key_refresh_s, and authenticates from that copy (a request never waits on the server; keys
keep working while the server is down).
"""

from __future__ import annotations

import logging

import anyio
from starlette.requests import Request

from ..auth import Principal
from ..hookspecs import BackgroundTask, hookimpl
from ..keys import KeyStore, ServerKeyStore
from ..settings import Settings
from ..store import Store, StoreError

log = logging.getLogger("watchllm.keys")


class KeyAuth:
    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self._failing = False  # the last sync from the server failed

    # trylast: a third-party authenticator (SSO, a gateway's header) is asked first.
    @hookimpl(trylast=True)
    def authenticate(self, token: str, request: Request | None) -> Principal | None:
        return self.keys.authenticate(token)

    @hookimpl
    def register_background_tasks(
        self, settings: Settings, store: Store | None
    ) -> BackgroundTask | None:
        if settings.key_store != "clickhouse" or store is None:
            return None
        server = ServerKeyStore(store)
        self._sync(server, first=True)  # before the first request

        async def sync_keys() -> None:
            while True:
                await anyio.sleep(settings.key_refresh_s)
                await anyio.to_thread.run_sync(self._sync, server)  # never raises

        return sync_keys

    def _sync(self, server: ServerKeyStore, first: bool = False) -> None:
        try:
            rows = server.rows()
            if not rows and not self.keys.is_empty():
                # An empty table where keys were (a new or rebuilt server): keep the copy
                # rather than lock everyone out; `keys copy-to-server` fills the table.
                raise StoreError("the server's api_keys table is empty")
            changed = self.keys.mirror(rows)
        except Exception as exc:  # never let the sync die: the copy serves meanwhile
            # Keep authenticating from the last copy; say so once per failure streak.
            if first or not self._failing:
                log.warning("cannot read the API keys from the server (%s); using the copy", exc)
            self._failing = True
            return
        if self._failing:
            log.info("reading the API keys from the server again")
        self._failing = False
        if changed:
            log.info("API keys updated from the server")


def make_plugin(settings: Settings) -> KeyAuth:
    path = settings.key_copy_path if settings.key_store == "clickhouse" else settings.keys_path
    return KeyAuth(KeyStore(path, refresh_s=settings.key_refresh_s))
