"""The OpenAI and Anthropic integrations with the real `openai` and `anthropic` packages,
pointed at a local server that speaks their HTTP APIs (tests/fake_llm.py), JSON and SSE; the
events go through a real WatchLLM server and are read back from its analytics API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from conftest import Running
from fake_llm import FakeLLM

from watchllm_ext.sdk import WatchLLM
from watchllm_ext.sdk.anthropic import wrap as wrap_anthropic
from watchllm_ext.sdk.openai import wrap as wrap_openai

TOOLS_OPENAI = [
    {
        "type": "function",
        "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
    }
]
TOOLS_ANTHROPIC = [{"name": "weather", "input_schema": {"type": "object", "properties": {}}}]
HI = [{"role": "user", "content": "say hello to me"}]  # 4 words: the fake's input tokens


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(chunk_delay_s=0.01) as fake:
        yield fake


def calls(server: Running, client: WatchLLM, run_id: str) -> list[dict[str, Any]]:
    """The run's prompt calls in call order, each as the analytics API shows it whole."""
    assert client.flush(10), client.stats()
    assert client.stats()["dropped_total"] == 0, client.stats()
    server.flush()
    rows = server.query(
        "SELECT event_id FROM events WHERE run_id = {r:String} AND event_type = 'prompt_call'"
        " ORDER BY timestamp",
        {"r": run_id},
    )
    out = []
    for row in rows:
        answer = server.client.get(
            f"/v1/analytics/event/{row['event_id']}", headers=server.headers()
        )
        assert answer.status_code == 200, answer.text
        out.append(answer.json())
    # In call order: the fake numbers its request ids (req_1, req_2, ...); two calls may
    # start within one stored millisecond.
    return sorted(out, key=lambda a: int(a["event"]["response_metadata"]["request_id"][4:]))


def event_of(answer: dict[str, Any]) -> dict[str, Any]:
    """The event's columns, with its tool calls (stored in their own table) beside them."""
    return {**answer["event"], "tool_calls": answer["tool_calls"]}


def test_openai_sync(server: Running, llm: FakeLLM) -> None:
    client = WatchLLM(api_key=server.key, base_url=server.url, flush_interval_s=0.05)
    oai = wrap_openai(openai.OpenAI(api_key="x", base_url=llm.openai_url, max_retries=0))
    untouched = openai.OpenAI(api_key="x", base_url=llm.openai_url, max_retries=0)
    with client.run(name="openai") as run:
        done = oai.chat.completions.create(model="gpt-4o", messages=HI)
        assert done.choices[0].message.content == llm.reply
        stream = oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,
            stream=True,
            stream_options={"include_usage": True},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == llm.reply
        oai.chat.completions.create(model="gpt-4o", messages=HI, tools=TOOLS_OPENAI)
        response = oai.responses.create(model="gpt-4o", input="say hello", instructions="be kind")
        assert response.output_text == llm.reply
        events = list(oai.responses.create(model="gpt-4o", input="say hello", stream=True))
        assert events[-1].type == "response.completed"
        untouched.chat.completions.create(model="gpt-4o", messages=HI)  # not wrapped: no event
        llm.fail_next(500, "the model is down")
        with pytest.raises(openai.InternalServerError):
            oai.chat.completions.create(model="gpt-4o", messages=HI)
    got = [event_of(a) for a in calls(server, client, run.run_id)]
    assert len(got) == 6
    plain, streamed, tool, resp, resp_stream, failed = got
    assert plain["model"] == "gpt-4o" and plain["provider"] == "openai"
    assert (plain["tokens_input"], plain["tokens_output"]) == (4, 5)
    assert plain["response"] == llm.reply and plain["status"] == "success"
    assert plain["prompt"] == HI
    assert plain["response_metadata"]["request_id"].startswith("req_")
    assert plain["response_metadata"]["cached_tokens"] == 2
    assert plain["cost_source"] == "computed" and plain["cost_estimate_usd"] > 0
    assert plain["parent_event_id"] is not None  # under the run's root step
    assert streamed["model"] == "gpt-4o-mini" and streamed["response"] == llm.reply
    assert (streamed["tokens_input"], streamed["tokens_output"]) == (4, 5)
    meta = streamed["response_metadata"]
    assert meta["stream"] is True and meta["request_id"].startswith("req_")
    assert 0 < meta["time_to_first_token_ms"] < streamed["latency_ms"]
    assert streamed["latency_ms"] >= 50  # seven chunks 10 ms apart: timed to the stream's end
    assert tool["tool_calls"][0]["tool_name"] == "weather"
    assert tool["tool_calls"][0]["tool_input"] == {"city": "Paris"}
    assert resp["response"] == llm.reply and resp["response_metadata"]["api"] == "responses"
    assert resp["prompt"] == [
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "say hello"},
    ]
    assert (resp["tokens_input"], resp["tokens_output"]) == (4, 5)
    assert resp["response_metadata"]["cached_tokens"] == 2
    assert resp_stream["response"] == llm.reply and resp_stream["tokens_output"] == 5
    assert failed["status"] == "error" and "the model is down" in failed["error_message"]
    assert failed["response_metadata"]["status_code"] == 500
    client.close()


def test_openai_async(server: Running, llm: FakeLLM) -> None:
    client = WatchLLM(api_key=server.key, base_url=server.url, flush_interval_s=0.05)

    async def main() -> str:
        oai = wrap_openai(openai.AsyncOpenAI(api_key="x", base_url=llm.openai_url), client)
        with client.run(name="async-openai") as run:
            await oai.chat.completions.create(model="gpt-4o", messages=HI)
            stream = await oai.chat.completions.create(model="gpt-4o", messages=HI, stream=True)
            parts = [c.choices[0].delta.content async for c in stream if c.choices]
            assert "".join(p or "" for p in parts) == llm.reply
            stream = await oai.responses.create(model="gpt-4o", input="hi", stream=True)
            async with stream:
                async for _ in stream:
                    break  # closed early: still logged, marked as such
        return run.run_id

    run_id = asyncio.run(main())
    plain, streamed, closed = (event_of(a) for a in calls(server, client, run_id))
    assert plain["tokens_output"] == 5 and plain["response"] == llm.reply
    assert streamed["response"] == llm.reply
    assert streamed["tokens_output"] is None  # a stream reports usage only when asked
    assert closed["response_metadata"]["closed_early"] is True
    client.close()


def test_anthropic_sync_and_async(server: Running, llm: FakeLLM) -> None:
    client = WatchLLM(api_key=server.key, base_url=server.url, flush_interval_s=0.05)
    ant = wrap_anthropic(
        anthropic.Anthropic(api_key="x", base_url=llm.anthropic_url, max_retries=0), client
    )
    model = "claude-3-5-sonnet-20241022"
    with client.run(name="anthropic") as run:
        message = ant.messages.create(model=model, max_tokens=100, messages=HI, system="be brief")
        assert message.content[0].text == llm.reply
        stream = ant.messages.create(model=model, max_tokens=100, messages=HI, stream=True)
        assert sum(1 for _ in stream) > 5
        ant.messages.create(model=model, max_tokens=100, messages=HI, tools=TOOLS_ANTHROPIC)
        llm.fail_next(529, "overloaded")
        with pytest.raises(anthropic.APIStatusError):
            ant.messages.create(model=model, max_tokens=100, messages=HI)

        async def async_calls() -> None:
            aant = wrap_anthropic(
                anthropic.AsyncAnthropic(api_key="x", base_url=llm.anthropic_url), client
            )
            await aant.messages.create(model=model, max_tokens=10, messages=HI)
            stream = await aant.messages.create(
                model=model, max_tokens=10, messages=HI, stream=True, tools=TOOLS_ANTHROPIC
            )
            async for _ in stream:
                pass

        asyncio.run(async_calls())
    got = [event_of(a) for a in calls(server, client, run.run_id)]
    assert len(got) == 6
    plain, streamed, tool, failed, aplain, astream = got
    assert plain["provider"] == "anthropic" and plain["model"] == model
    assert plain["prompt"][0] == {"role": "system", "content": "be brief"}
    assert (plain["tokens_input"], plain["tokens_output"]) == (6, 5)  # system words count
    assert plain["response_metadata"]["finish_reason"] == "end_turn"
    assert plain["response_metadata"]["cache_read_input_tokens"] == 2
    assert streamed["response_metadata"]["cache_read_input_tokens"] == 2
    assert plain["response_metadata"]["request_id"].startswith("req_")
    assert plain["cost_source"] == "computed"
    assert streamed["response"] == llm.reply
    assert (streamed["tokens_input"], streamed["tokens_output"]) == (4, 5)
    assert streamed["response_metadata"]["time_to_first_token_ms"] > 0
    assert tool["tool_calls"] == [
        {**tool["tool_calls"][0], "tool_name": "weather", "tool_input": {"city": "Paris"}}
    ]
    assert failed["status"] == "error" and failed["response_metadata"]["status_code"] == 529
    assert aplain["response"] == llm.reply
    assert astream["tool_calls"][0]["tool_input"] == {"city": "Paris"}
    client.close()


def test_metadata_only_keeps_the_numbers(server: Running, llm: FakeLLM) -> None:
    client = WatchLLM(
        api_key=server.key, base_url=server.url, flush_interval_s=0.05, capture_content=False
    )
    oai = wrap_openai(openai.OpenAI(api_key="x", base_url=llm.openai_url), client)
    with client.run() as run:
        oai.chat.completions.create(model="gpt-4o", messages=HI, tools=TOOLS_OPENAI)
    (event,) = (event_of(a) for a in calls(server, client, run.run_id))
    assert event["prompt"] in (None, "", []) and event["response"] in (None, "")
    assert event["tool_calls"][0]["tool_name"] == "weather"
    assert event["tool_calls"][0].get("tool_input") in (None, "", {})
    assert event["tokens_input"] == 4
    client.close()


def test_stream_helpers(server: Running, llm: FakeLLM) -> None:
    """`messages.stream(...)` (one event per block, from the helper's snapshot, sync and
    async); OpenAI's `chat.completions.stream(...)` and `responses.stream(...)` (through the
    wrapped create: one event each too)."""
    client = WatchLLM(api_key=server.key, base_url=server.url, flush_interval_s=0.05)
    ant = wrap_anthropic(anthropic.Anthropic(api_key="x", base_url=llm.anthropic_url), client)
    oai = wrap_openai(openai.OpenAI(api_key="x", base_url=llm.openai_url), client)
    model = "claude-3-5-sonnet-20241022"
    with client.run(name="helpers") as run:
        with ant.messages.stream(model=model, max_tokens=50, messages=HI) as stream:
            assert "".join(stream.text_stream) == llm.reply
        with oai.chat.completions.stream(
            model="gpt-4o", messages=HI, stream_options={"include_usage": True}
        ) as stream:
            for _ in stream:
                pass
        with oai.responses.stream(model="gpt-4o", input="say hello to me") as stream:
            assert stream.get_final_response().output_text == llm.reply

        async def async_helper() -> None:
            aant = wrap_anthropic(
                anthropic.AsyncAnthropic(api_key="x", base_url=llm.anthropic_url), client
            )
            async with aant.messages.stream(model=model, max_tokens=5, messages=HI) as stream:
                assert (await stream.get_final_message()).content[0].text == llm.reply

        asyncio.run(async_helper())
    got = [event_of(a) for a in calls(server, client, run.run_id)]
    assert [e["response_metadata"]["api"] for e in got] == [
        "messages.stream",
        "chat.completions",
        "responses",
        "messages.stream",
    ]
    for event in got:
        assert event["response"] == llm.reply and event["tokens_output"] == 5, event
        assert event["tokens_input"] == 4 and event["status"] == "success"
        assert event["response_metadata"]["request_id"].startswith("req_")
    client.close()
