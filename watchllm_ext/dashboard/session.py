"""The dashboard's session cookie and CSRF tokens.

The session cookie holds the API key the user signed in with, so that every page asks the
`authenticate` hook again (a revoked key ends its sessions) and reads through the analytics
routes exactly as an API client would. The key is a secret: the cookie is encrypted, not
only signed (cryptography's Fernet: AES-128-CBC and HMAC-SHA256, encrypt-then-MAC, with the
time it was made, which bounds its age), and `HttpOnly`, so page scripts never see it.

The secret is `dashboard_secret` from settings, or 32 random bytes written once into
`<data_dir>/dashboard-secret` (mode 0600) and read from there by every later start and by
every process sharing the data folder.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..settings import Settings
from ..store.folders import make_private_folder

SECRET_FILE = "dashboard-secret"


def load_secret(settings: Settings) -> bytes:
    """The session secret: the setting, else the data folder's file (made on first use)."""
    if settings.dashboard_secret:
        return settings.dashboard_secret.get_secret_value().encode()
    path = Path(settings.data_dir) / SECRET_FILE
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    make_private_folder(path.parent)
    try:
        # O_EXCL: two processes starting at once agree on the one that got there first.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    value = path.read_text().strip()
    if len(value) < 32:
        raise ValueError(f"{path}: the dashboard secret is shorter than 32 characters")
    return value.encode()


class Sealer:
    """Encrypts and authenticates small JSON payloads (cookies) under one secret."""

    def __init__(self, secret: bytes) -> None:
        # Separate keys for the cookies (Fernet's own two) and the CSRF tags, from one secret.
        derived = HKDF(
            algorithm=hashes.SHA256(), length=64, salt=None, info=b"watchllm-dashboard"
        ).derive(secret)
        self._fernet = Fernet(base64.urlsafe_b64encode(derived[:32]))
        self._mac = derived[32:]

    def seal(self, payload: dict[str, Any]) -> str:
        plain = json.dumps(payload, separators=(",", ":")).encode()
        return self._fernet.encrypt(plain).decode()

    def unseal(self, token: str | None, max_age_s: float) -> dict[str, Any] | None:
        """The payload, or None for anything forged, damaged, made in the future or older
        than max_age_s."""
        if not token or len(token) > 8192:
            return None
        try:
            plain = self._fernet.decrypt(token, ttl=max_age_s)
            payload = json.loads(plain)
        except (InvalidToken, ValueError):
            return None
        return payload if isinstance(payload, dict) else None

    def sign(self, value: str) -> str:
        """`value.tag`: a value the server gave out (the sign-in form's CSRF cookie)."""
        tag = hmac.new(self._mac, b"sign:" + value.encode(), hashlib.sha256).hexdigest()
        return f"{value}.{tag}"

    def unsign(self, signed: str | None) -> str | None:
        if not signed or "." not in signed or len(signed) > 512:
            return None
        value, _, tag = signed.rpartition(".")
        expected = hmac.new(self._mac, b"sign:" + value.encode(), hashlib.sha256).hexdigest()
        return value if hmac.compare_digest(tag, expected) else None


def new_token() -> str:
    return secrets.token_urlsafe(24)


def same_token(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
