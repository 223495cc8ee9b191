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
        """One line for the log and the notifiers: the project and subject (an ingest key's
        free text) with their control characters escaped, so they cannot forge lines."""
        who = printable(self.project_id)
        if self.subject:
            who += f" {self.rule.per} {printable(self.subject)}"
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


def printable(text: str) -> str:
    """`text` with every character that is not printable (CR, LF and the other C0 and C1
    controls, the line and paragraph separators, bidi overrides...) written as its Python
    escape (`\\n`, `\\x1b`, `\\u2028`): event data put in a log line or a notice stays one
    line and shows what it holds."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def window_text(seconds: float) -> str:
    """3600 -> '1h', 300 -> '5m', 90 -> '90s': the `window` field of an alert event."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
