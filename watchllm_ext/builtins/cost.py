"""Built-in cost estimate for prompt calls, from the genai-prices tables.

Order (what users ask for): the cost the client reported (`client`); else a price from the
`model_prices` setting, for custom and fine-tuned models, or from genai-prices, times the
tokens (`computed`); else `unknown`. Lookups are cached per (provider, model), and each
price is turned once into integer formulas per token bracket (see _Price): the library's
calculation costs tens of microseconds, far too much to pay per event at ingest rates.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from fractions import Fraction
from functools import lru_cache
from math import lcm
from typing import Any

from ..auth import Principal
from ..hookspecs import hookimpl
from ..schema import MAX_COST_USD
from ..settings import Settings

log = logging.getLogger("watchllm.cost")
_MTOK = 1_000_000


class _Price:
    """The cost of one model's tokens, in exact integer arithmetic.

    Within one token bracket (the input-token range between two tier starts; flat prices have
    one bracket) a library price is linear: cost = (a + b * tokens_in + c * tokens_out) / d,
    with a (say, a price per request), b, c and d integers. They are computed once per bracket
    from the library's own calc_price, so a cost is a bisect and integer arithmetic (well
    under a microsecond), not a calc_price call (60-140 us for tiered prices). The library
    computes in exact Decimals and float() rounds once; Python's int / int rounds the same
    exact value once, so the floats are identical.
    """

    __slots__ = ("_brackets", "_fallback", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._brackets: list[tuple[int, int, int, int]] = []
        self._fallback: Any = None

    @classmethod
    def from_library(cls, model_price: Any) -> _Price:
        price = cls()
        try:
            price._starts = _tier_starts(model_price)
            price._brackets = [
                _bracket(model_price, low, high)
                for low, high in zip(
                    [0, *(s + 1 for s in price._starts)],
                    [*price._starts, None],
                    strict=True,
                )
            ]
        except Exception as exc:  # a price this code cannot decompose: ask the library
            log.warning("price %s has no linear form (%s); using calc_price", model_price, exc)
            price._fallback = model_price
        return price

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        if self._fallback is not None:
            return _library_cost(self._fallback, tokens_in, tokens_out)
        # A tier applies when the input tokens are over its start (genai-prices' rule).
        base, per_in, per_out, scale = self._brackets[bisect_left(self._starts, tokens_in)]
        return (base + per_in * tokens_in + per_out * tokens_out) / scale


class _CustomPrice:
    """A price from the model_prices setting: USD per million input and output tokens."""

    __slots__ = ("input", "output")

    def __init__(self, input_mtok: float, output_mtok: float) -> None:
        self.input = input_mtok
        self.output = output_mtok

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input + tokens_out * self.output) / _MTOK


def _tier_starts(model_price: Any) -> list[int]:
    from genai_prices.types import TieredPrices

    starts = {
        tier.start
        for value in vars(model_price).values()
        if isinstance(value, TieredPrices)
        for tier in value.tiers
    }
    return sorted(starts)


def _library_cost_exact(model_price: Any, tokens_in: int, tokens_out: int) -> Fraction:
    from genai_prices import Usage

    total = model_price.calc_price(Usage(input_tokens=tokens_in, output_tokens=tokens_out))
    return Fraction(total["total_price"])


def _library_cost(model_price: Any, tokens_in: int, tokens_out: int) -> float:
    return float(_library_cost_exact(model_price, tokens_in, tokens_out))


def _bracket(model_price: Any, low: int, high: int | None) -> tuple[int, int, int, int]:
    """(a, b, c, d) of the bracket of input tokens low..high (inclusive; None: no end)."""
    at_low = _library_cost_exact(model_price, low, 0)
    per_out = _library_cost_exact(model_price, low, 1) - at_low
    if high is None or high > low:
        per_in = _library_cost_exact(model_price, low + 1, 0) - at_low
    else:
        per_in = Fraction(0)  # a bracket of one token count
    base = at_low - per_in * low
    scale = lcm(base.denominator, per_in.denominator, per_out.denominator)
    # The form must give back what the library says at the bracket's far end too.
    far = high if high is not None else low + 1_000_000_007
    if base + per_in * far + per_out * 7 != _library_cost_exact(model_price, far, 7):
        raise ValueError(f"not linear in tokens between {low} and {far}")
    return (
        int(base * scale),
        int(per_in * scale),
        int(per_out * scale),
        scale,
    )


@lru_cache(maxsize=4096)
def _library_price(provider: str | None, model: str) -> _Price | None:
    from genai_prices import Usage, calc_price

    try:
        found = calc_price(
            Usage(input_tokens=0, output_tokens=0), model_ref=model, provider_id=provider
        )
    except LookupError:
        if provider is None:
            return None
        return _library_price(None, model)  # an unknown provider name: match by model alone
    except Exception as exc:  # the library must never break ingestion
        log.warning("price lookup for %s/%s failed: %s", provider, model, exc)
        return None
    return _Price.from_library(found.model_price)


_UNSEEN: Any = object()


class CostEstimator:
    def __init__(self, custom: dict[str, tuple[float, float]]) -> None:
        self.custom = {model: _CustomPrice(p_in, p_out) for model, (p_in, p_out) in custom.items()}

    def ingest_worker_twins(self) -> list[tuple[str, dict[str, Any]]]:
        """The same estimator in an ingest worker process (ingest/worker.py): same prices."""
        prices = {model: (p.input, p.output) for model, p in self.custom.items()}
        return [(f"{__name__}:CostEstimator", {"custom": prices})]

    def price_for(self, provider: str | None, model: str) -> _Price | _CustomPrice | None:
        return self.custom.get(model) or _library_price(provider, model)

    @hookimpl(trylast=True)  # runs after other transforms (say, a redactor that fixes models)
    def transform_events(self, events: list[Any], principal: Principal) -> None:
        prices: dict[tuple[str | None, str], _Price | _CustomPrice | None] = {}  # this batch's
        for event in events:
            # Read and set by attribute: the event structs the server carries have plain
            # slots (tens of nanoseconds); a plugin's pydantic models take the same calls.
            if event.event_type != "prompt_call":
                continue
            if event.cost_estimate_usd is not None:
                event.cost_source = "client"
                continue
            model, tokens_in, tokens_out = event.model, event.tokens_input, event.tokens_output
            price = None
            if model and (tokens_in is not None or tokens_out is not None):
                key = (event.provider, model)
                price = prices.get(key, _UNSEEN)
                if price is _UNSEEN:
                    price = prices[key] = self.price_for(*key)
            if price is None:
                event.cost_source = "unknown"
                continue
            cost = price.cost(tokens_in or 0, tokens_out or 0)
            if cost > MAX_COST_USD:
                # Only absurd token counts get here (billions of tokens on the dearest
                # model): no figure rather than a made-up one, and the event stays within
                # the contract it is read back with from the spool.
                event.cost_source = "unknown"
                continue
            event.cost_estimate_usd = cost
            event.cost_source = "computed"


def make_plugin(settings: Settings) -> CostEstimator:
    return CostEstimator(settings.model_prices)
