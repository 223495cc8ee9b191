"""A base_url that can never work (no http:// or https://, no host) is refused when the client
is made, with a ValueError naming it, instead of being retried as a server that is down for
retry_for_s and then dropped; the log_* calls still never raise (docs/SDK.md)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from watchllm_ext.sdk import AsyncWatchLLM, WatchLLM, WatchLLMClient, core, get_client, observe

BAD = ["127.0.0.1:8821", "localhost:8821", "ftp://host/", "http://", "http:///v1", "http://h:x"]
GOOD = ["http://127.0.0.1:8821", "https://watchllm.example.com/base/", "HTTP://[::1]:8821"]


@pytest.fixture(autouse=True)
def no_default_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[WatchLLM]]:
    monkeypatch.delenv("WATCHLLM_BASE_URL", raising=False)
    monkeypatch.delenv("WATCHLLM_API_KEY", raising=False)
    monkeypatch.setattr(core, "_default_client", None)
    made: list[WatchLLM] = []
    yield made
    for client in made:
        client._close(0)


@pytest.mark.parametrize("cls", [WatchLLM, AsyncWatchLLM])
@pytest.mark.parametrize("url", BAD)
def test_a_bad_base_url_is_refused_at_construction(cls: type[WatchLLM], url: str) -> None:
    with pytest.raises(ValueError, match=r"^base_url: must be an http:// or https:// URL") as e:
        cls(api_key="wllm_k", base_url=url, retry_for_s=300)
    assert repr(url) in str(e.value)


def test_the_message_says_what_was_meant() -> None:
    with pytest.raises(ValueError) as raised:
        WatchLLM(api_key="wllm_k", base_url="127.0.0.1:8821")
    assert str(raised.value) == (
        "base_url: must be an http:// or https:// URL with a host, such as"
        " http://127.0.0.1:8787, not '127.0.0.1:8821' (no scheme; did you mean"
        " 'http://127.0.0.1:8821'?)"
    )


@pytest.mark.parametrize("cls", [WatchLLM, AsyncWatchLLM])
@pytest.mark.parametrize("url", GOOD)
def test_good_base_urls_are_kept(
    cls: type[WatchLLM], url: str, no_default_client: list[WatchLLM]
) -> None:
    client = cls(api_key="wllm_k", base_url=url)
    no_default_client.append(client)
    assert client.base_url == url and client.transport_name == "http"


def test_the_variable_is_checked_and_named(
    monkeypatch: pytest.MonkeyPatch, no_default_client: list[WatchLLM]
) -> None:
    monkeypatch.setenv("WATCHLLM_API_KEY", "wllm_k")
    monkeypatch.setenv("WATCHLLM_BASE_URL", "127.0.0.1:8821")
    for cls in (WatchLLM, AsyncWatchLLM):
        with pytest.raises(ValueError, match=r"^base_url \(from WATCHLLM_BASE_URL\): must be"):
            cls()
    # An argument wins over the variable, as before; so does enabled=False (sends nothing).
    client = WatchLLM(base_url="http://127.0.0.1:8821")
    disabled = WatchLLM(enabled=False)
    no_default_client += [client, disabled]
    assert client.transport_name == "http" and disabled.transport_name == "disabled"


def test_the_one_batch_client_checks_its_url() -> None:
    with pytest.raises(ValueError, match=r"^url: must be an http:// or https:// URL"):
        WatchLLMClient("127.0.0.1:8821", "wllm_k")
    WatchLLMClient("http://127.0.0.1:8821", "wllm_k").close()


def test_observed_calls_never_raise_on_a_bad_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: Any, no_default_client: list[WatchLLM]
) -> None:
    # @observe and the integrations make the client from the environment at their first call
    # (get_client()): a bad variable must not raise into the app's function.
    monkeypatch.setenv("WATCHLLM_API_KEY", "wllm_k")
    monkeypatch.setenv("WATCHLLM_BASE_URL", "127.0.0.1:8821")

    @observe
    def answer(x: int) -> int:
        return x + 1

    with caplog.at_level(logging.ERROR, logger="watchllm.sdk"):
        assert answer(1) == 2 and answer(2) == 3
    client = get_client()
    no_default_client.append(client)
    assert not client.enabled and client.transport_name == "disabled"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "WATCHLLM_BASE_URL" in errors[0].getMessage()
    assert client.stats()["last_error"] == errors[0].getMessage()
    assert isinstance(client.log_tool_call("t"), str)  # still never raises
