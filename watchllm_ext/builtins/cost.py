"""Built-in cost estimate for prompt calls, from the genai-prices tables.

Order (what users ask for): the cost the client reported (`client`); else a price from the
`model_prices` setting, for custom and fine-tuned models, or from genai-prices, times the
tokens (`computed`); else `unknown`. Lookups are cached per (provider, model): a lookup
costs tens of microseconds, far too much to pay per event at ingest rates.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from ..auth import Principal
from ..hookspecs import hookimpl
from ..settings import Settings

log = logging.getLogger("watchllm.cost")
_MTOK = 1_000_000


class _Price:
    """USD per million tokens of one model; tiered prices (None here) fall back to the
    library's own calculation."""

    __slots__ = ("input", "library_price", "output")

    def __init__(self, input_mtok: float | None, output_mtok: float | None, library: Any):
        self.input = input_mtok
        self.output = output_mtok
        self.library_price = library

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        if self.input is not None and self.output is not None:
            return (tokens_in * self.input + tokens_out * self.output) / _MTOK
        from genai_prices import Usage

        calc = self.library_price.calc_price(
            Usage(input_tokens=tokens_in, output_tokens=tokens_out)
        )
        return float(calc["total_price"])


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
    price = found.model_price
    flat_in = price.input_mtok
    flat_out = price.output_mtok
    # Tiered prices are objects, flat ones are Decimals; only flat ones take the fast path.
    if _is_number(flat_in) and _is_number(flat_out or 0):
        return _Price(float(flat_in), float(flat_out or 0), price)
    return _Price(None, None, price)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class CostEstimator:
    def __init__(self, custom: dict[str, tuple[float, float]]) -> None:
        self.custom = {model: _Price(p_in, p_out, None) for model, (p_in, p_out) in custom.items()}

    def price_for(self, provider: str | None, model: str) -> _Price | None:
        return self.custom.get(model) or _library_price(provider, model)

    @hookimpl(trylast=True)  # runs after other transforms (say, a redactor that fixes models)
    def transform_events(self, events: list[Any], principal: Principal) -> None:
        for event in events:
            # Fields are set through __dict__: pydantic's __setattr__ costs a microsecond or
            # two per call, and these values need no validation.
            data = event.__dict__
            if data.get("event_type") != "prompt_call":
                continue
            if data["cost_estimate_usd"] is not None:
                data["cost_source"] = "client"
                continue
            model, tokens_in, tokens_out = (
                data["model"],
                data["tokens_input"],
                data["tokens_output"],
            )
            price = None
            if model and (tokens_in is not None or tokens_out is not None):
                price = self.price_for(data["provider"], model)
            if price is None:
                data["cost_source"] = "unknown"
                continue
            data["cost_estimate_usd"] = price.cost(tokens_in or 0, tokens_out or 0)
            data["cost_source"] = "computed"


def make_plugin(settings: Settings) -> CostEstimator:
    return CostEstimator(settings.model_prices)
