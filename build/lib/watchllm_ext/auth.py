"""Who is calling: the Principal a key resolves to, and the scope rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["ingest", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "admin")

# A scope grants itself and the scopes listed here: admin can do everything, read can read.
_GRANTS: dict[str, frozenset[str]] = {
    "ingest": frozenset({"ingest"}),
    "read": frozenset({"read"}),
    "admin": frozenset({"ingest", "read", "admin"}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    project_id: str
    scopes: frozenset[str]
    key_id: str = ""

    def can(self, scope: Scope) -> bool:
        return any(scope in _GRANTS.get(s, frozenset()) for s in self.scopes)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
