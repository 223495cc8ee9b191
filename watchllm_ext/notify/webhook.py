"""The webhook notifier: every Guardian alert (firing and recovered) is POSTed to
`alert_webhook_url` as JSON (`Alert.as_dict()`), signed with HMAC-SHA256 of
"<X-WatchLLM-Timestamp>.<body>" under `alert_webhook_secret` in X-WatchLLM-Signature
(`sha256=<hex>`), and retried up to `alert_webhook_retries` times. X-WatchLLM-Delivery is the
same for every attempt of one notice: a receiver drops the copies it already has."""

from __future__ import annotations

import json
from typing import Any

from ..guardian.alert import Alert
from ..hookspecs import hookimpl
from ..settings import Settings
from .delivery import post_with_retries


class WebhookNotifier:
    def __init__(self, url: str, secret: str | None, retries: int) -> None:
        self.url = url
        self.secret = secret
        self.retries = retries

    @hookimpl
    async def on_alert(self, alert: Alert) -> None:
        body = json.dumps(alert.as_dict(), separators=(",", ":"), sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "watchllm-guardian",
            "X-WatchLLM-Event": f"alert.{alert.state}",
            "X-WatchLLM-Delivery": f"{alert.episode_id}.{alert.state}",
        }
        await post_with_retries(self.url, body, headers, self.retries, sign_with=self.secret)


class NotConfigured:
    """Registered in place of a notifier whose URL is not set (no hooks)."""


def make_plugin(settings: Settings) -> Any:
    if not settings.alert_webhook_url:
        return NotConfigured()
    return WebhookNotifier(
        settings.alert_webhook_url, settings.alert_webhook_secret, settings.alert_webhook_retries
    )
