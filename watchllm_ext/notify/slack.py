"""The Slack notifier: each Guardian alert as a message to a Slack-compatible incoming webhook
(`alert_slack_webhook_url`; Mattermost and Rocket.Chat take the same JSON), retried like the
webhook."""

from __future__ import annotations

import json
from typing import Any

from ..guardian.alert import Alert
from ..hookspecs import hookimpl
from ..settings import Settings
from .delivery import post_with_retries
from .webhook import NotConfigured


def slack_message(alert: Alert) -> dict[str, Any]:
    icon = ":rotating_light:" if alert.state == "firing" else ":white_check_mark:"
    text = f"{icon} WatchLLM Guardian {alert.summary()}"
    if alert.state == "firing" and alert.rule.block:
        text += " - blocking until it recovers"
    return {"text": text}


class SlackNotifier:
    def __init__(self, url: str, retries: int) -> None:
        self.url = url
        self.retries = retries

    @hookimpl
    async def on_alert(self, alert: Alert) -> None:
        body = json.dumps(slack_message(alert)).encode()
        headers = {"Content-Type": "application/json"}
        await post_with_retries(self.url, body, headers, self.retries)


def make_plugin(settings: Settings) -> Any:
    if not settings.alert_slack_webhook_url:
        return NotConfigured()
    return SlackNotifier(settings.alert_slack_webhook_url, settings.alert_webhook_retries)
