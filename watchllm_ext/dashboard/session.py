"""The dashboard's session cookie and CSRF tokens, with the standard library only.

The session cookie holds the API key the user signed in with, so that every page asks the
`authenticate` hook again (a revoked key ends its sessions) and reads through the analytics
routes exactly as an API client would. The key is a secret: the cookie is encrypted, not
only signed (a keystream of HMAC-SHA256 blocks over a random nonce, then an HMAC-SHA256 tag
over nonce and ciphertext: encrypt-then-MAC), and `HttpOnly`, so page scripts never see it.

The secret is `dashboard_secret` from settings, or 32 random bytes written once into
`<data_dir>/dashboard-secret` (mode 0600) and read from there by every later start and by
every process sharing the data folder.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from ..settings import Settings
from ..store.folders import make_private_folder

SECRET_FILE = "dashboard-secret"
_NONCE = 16
_TAG = 32


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
        # Separate keys for encryption and authentication, derived from the one secret.
        self._enc = hmac.new(secret, b"watchllm-dashboard-enc", hashlib.sha256).digest()
        self._mac = hmac.new(secret, b"watchllm-dashboard-mac", hashlib.sha256).digest()

    def _stream(self, nonce: bytes, n: int) -> bytes:
        blocks = (n + 31) // 32
        return b"".join(
            hmac.new(self._enc, nonce + i.to_bytes(4, "big"), hashlib.sha256).digest()
            for i in range(blocks)
        )[:n]

    def seal(self, payload: dict[str, Any]) -> str:
        plain = json.dumps(payload, separators=(",", ":")).encode()
        nonce = secrets.token_bytes(_NONCE)
        cipher = bytes(a ^ b for a, b in zip(plain, self._stream(nonce, len(plain)), strict=True))
        tag = hmac.new(self._mac, nonce + cipher, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(nonce + cipher + tag).decode().rstrip("=")

    def unseal(self, token: str | None, max_age_s: float) -> dict[str, Any] | None:
        """The payload, or None for anything forged, damaged or older than max_age_s."""
        if not token or len(token) > 8192:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) < _NONCE + _TAG:
            return None
        nonce, cipher, tag = raw[:_NONCE], raw[_NONCE:-_TAG], raw[-_TAG:]
        if not hmac.compare_digest(
            tag, hmac.new(self._mac, nonce + cipher, hashlib.sha256).digest()
        ):
            return None
        plain = bytes(a ^ b for a, b in zip(cipher, self._stream(nonce, len(cipher)), strict=True))
        try:
            payload = json.loads(plain)
        except ValueError:
            return None
        issued = payload.get("iat") if isinstance(payload, dict) else None
        if not isinstance(issued, int | float) or time.time() - issued > max_age_s:
            return None
        return payload

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
