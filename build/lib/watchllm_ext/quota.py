"""The answer of a quota check (the `check_quota` hook)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    allowed: bool
    retry_after_s: float = 1.0
    limit: int | None = None
    remaining: int | None = None
    reset_s: float | None = None
    reason: str = "quota exceeded"

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
        return headers
