"""POSTing a notice: signing, and retries with backoff."""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import time

import anyio
import httpx

log = logging.getLogger("watchllm.notify")

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
TIMEOUT_S = 10.0
# A receiver that answers one of these may take the same notice later; any other 4xx will
# refuse it every time.
RETRYABLE_4XX = frozenset({408, 409, 425, 429})


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`, as in X-WatchLLM-Signature."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str, timestamp: str, body: bytes, signature: str, tolerance_s: float = 300.0
) -> bool:
    """For a receiver: is this notice from us, and recent (replays of old ones refused)?"""
    try:
        sent = float(timestamp)
    except ValueError:
        return False
    if abs(time.time() - sent) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


async def post_with_retries(
    url: str,
    body: bytes,
    headers: dict[str, str],
    retries: int,
    *,
    sign_with: str | None = None,
    initial_s: float = RETRY_INITIAL_S,
) -> bool:
    """POST until a 2xx, at most 1 + `retries` times, with jittered exponential backoff (or
    the receiver's Retry-After). Each attempt is signed afresh (its own timestamp). Returns
    whether it was delivered; failures are logged, never raised."""
    delay = initial_s
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        for attempt in range(retries + 1):
            sent = dict(headers)
            if sign_with is not None:
                stamp = str(int(time.time()))
                sent["X-WatchLLM-Timestamp"] = stamp
                sent["X-WatchLLM-Signature"] = sign(sign_with, stamp, body)
            wait = delay * random.uniform(0.5, 1.0)
            try:
                answer = await client.post(url, content=body, headers=sent)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if answer.is_success:
                    return True
                problem = f"HTTP {answer.status_code}"
                if answer.status_code < 500 and answer.status_code not in RETRYABLE_4XX:
                    log.error("notice to %s refused (%s); not retried", _host(url), problem)
                    return False
                wait = max(wait, _retry_after(answer))
            if attempt == retries:
                log.error(
                    "notice to %s failed %d times (%s); dropped", _host(url), attempt + 1, problem
                )
                return False
            log.warning("notice to %s failed (%s); retrying in %.1f s", _host(url), problem, wait)
            await anyio.sleep(wait)
            delay = min(delay * 2, RETRY_MAX_S)
    return False


def _retry_after(answer: httpx.Response) -> float:
    try:
        return min(float(answer.headers.get("retry-after", "0")), RETRY_MAX_S)
    except ValueError:
        return 0.0


def _host(url: str) -> str:
    # Webhook URLs (Slack's above all) carry their secret in the path: log the host only.
    return httpx.URL(url).host
