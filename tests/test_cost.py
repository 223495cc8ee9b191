"""The cost estimate: every price in the genai-prices tables, tiered or flat, gives exactly what
the library's calc_price gives, at any token count (around every tier start too), without
calling it per event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import genai_prices
import pytest
from conftest import prompt_call
from genai_prices import Usage, calc_price, data
from genai_prices.types import ConditionalPrice, TieredPrices

from watchllm_ext.builtins.cost import CostEstimator, _Price, _tier_starts
from watchllm_ext.ingest.fast_validate import to_model, validate_fast
from watchllm_ext.schema import EVENT_ADAPTER, MAX_COST_USD


def _every_price() -> Iterator[tuple[str, Any]]:
    for provider in data.providers:
        for model in provider.models:
            prices = model.prices if isinstance(model.prices, list) else [model.prices]
            for n, price in enumerate(prices):
                found = price.prices if isinstance(price, ConditionalPrice) else price
                yield f"{provider.id}/{model.id}#{n}", found
            for n, variant in enumerate(model.price_variants or []):
                yield f"{provider.id}/{model.id}~{n}", variant.prices


def _token_counts(starts: list[int]) -> list[int]:
    counts = {0, 1, 999, 128_000, 10_000_000}
    for start in starts:
        counts.update(c for c in (start - 1, start, start + 1) if c >= 0)
    return sorted(counts)


def test_every_price_in_the_tables_matches_calc_price_exactly() -> None:
    checked = tiered = 0
    mismatches: list[str] = []
    for name, model_price in _every_price():
        price = _Price.from_library(model_price)
        assert price._fallback is None, f"{name} has no precomputed form"
        starts = _tier_starts(model_price)
        tiered += bool(starts)
        for tokens_in in _token_counts(starts):
            for tokens_out in (0, 777):
                usage = Usage(input_tokens=tokens_in, output_tokens=tokens_out)
                expected = float(model_price.calc_price(usage)["total_price"])
                got = price.cost(tokens_in, tokens_out)
                checked += 1
                if got != expected:  # identical floats, not approximately equal
                    mismatches.append(f"{name} ({tokens_in}, {tokens_out}): {got} != {expected}")
    assert not mismatches, mismatches[:20]
    assert tiered > 100, tiered  # the tables hold hundreds of tiered prices; all were seen
    assert checked > 10_000, checked


def _model_price(model: str, provider: str) -> Any:
    return calc_price(Usage(input_tokens=0), model_ref=model, provider_id=provider).model_price


def test_tiered_model_cost_in_events_across_the_tier_start() -> None:
    model_price = _model_price("gemini-1.5-flash", "google")
    starts = _tier_starts(model_price)
    assert starts and any(isinstance(v, TieredPrices) for v in vars(model_price).values())
    estimator = CostEstimator({})
    events = [
        EVENT_ADAPTER.validate_python(
            prompt_call(
                f"t{n}",
                model="gemini-1.5-flash",
                provider="google",
                tokens_input=tokens_in,
                tokens_output=500,
            )
        )
        for n, tokens_in in enumerate((starts[0], starts[0] + 1))
    ]
    estimator.transform_events(events=events, principal=None)  # type: ignore[arg-type]
    below, above = (e.cost_estimate_usd for e in events)
    for event, tokens_in in zip(events, (starts[0], starts[0] + 1), strict=True):
        usage = Usage(input_tokens=tokens_in, output_tokens=500)
        assert event.cost_source == "computed"
        assert event.cost_estimate_usd == float(model_price.calc_price(usage)["total_price"])
    # One token more crosses the start: every token pays the higher rate (a cliff, not a step).
    assert above > below * 1.5


def test_a_cost_after_the_first_lookup_never_calls_the_library(monkeypatch: Any) -> None:
    """Speed is measured in bench/bench_cost.py; here: no calc_price per event, which is what
    made tiered prices cost 60-140 us. After the first lookup of a model the library is
    replaced by one that fails, and costs keep coming, identical."""
    estimator = CostEstimator({})
    price = estimator.price_for("google", "gemini-1.5-flash")
    assert isinstance(price, _Price)
    counts = [(n * 997 % 300_000, n % 4_000) for n in range(500)]
    before = [price.cost(tokens_in, tokens_out) for tokens_in, tokens_out in counts]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("calc_price called per event")

    monkeypatch.setattr(type(_model_price("gemini-1.5-flash", "google")), "calc_price", refuse)
    assert [price.cost(tokens_in, tokens_out) for tokens_in, tokens_out in counts] == before
    assert estimator.price_for("google", "gemini-1.5-flash") is price  # cached


def test_a_computed_cost_over_the_contract_limit_is_unknown_and_survives_the_spool() -> None:
    """Billions of tokens on the dearest model price above MAX_COST_USD: no made-up figure, and
    the event still validates when read back from the spool (a capped value would not)."""
    from watchllm_ext.app import _decode_events, _encode_events

    estimator = CostEstimator({"huge-model": (1_000.0, 1_000.0)})  # USD per million tokens
    events = [
        EVENT_ADAPTER.validate_python(
            prompt_call("big", model="huge-model", tokens_input=0, tokens_output=4_000_000_000)
        ),
        EVENT_ADAPTER.validate_python(
            prompt_call("ok", model="huge-model", tokens_input=1_000, tokens_output=1_000)
        ),
    ]
    estimator.transform_events(events=events, principal=None)  # type: ignore[arg-type]
    big, ok = events
    assert big.cost_source == "unknown" and big.cost_estimate_usd is None
    assert ok.cost_source == "computed" and ok.cost_estimate_usd == 2.0
    assert MAX_COST_USD < 4_000 * 1_000.0
    back = _decode_events(_encode_events(events))
    assert [to_model(e).model_dump() for e in back] == [e.model_dump() for e in events]


def _structs(events: list[dict[str, Any]]) -> list[Any]:
    """Events as the server carries them (fast_validate's structs)."""
    found = validate_fast(json.dumps(events).encode(), "events")
    assert found is not None and len(found) == len(events)
    return found


def test_the_cost_of_the_server_structs_is_the_cost_of_the_models() -> None:
    """The transform works on the structs the server carries (no conversion): every kind of
    price and outcome gives what it gives on the models."""
    estimator = CostEstimator({"custom-model": (3.0, 15.0), "huge-model": (1_000.0, 1_000.0)})
    raw = [
        prompt_call("a", model="gpt-4o", provider="openai", tokens_input=1200, tokens_output=300),
        prompt_call("b", model="gemini-1.5-flash", provider="google", tokens_input=200_000),
        prompt_call("c", model="custom-model", tokens_input=10, tokens_output=10),
        prompt_call("d", model="no-such-model", tokens_input=10),
        prompt_call("e", model="gpt-4o", cost_estimate_usd=0.5),
        prompt_call("f", model="huge-model", tokens_output=4_000_000_000),
        {
            "event_id": "g",
            "event_type": "error",
            "run_id": "r",
            "error_type": "E",
            "error_message": "m",
        },
    ]
    structs = _structs(raw)
    models = [EVENT_ADAPTER.validate_python(e) for e in raw]
    estimator.transform_events(events=structs, principal=None)  # type: ignore[arg-type]
    estimator.transform_events(events=models, principal=None)  # type: ignore[arg-type]
    for struct, model in zip(structs, models, strict=True):
        assert to_model(struct).model_dump() == model.model_dump()
    assert [getattr(s, "cost_source", None) for s in structs] == [
        "computed",
        "computed",
        "computed",
        "unknown",
        "client",
        "unknown",
        None,
    ]


def test_pricing_an_event_calls_no_library_code_once_its_model_is_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Why a cost takes well under a microsecond (bench/bench_cost.py measures it; a timed
    assertion here would fail on a busy machine): after a model's first event, pricing any
    token count, in any tier, is the precomputed brackets' arithmetic, not a calc_price."""
    from watchllm_ext.builtins import cost

    estimator = CostEstimator({})
    models = [("gpt-4o", "openai"), ("gemini-1.5-flash", "google")]  # flat, tiered
    first = _structs([prompt_call(f"w{m}", model=m, provider=p) for m, p in models])
    estimator.transform_events(events=first, principal=None)  # type: ignore[arg-type]
    calls: list[str] = []

    def counted(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(cost, "_library_cost_exact", counted("bracket", cost._library_cost_exact))
    monkeypatch.setattr(genai_prices, "calc_price", counted("calc_price", calc_price))
    raw = [
        prompt_call(f"x{i}", model=m, provider=p, tokens_input=i * 997 % 300_000, tokens_output=i)
        for i in range(2_000)
        for m, p in [models[i % 2]]
    ]
    structs = _structs(raw)
    estimator.transform_events(events=structs, principal=None)  # type: ignore[arg-type]
    assert calls == []
    assert all(s.cost_source == "computed" for s in structs)
    # the tiered model's counts span its tiers (128,000 input tokens for gemini-1.5-flash)
    tiered = [s for s in structs if s.model == "gemini-1.5-flash"]
    assert min(s.tokens_input for s in tiered) < 128_000 < max(s.tokens_input for s in tiered)
