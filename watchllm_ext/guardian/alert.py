"""What the `on_alert` hook receives."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from .rules import GuardianRule

AlertState = Literal["firing", "recovered"]


@dataclass(frozen=True, slots=True)
class Alert:
    """One end of an episode: a rule started firing for a project (and run or user), or it
    recovered. `value` is the figure that crossed the threshold (firing) or the figure at
    recovery (None once the window holds nothing to judge); `event_id` is the stored alert
    event (firing only, when it could be stored)."""

    state: AlertState
    rule: GuardianRule
    project_id: str
    subject: str | None  # the run id or user id for per-run / per-user rules
    value: float | None
    episode_id: str
    started_at: datetime
    at: datetime
    source: Literal["stream", "rollup"]
    event_id: str | None = None

    @property
    def blocking(self) -> bool:
        return self.rule.block and self.state == "firing"

    def summary(self) -> str:
        who = self.project_id + (f" {self.rule.per} {self.subject}" if self.subject else "")
        figure = "n/a" if self.value is None else f"{self.value:.6g}"
        verb = "over" if self.state == "firing" else "back under"
        return (
            f"[{self.state}] rule {self.rule.name} on {who}: {self.rule.metric} {figure} {verb}"
            f" {self.rule.threshold:.6g} (window {window_text(self.rule.window_s)})"
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON body of the notifiers: no event content, only the rule and its figures."""
        return {
            "state": self.state,
            "rule": self.rule.name,
            "metric": self.rule.metric,
            "per": self.rule.per,
            "threshold": self.rule.threshold,
            "window": window_text(self.rule.window_s),
            "window_s": self.rule.window_s,
            "block": self.rule.block,
            "project_id": self.project_id,
            "subject": self.subject,
            "value": self.value,
            "episode_id": self.episode_id,
            "started_at": self.started_at.isoformat(),
            "at": self.at.isoformat(),
            "source": self.source,
            "event_id": self.event_id,
            "summary": self.summary(),
        }


def window_text(seconds: float) -> str:
    """3600 -> '1h', 300 -> '5m', 90 -> '90s': the `window` field of an alert event."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
