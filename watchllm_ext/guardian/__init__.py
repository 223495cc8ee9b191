"""Guardian mode: rules over the ingest stream and the stored hourly figures, alert events,
`on_alert` notices once per episode, and blocking through the quota check.

Behind the `guardian` feature flag (per project). The plugin is `watchllm_ext.guardian.plugin`;
this package's top level stays free of server imports (the settings import `rules`).
"""

from __future__ import annotations

from .alert import Alert, printable, window_text
from .rules import GuardianRule

__all__ = ["Alert", "GuardianRule", "printable", "window_text"]
