"""Query parameter values as ClickHouse's text format for `{name:Type}` placeholders.

chDB passes parameter values to ClickHouse as they are given, so a tab or a quote in a
string, `None`, or a list would be misread. clickhouse-connect's `format_bind_value` does the
escaping ClickHouse expects; datetimes we format ourselves, because it drops sub-seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.binding import format_bind_value


def format_param(value: Any) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        # Whole seconds without a fraction: DateTime (not 64) parameters refuse one.
        return value.strftime("%Y-%m-%d %H:%M:%S.%f" if value.microsecond else "%Y-%m-%d %H:%M:%S")
    return format_bind_value(value, UTC)


def format_params(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    if not params:
        return None
    return {name: format_param(value) for name, value in params.items()}
