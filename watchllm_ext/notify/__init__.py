"""Alert notifiers (`on_alert` plugins): a signed JSON webhook and a Slack incoming webhook.
Both are built in and stay silent until their URL setting is set."""

from __future__ import annotations

from .delivery import post_with_retries, sign, verify_signature

__all__ = ["post_with_retries", "sign", "verify_signature"]
