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
    # The summary holds the subject (a user or run id any ingest key writes): escaped, its
    # `<!channel>` or `<https://...|text>` is shown as typed, never pings or links.
    text = f"{icon} WatchLLM Guardian {slack_escape(alert.summary())}"
    if alert.state == "firing" and alert.rule.block:
        text += " - blocking until it recovers"
    return {"text": text}


def slack_escape(text: str) -> str:
    """Slack's escaping of message text (&, <, >: api.slack.com/reference/surfaces/formatting
    #escaping); the summary has no markup of ours, so all of it is escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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
