"""The answer of a quota check (the `check_quota` hook)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    allowed: bool
    retry_after_s: float = 1.0
    limit: int | None = None
    remaining: int | None = None
    reset_s: float | None = None
    reason: str = "quota exceeded"
    # The IETF RateLimit-Policy and RateLimit fields (draft-ietf-httpapi-ratelimit-headers),
    # e.g. '"day";q=1000;w=86400' and '"day";r=0;t=3600'.
    policy: str | None = None
    ratelimit: str | None = None
    # Extra fields of the 429 body (how many events would fit, the window, `field`).
    extra: Mapping[str, Any] | None = None

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if not self.allowed:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        if self.limit is not None:
            headers["X-RateLimit-Limit"] = str(self.limit)
        if self.remaining is not None:
            headers["X-RateLimit-Remaining"] = str(max(0, self.remaining))
        if self.reset_s is not None:
            headers["X-RateLimit-Reset"] = str(max(0, round(self.reset_s)))
        if self.policy is not None:
            headers["RateLimit-Policy"] = self.policy
        if self.ratelimit is not None:
            headers["RateLimit"] = self.ratelimit
        return headers
