"""Who is calling: the Principal a key resolves to, and the scope rules (docs/API.md, "Keys and
scopes").

Every key belongs to one project. `ingest` writes its events, `read` reads its analytics,
`admin` does both and administers that project only (its counts, its dead letters). `operator`
is the instance-wide role: it administers every project (counts of any or all projects, every
dead letter). It is only ever given by name (`watchllm keys create --scope operator`); no other
scope implies it. Ingest stays bound to the key's own project for every scope; analytics
too, except for an operator key, which names the project it reads (`project_id`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

Scope = Literal["ingest", "read", "admin", "operator"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "admin", "operator")

# A scope grants itself and the scopes listed here. admin grants no operator: an admin key of
# project A must never reach project B.
_GRANTS: dict[str, frozenset[str]] = {
    "ingest": frozenset({"ingest"}),
    "read": frozenset({"read"}),
    "admin": frozenset({"ingest", "read", "admin"}),
    "operator": frozenset({"ingest", "read", "admin", "operator"}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    project_id: str
    scopes: frozenset[str]
    key_id: str = ""

    def __post_init__(self) -> None:
        if type(self.scopes) is not frozenset:
            # A plugin's set or list of scopes: hashable, as the grants' cache needs.
            object.__setattr__(self, "scopes", frozenset(self.scopes))

    def can(self, scope: Scope) -> bool:
        return scope in _granted(self.scopes)

    def administers(self, project_id: str | None) -> bool:
        """May this key administer `project_id` (None: every project at once)?"""
        if self.can("operator"):
            return True
        return self.can("admin") and project_id == self.project_id


@functools.lru_cache(maxsize=1024)
def _granted(scopes: frozenset[str]) -> frozenset[str]:
    """Every scope that `scopes` grant. Asked on every request; keys have a few shapes of
    scopes (a plugin's principals may bring more: the cache is bounded)."""
    return frozenset().union(*(_GRANTS.get(s, frozenset()) for s in scopes))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
