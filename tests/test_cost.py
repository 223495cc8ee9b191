"""The cost estimate: every price in the genai-prices tables, tiered or flat, gives exactly what
the library's calc_price gives, at any token count (around every tier start too), without
calling it per event."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from conftest import prompt_call
from genai_prices import Usage, calc_price, data
from genai_prices.types import ConditionalPrice, TieredPrices

from watchllm_ext.builtins.cost import CostEstimator, _Price, _tier_starts
from watchllm_ext.schema import EVENT_ADAPTER


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


def test_a_tiered_cost_takes_under_a_microsecond() -> None:
    price = CostEstimator({}).price_for("google", "gemini-1.5-flash")
    assert price is not None
    best = min(_per_call_s(price) for _ in range(5))
    # calc_price took 60-140 us here; the precomputed form about 0.3 us. The bound leaves
    # room for a busy machine.
    assert best < 1e-6 * 2, f"{best * 1e6:.2f} us per cost"


def _per_call_s(price: _Price) -> float:
    counts = [(n * 997 % 300_000, n % 4_000) for n in range(2_000)]
    start = time.perf_counter()
    for tokens_in, tokens_out in counts:
        price.cost(tokens_in, tokens_out)
    return (time.perf_counter() - start) / len(counts)
