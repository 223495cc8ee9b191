"""A small synchronous client for the ingestion API."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from .transport import check_base_url


class WatchLLMError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


@dataclass
class SendResult:
    status: int
    accepted: int
    event_ids: list[str]
    rejected: list[dict[str, Any]] = field(default_factory=list)


class WatchLLMClient:
    """`WatchLLMClient(url, key).send([event, ...])` posts one batch and returns the answer.

    Events are plain dicts in the v1 contract; `event_id` and `timestamp` are filled in when
    missing, so a retried send carries the same id and is stored once.
    """

    def __init__(self, url: str, api_key: str, *, timeout_s: float = 10.0) -> None:
        self._http = httpx.Client(
            base_url=check_base_url(url, "url").rstrip("/"),
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    @staticmethod
    def new_event(event_type: str, run_id: str, **fields: Any) -> dict[str, Any]:
        return {
            "event_id": uuid.uuid4().hex,
            "event_type": event_type,
            "run_id": run_id,
            "timestamp": datetime.now(UTC).isoformat(),
            **fields,
        }

    def send(self, events: Iterable[Mapping[str, Any]]) -> SendResult:
        batch = []
        for event in events:
            item = dict(event)
            item.setdefault("event_id", uuid.uuid4().hex)
            item.setdefault("timestamp", datetime.now(UTC).isoformat())
            batch.append(item)
        response = self._http.post("/v1/events/batch", json={"events": batch})
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code not in (202, 207):
            raise WatchLLMError(response.status_code, body)
        return SendResult(
            response.status_code, body["accepted"], body["event_ids"], body.get("rejected", [])
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> WatchLLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
