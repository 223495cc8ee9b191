"""Built-in authentication: API keys from the key file (see keys.py)."""

from __future__ import annotations

from starlette.requests import Request

from ..auth import Principal
from ..hookspecs import hookimpl
from ..keys import KeyStore
from ..settings import Settings


class KeyAuth:
    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    # trylast: a third-party authenticator (SSO, a gateway's header) is asked first.
    @hookimpl(trylast=True)
    def authenticate(self, token: str, request: Request | None) -> Principal | None:
        return self.keys.authenticate(token)


def make_plugin(settings: Settings) -> KeyAuth:
    return KeyAuth(KeyStore(settings.keys_path, refresh_s=settings.key_refresh_s))
