"""Settings: `WATCHLLM_*` environment variables, then `watchllm.toml`, then defaults.

Every field is documented in docs/SETTINGS.md (a test keeps the two in step).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, unquote_plus, urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretBytes,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from .flags.spec import FlagSpec
from .guardian.rules import GuardianRule
from .quotas.plans import Plan, default_plans

MiB = 1024 * 1024


class SettingsError(Exception):
    """A setting has a bad value; the message names it."""


def _one_with_two_cores() -> int:
    """Worker processes by default: 1 where another core can run one, else 0."""
    return 1 if (os.cpu_count() or 1) >= 2 else 0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WATCHLLM_",
        extra="forbid",
        validate_default=True,
        # A host app builds Settings(...) itself and logs what it raises: pydantic's text of
        # a refused value would show a ClickHouse password or a webhook's token there.
        # load_settings words its own messages, with secrets masked.
        hide_input_in_errors=True,
    )
    # The sources load_settings read, highest first (source_of); empty when built directly.
    _layers: tuple[_Layer, ...] = PrivateAttr(default=())

    data_dir: Path = Field(
        Path(".watchllm"),
        description="Folder for the embedded chDB store, the spool and the API-key file.",
    )
    host: str = Field("127.0.0.1", description="Address `watchllm serve` listens on.")
    port: int = Field(8787, ge=1, le=65535, description="Port `watchllm serve` listens on.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the server."
    )
    access_log: Literal["all", "quiet-ingest", "off"] = Field(
        "quiet-ingest",
        description="`watchllm serve`'s access log (a line per request, at log_level info):"
        " all requests; quiet-ingest, all but ingest requests answered 2xx (events and OTLP"
        " spans: at thousands a second their lines cost the server a quarter of its time, and"
        " /metrics counts them by route and status); off, none.",
    )
    clickhouse_url: str | None = Field(
        None,
        description="A ClickHouse server to use instead of the embedded chDB store, as"
        " http(s)://user:password@host:port/database; see docs/DEPLOY.md.",
    )
    cluster_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
        description="With clickhouse_url: the cluster (from the server's remote_servers) to"
        " create replicated, sharded tables on (ON CLUSTER); see docs/DEPLOY.md.",
    )
    payload_ttl_days: int = Field(
        0,
        ge=0,
        le=36_500,
        description="Days after which the large text columns (prompts, responses, tool input"
        " and output, reasoning, stack traces, span events, metadata) are emptied; counts,"
        " tokens, cost and latency stay. 0 keeps them forever.",
    )
    rollup_interval_s: float = Field(
        30.0,
        gt=0,
        description="How often the hourly analytics rollup recomputes the hours that got"
        " events since it last ran (seconds).",
    )
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra plugins to load, as dotted import paths (comma-separated in the env).",
    )
    disable_plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Plugin names (entry-point or module names) not to load.",
    )
    max_body_bytes: int = Field(
        10 * MiB, ge=1024, description="Largest request body accepted on the wire."
    )
    max_decompressed_bytes: int = Field(
        50 * MiB, ge=1024, description="Largest body accepted after gzip decompression."
    )
    max_batch_events: int = Field(
        10_000, ge=1, le=1_000_000, description="Most events accepted in one request."
    )
    max_body_memory_bytes: int = Field(
        256 * MiB,
        ge=64 * 1024,
        le=1 << 40,
        description="Bytes of request bodies held in memory at once, in all requests (each"
        " piece counted as it is read, after decompression): a request that would go past it"
        " is answered 503 with Retry-After at once, so that many big or compressed bodies at"
        " once push back instead of using up memory. Never below max_body_bytes and"
        " max_decompressed_bytes (one largest body always fits).",
    )
    max_body_memory_per_project_bytes: int | None = Field(
        None,
        ge=64 * 1024,
        le=1 << 40,
        description="The most of max_body_memory_bytes that one project's requests hold at"
        " once; requests without a key (the dashboard's sign-in form, a billing webhook) hold"
        " one such share together. Past it, that project's request is answered 503 with"
        " Retry-After while the others go on: one tenant cannot take the whole budget. Unset:"
        " a quarter of max_body_memory_bytes. Never above it, nor below max_body_bytes and"
        " max_decompressed_bytes (one largest body always fits).",
    )
    analytics_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="Worker threads for the analytics API's store queries, apart from the"
        " threads that ingestion, the writer and /readyz use: queries, however many wait,"
        " never hold those up. chDB runs one read at a time; a ClickHouse server may take more.",
    )
    analytics_queries_per_project: int = Field(
        16,
        ge=1,
        le=1000,
        description="Analytics queries one project may have running or waiting at once (a"
        " dashboard page asks up to 4 at once); one more is answered 429 with Retry-After.",
    )
    analytics_queue_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="How long an analytics query may wait for a thread before it is answered"
        " 503 with Retry-After (seconds).",
    )
    analytics_query_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="The longest an analytics query may run in the store (ClickHouse's"
        " max_execution_time); past it the request is answered 503 naming the limit.",
    )
    ingest_queue_timeout_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="How long a request may wait for a place to work on its body (the"
        " ingest_threads for big JSON bodies; for OTLP a worker process's and the server's"
        " places to decode and validate, its waits together) before it is answered 503 with"
        " Retry-After (seconds): under overload the server pushes back at once instead of"
        " letting requests queue past their clients' timeouts (OpenTelemetry's exporters give"
        " up after 10 s).",
    )
    ingest_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="Big request bodies (64 KiB and more) validated and encoded on worker"
        " threads at once, off the event loop; more wait their turn, the projects waiting served"
        " in turn (first come first served within one)."
        " One suits most machines: the work holds Python's GIL, so more threads add memory,"
        " not speed.",
    )
    ingest_worker_processes: int = Field(
        default_factory=_one_with_two_cores,
        ge=0,
        le=64,
        description="Worker processes that validate and encode event bodies of 64 KiB and"
        " more (a 1,000-event batch is ~600 KB) on other cores than the server's, which then"
        " only spools and answers; the same processes as otel_worker_processes (the larger of"
        " the two is started). Used while no plugin's validate_event or transform_events"
        " must see the events in the server (the built-in cost estimate runs in the worker)."
        " 0: on a thread of the server, where Python's GIL holds it to the one core Python"
        " has. Default: 1 on a machine with 2 cores or more, else 0.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="`watchllm serve` closes a connection whose request headers are not"
        " complete this long after the connection opened or the request began (seconds). The"
        " rest of a body answered before it was read (a 401, 413 or 503) is timed as a body"
        " is: body_idle_timeout_s between pieces, body_timeout_s in all; it is read (and"
        " dropped) up to the largest body the server reads (max_decompressed_bytes, or"
        " max_body_bytes if larger), then the connection is closed.",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="A request body not complete within this time gets 408 and the connection"
        " is closed (seconds).",
    )
    body_idle_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="A request body that pauses longer than this between two pieces gets 408"
        " and the connection is closed (seconds).",
    )
    keep_alive_timeout_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="`watchllm serve` closes a keep-alive connection idle this long (seconds).",
    )
    # --- HTTP layer (helper H): the size of a request's header block under `watchllm serve`
    max_header_bytes: int = Field(
        64 * 1024,
        ge=4096,
        le=16 * MiB,
        description="`watchllm serve` answers 431 and closes the connection when a request's"
        " line and headers are larger than this (bytes); an unfinished header block never"
        " holds much more than this in memory.",
    )
    flush_max_events: int = Field(
        10_000, ge=1, description="The writer flushes a batch once it holds this many events."
    )
    flush_interval_s: float = Field(
        1.0, gt=0, le=3600, description="The writer flushes at least this often (seconds)."
    )
    # --- store inserts (issue 10: the store sink's batches, sized for ClickHouse)
    store_insert_max_events: int = Field(
        50_000,
        ge=1,
        le=1_000_000,
        description="Events in one insert of the store sink, or what flush_interval_s"
        " gathered, whichever comes first (or, once nothing new has come for 0.1 s with"
        " 4,096 or more waiting or just after an insert of that many, what there is: a burst"
        " has ended): ClickHouse parses and merges large inserts far more cheaply than small"
        " ones (docs/BENCHMARKS.md).",
    )
    store_insert_streamed: bool = Field(
        False,
        description="Feed a burst's store insert its events as they arrive (from 4,096"
        " waiting on), so that ClickHouse parses them meanwhile and they land when it ends:"
        " a burst is queryable sooner after its last event, at some CPU an event"
        " (docs/PERFORMANCE.md).",
    )
    store_threads_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="`watchllm serve` runs the threads that Python did not start (the embedded"
        " store's: chDB parses, builds rows and merges in them) at this nice value, so that"
        " requests win the CPU while they come in and the store takes what they leave idle;"
        " 0 (the default) leaves them as they are. For a machine whose cores are all busy."
        " Linux only; a host app that mounts WatchLLM keeps its threads' priorities.",
    )
    # --- garbage collection (issue 10: ingest throughput, helper A)
    gc_freeze_at_start: bool = Field(
        True,
        description="Once started, move the objects that exist then (modules, the app, the"
        " store's client) out of the garbage collector's scans (gc.freeze): a full collection"
        " of them took 66 ms of CPU (259 ms of wall time on a loaded host) with the event loop"
        " stopped, every few thousand requests (docs/PERFORMANCE.md). Objects"
        " made before the start and later dropped in a reference cycle are then never freed.",
    )
    durability: Literal["spool", "memory"] = Field(
        "spool",
        description="`spool`: accepted events are written to the on-disk spool before the"
        " answer; `memory`: kept in memory only (lost in a crash; for tests, or behind a"
        " queue that is durable already).",
    )
    spool_dir: Path | None = Field(
        None,
        description="Folder of the spool (default: <data_dir>/spool); a separate, fast disk"
        " can hold it.",
    )
    spool_fsync: Literal["always", "interval", "never"] = Field(
        "always",
        description="When the spool is fsynced: `always` before each answer (group commit),"
        " `interval` every spool_fsync_interval_s, `never` (left to the OS);"
        " see docs/DURABILITY.md.",
    )
    spool_fsync_process: bool = Field(
        True,
        description="With spool_fsync `always`: the spool's fsyncs run in a small helper"
        " process (a Python thread must first take the GIL, which the event loop holds while"
        " it serves requests); false: on a worker thread. See docs/DURABILITY.md.",
    )
    spool_fsync_interval_s: float = Field(
        1.0, gt=0, le=60, description="fsync period of the `interval` policy (seconds)."
    )
    spool_max_bytes: int = Field(
        1024 * MiB,
        ge=64 * 1024,
        description="Spool size cap; past it ingestion answers 503 with Retry-After. A request"
        " whose events alone take more gets 413 (a warning at start when this is below"
        " max_decompressed_bytes).",
    )
    spool_segment_bytes: int = Field(
        64 * MiB, ge=4096, description="Size at which the spool starts a new segment file."
    )
    buffer_max_events: int = Field(
        500_000,
        ge=1,
        description="Events kept in memory for the sinks, decoded and with their spool bytes"
        " (beyond it they read the spool back from disk); with durability=memory, the most"
        " held before 503.",
    )
    sink_retry_initial_s: float = Field(
        0.2, gt=0, description="First wait before retrying a failed sink write (seconds)."
    )
    sink_retry_max_s: float = Field(
        30.0, gt=0, description="Longest wait between retries of a failed sink write (seconds)."
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="Time given to sinks to take what is buffered at shutdown."
    )
    key_store: Literal["file", "clickhouse"] = Field(
        "file",
        description="Where API keys live: `file` (keys_file, local to a machine) or"
        " `clickhouse` (a table on the clickhouse_url server, shared by every process in front"
        " of it; each process authenticates from its copy in <data_dir>/keys-from-server.sqlite3,"
        " which also serves while the server is down).",
    )
    keys_file: Path | None = Field(
        None,
        description="The API-key file (default: <data_dir>/keys.sqlite3). Several processes on"
        " one machine, each with its own data_dir, share keys by naming the same file.",
    )
    key_refresh_s: float = Field(
        1.0, gt=0, le=2.0, description="How often the server rereads the key file (seconds)."
    )
    model_prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Custom prices, USD per million (input, output) tokens, by model name;"
        " used before the genai-prices tables (for fine-tuned or private models).",
    )
    create_default_key: bool = Field(
        True,
        description="On first `serve` with no keys, create project `default` and print its key.",
    )
    # --- the dashboard (watchllm_ext/dashboard, docs/DASHBOARD.md) ---
    dashboard_secret: SecretStr | None = Field(
        None,
        min_length=32,
        description="Secret that encrypts and signs the dashboard's session cookies (32"
        " characters or more); unset, one is generated once into <data_dir>/dashboard-secret"
        " (mode 0600). Processes serving one dashboard share it.",
    )
    dashboard_session_max_age_s: float = Field(
        43_200.0,
        gt=0,
        description="A dashboard sign-in lasts this long (seconds), then the key is asked again.",
    )
    dashboard_secure_cookie: Literal["auto", "always", "never"] = Field(
        "auto",
        description="The session cookie's Secure flag: `auto` sets it when the request came"
        " over https (behind a TLS proxy, run uvicorn with --proxy-headers), `always`, `never`.",
    )
    dashboard_key_recheck_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="How long a dashboard page trusts the last check of its session's key"
        " (seconds); a revoked key's session ends within this time and key_refresh_s.",
    )
    # --- host integration: WatchLLMMiddleware (docs/EMBEDDING.md) ---
    host_project_id: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        max_length=64,
        description="The project a host app's requests are recorded in by WatchLLMMiddleware"
        " (its `project_id=` argument wins).",
    )
    user_daily_budget_usd: float | None = Field(
        None,
        ge=0,
        description="Turns on WatchLLMMiddleware's per-user daily budget: a host request whose"
        " user has spent this many USD today (UTC, stored prompt-call cost) is answered 429"
        " before its handler runs. None: off.",
    )
    user_budget_cache_s: float = Field(
        2.0,
        gt=0,
        le=300,
        description="How long the middleware reuses a user's stored spend before reading it"
        " again (seconds); spend can be this much staler than the store.",
    )

    # --- quotas: plans, usage limits, budgets, Stripe (docs/QUOTAS.md) ---
    quota_backend: Literal["off", "memory", "redis"] = Field(
        "off",
        description="Where usage is counted against plans: `off` (no quotas), `memory` (in"
        " this process: one server) or `redis` (redis_url, shared by every server process).",
    )
    quota_plans: dict[str, Plan] = Field(
        default_factory=default_plans,
        description="Plans by name, each with events_per_minute, events_per_day,"
        " events_per_month, payload_bytes_per_month, usd_per_month, user_usd_per_day (any left"
        " out is unlimited). Default: one plan `default` with no limits.",
    )
    quota_default_plan: str = Field(
        "default", description="The plan of a project that no one assigned a plan to."
    )
    quota_project_plans: dict[str, str] = Field(
        default_factory=dict,
        description="Plans by project id; one assigned at run time (Stripe, `watchllm usage"
        " set --plan`) takes precedence.",
    )
    redis_url: str | None = Field(
        None, description="The Redis of quota_backend = redis, as redis://[:password@]host:port/db."
    )
    quota_redis_timeout_ms: float = Field(
        50.0,
        gt=0,
        le=10_000,
        description="A Redis answer slower than this counts as Redis being down (milliseconds;"
        " the time includes the server's own event-loop delays under load, see docs/QUOTAS.md).",
    )
    quota_failure_mode: Literal["open", "closed"] = Field(
        "open",
        description="Redis (or the store, for budgets) down: `open` lets events through within"
        " the per-process fallback limit, `closed` refuses them with 429.",
    )
    quota_fallback_events_per_minute: int = Field(
        6_000,
        ge=1,
        description="With quota_failure_mode = open: the events per minute each process takes"
        " per project while Redis is down.",
    )
    quota_budget_refresh_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="How long a project's (or user's) USD spend read for a budget is reused"
        " before it is read from the store again (seconds).",
    )
    stripe_webhook_secret: SecretStr | None = Field(
        None,
        description="The signing secret (whsec_...) of a Stripe webhook endpoint; when set,"
        " POST /v1/billing/stripe maps subscription events to plans.",
    )
    stripe_price_plans: dict[str, str] = Field(
        default_factory=dict,
        description="Plans by Stripe price id (or price lookup_key) of a subscription's item.",
    )
    stripe_ended_plan: str | None = Field(
        None,
        description="The plan of a project whose subscription ended (default: back to"
        " quota_project_plans or quota_default_plan).",
    )

    # --- operations: feature flags, Guardian, alert notifiers, Sentry (docs/OPERATIONS.md) ---
    flags: dict[str, FlagSpec] = Field(
        default_factory=dict,
        description="Feature flags of the built-in provider, by name: true/false, or"
        ' {"default": false, "projects": {"acme": true}, "users": {"u1": true}}.',
    )
    flags_file: Path | None = Field(
        None,
        description="A JSON file of flags in the same form, read again when it changes (no"
        " restart); its flags beat `flags`.",
    )
    flags_refresh_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="How often the flags file is checked for a change (seconds).",
    )
    openfeature_domain: str | None = Field(
        None,
        description="With the OpenFeature flag plugin: the OpenFeature domain whose provider"
        " answers (default: the default provider).",
    )
    configcat_sdk_key: str | None = Field(
        None, description="With the ConfigCat flag plugin: the SDK key of the ConfigCat config."
    )
    configcat_override_file: Path | None = Field(
        None,
        description="With the ConfigCat flag plugin: a local-override JSON file (beats the"
        " remote config; the only source when there is no SDK key).",
    )
    configcat_poll_interval_s: int = Field(
        60, ge=1, le=86_400, description="How often ConfigCat fetches the remote config (seconds)."
    )
    guardian_rules: list[GuardianRule] = Field(
        default_factory=list,
        description="Guardian rules (checked while the `guardian` flag is on for the project):"
        " name, project, metric, per, threshold, window_s, min_events, failure_types, block.",
    )
    guardian_interval_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="How often Guardian re-checks its windows and the stored hourly figures"
        " (seconds): recoveries and rules over stored data are seen this often.",
    )
    alert_webhook_url: str | None = Field(
        None, description="Guardian alerts are POSTed here as signed JSON (the webhook notifier)."
    )
    alert_webhook_secret: str | None = Field(
        None,
        description="HMAC-SHA256 key of the webhook's X-WatchLLM-Signature header (unsigned"
        " without one).",
    )
    alert_webhook_retries: int = Field(
        5, ge=0, le=20, description="Retries of a failed webhook delivery, with backoff."
    )
    alert_slack_webhook_url: str | None = Field(
        None, description="A Slack incoming-webhook URL for Guardian alerts."
    )
    sentry_dsn: str | None = Field(
        None, description="Report WatchLLM's own unexpected errors to this Sentry DSN."
    )
    sentry_environment: str | None = Field(
        None, description="Sentry environment name (e.g. production)."
    )
    sentry_release: str | None = Field(
        None, description="Sentry release (default: watchllm@<version>)."
    )
    sentry_sample_rate: float = Field(
        1.0, ge=0, le=1, description="Share of errors sent to Sentry."
    )
    sentry_traces_sample_rate: float = Field(
        0.0, ge=0, le=1, description="Share of requests traced to Sentry (0: no tracing)."
    )
    otel_metrics_endpoint: str | None = Field(
        None,
        description="Export the /metrics series to this OTLP/HTTP endpoint (JSON), e.g. an"
        " OpenTelemetry Collector's http://collector:4318/v1/metrics.",
    )
    otel_metrics_interval_s: float = Field(
        60.0, gt=0, le=3600, description="How often the OTLP metrics export runs (seconds)."
    )
    otel_metrics_headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra headers of the OTLP metrics export (a vendor's API key), JSON in"
        " the environment.",
    )
    # --- OpenTelemetry: the OTLP receiver (watchllm_ext/otel/receiver.py, pool.py)
    otel_worker_processes: int = Field(
        default_factory=_one_with_two_cores,
        ge=0,
        le=64,
        description="Worker processes that decode and map OTLP bodies of 64 KiB and more"
        " (a 512-span export is ~270 KB) on other cores than the server's, which then only"
        " validates, spools and stores what they made. 0: decoded on a thread of the server,"
        " where Python's GIL holds it to the one core Python has. Default: 1 on a machine"
        " with 2 cores or more, else 0.",
    )
    # --- OpenTelemetry: the OTLP exporter sink (watchllm_ext/otel/export.py, docs/OPENTELEMETRY.md)
    otlp_export_endpoint: str | None = Field(
        None,
        pattern=r"^https?://",
        description="Forward every stored event and span as OTLP spans (protobuf over HTTP)"
        " to this endpoint, e.g. an OpenTelemetry Collector's http://collector:4318/v1/traces"
        " or another WatchLLM's /v1/traces; unset: the exporter sink is off.",
    )
    otlp_export_headers: dict[str, str] = Field(
        default_factory=dict,
        description='Headers of the OTLP export requests, e.g. {"Authorization": "Bearer KEY"}'
        " (JSON in the environment).",
    )
    otlp_export_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Timeout of one OTLP export request (seconds)."
    )
    otlp_export_compression: Literal["gzip", "none"] = Field(
        "gzip", description="Compression of the OTLP export requests' bodies."
    )

    @model_validator(mode="after")
    def _cluster_needs_a_server(self) -> Settings:
        if self.cluster_name and not self.clickhouse_url:
            raise ValueError(
                "cluster_name needs clickhouse_url (a cluster is a ClickHouse server setting;"
                " the embedded store has none)"
            )
        if self.key_store == "clickhouse" and not self.clickhouse_url:
            raise ValueError(
                "key_store = clickhouse needs clickhouse_url (the server to keep keys on)"
            )
        return self

    @model_validator(mode="after")
    def _warn_of_a_spool_smaller_than_a_body(self) -> Settings:
        # HTTP layer (helper H). Allowed (a small spool suits a small machine, and tests), but
        # said at start: a request whose events take more than the whole spool is refused with
        # 413, however empty the spool is, and a client must send it in smaller batches.
        if self.spool_max_bytes < self.max_decompressed_bytes:
            logging.getLogger("watchllm.settings").warning(
                "spool_max_bytes (%d) is smaller than max_decompressed_bytes (%d): a request"
                " whose events take more than %d bytes in the spool is refused with 413"
                " payload_too_large; raise spool_max_bytes or lower max_decompressed_bytes",
                self.spool_max_bytes,
                self.max_decompressed_bytes,
                self.spool_max_bytes,
            )
        return self

    @model_validator(mode="after")
    def _quota_plans_exist(self) -> Settings:
        # Every plan a setting names must be defined, or the first request would find none.
        named = [("quota_default_plan", self.quota_default_plan)]
        named += [(f"quota_project_plans.{p}", n) for p, n in self.quota_project_plans.items()]
        named += [(f"stripe_price_plans.{p}", n) for p, n in self.stripe_price_plans.items()]
        if self.stripe_ended_plan:
            named.append(("stripe_ended_plan", self.stripe_ended_plan))
        for setting, name in named:
            if name not in self.quota_plans:
                raise ValueError(
                    f"{setting} names plan {name!r}, which quota_plans does not define"
                    f" (defined: {', '.join(sorted(self.quota_plans)) or 'none'})"
                )
        if self.quota_backend == "redis" and not self.redis_url:
            raise ValueError("quota_backend = redis needs redis_url (redis://host:port/0)")
        return self

    @field_validator("clickhouse_url")
    @classmethod
    def _clickhouse_url_form(cls, value: str | None) -> str | None:
        # Checked as it is loaded, not when the store opens: the line then names where the
        # value came from (--url, the variable, the file) and comes before a command's long
        # work (an import verifies every file first); it never repeats the password.
        if value:
            problem = clickhouse_url_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        # Python's own level names are upper case (WARNING): both spellings mean the same.
        return value.lower() if isinstance(value, str) else value

    @field_validator("plugins", "disable_plugins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # Env values arrive as one string; accept "a.b,c.d" as well as a JSON list.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                try:
                    return json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not valid JSON: {exc}") from None
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _ARGUMENTS_ONLY.get():  # load_settings() checking values that others override
            return (init_settings,)
        # Both record what they read for load_settings(), which names the source of a bad
        # value; the env one also reports every value that is not valid JSON, not only the first.
        return (
            init_settings,
            _EnvSource(settings_cls),
            _TomlSource(settings_cls, toml_file=Path(_settings_file())),
        )

    @property
    def keys_path(self) -> Path:
        return self.keys_file or self.data_dir / "keys.sqlite3"

    @property
    def key_copy_path(self) -> Path:
        """This process's copy of the server's keys (key_store = clickhouse); never keys_file,
        so switching to server keys cannot overwrite a key file that is still needed."""
        return self.data_dir / "keys-from-server.sqlite3"

    @property
    def store_path(self) -> Path:
        return self.data_dir / "chdb"

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    def source_of(self, name: str) -> str:
        """Where the value of setting `name` came from, in the words of the error lines:
        the first of load_settings' sources that names it, else "its default"."""
        for layer in self._layers:
            if layer.values.get(name) is not None:
                return layer.where(name)
        return "its default"


class _EnvSource(EnvSettingsSource):
    """`WATCHLLM_*` variables; a value that cannot be decoded (bad JSON) is noted and left out,
    so that all of them are reported at once, each in the one-line form of docs/SETTINGS.md."""

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError as exc:
            self.problems.append(_unreadable_env_value(field_name, value, exc))
            return None

    def __call__(self) -> dict[str, Any]:
        self.problems: list[str] = []
        data = super().__call__()
        loading = _LOADING.get()
        if loading is None:  # Settings(...) built directly
            if self.problems:
                raise PydanticSettingsError("\n".join(self.problems))
        else:
            loading.env, loading.env_problems = data, self.problems
        return data


class _TomlSource(TomlConfigSettingsSource):
    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        loading = _LOADING.get()
        if loading is not None:
            loading.toml = data
        return data


@dataclass
class _Loading:
    """What the sources of one load_settings() call read, as they read it."""

    env: dict[str, Any] = field(default_factory=dict)
    env_problems: list[str] = field(default_factory=list)
    toml: dict[str, Any] = field(default_factory=dict)


_LOADING: ContextVar[_Loading | None] = ContextVar("watchllm_settings_loading", default=None)
_ARGUMENTS_ONLY: ContextVar[bool] = ContextVar("watchllm_settings_arguments_only", default=False)

# The command-line options that load_settings() gets as arguments (watchllm_ext/cli.py).
_CLI_OPTIONS = {
    "data_dir": "--data-dir",
    "host": "--host",
    "port": "--port",
    "clickhouse_url": "--url",  # `watchllm import --url`
}
# Settings whose values an error message does not repeat (they end up in logs).
_SECRET_SETTINGS = frozenset(
    name
    for name, info in Settings.model_fields.items()
    if "secret" in name
    or name.endswith(("_headers", "_dsn", "_sdk_key"))
    or any(t in str(info.annotation) for t in ("SecretStr", "SecretBytes"))
)


@dataclass
class _Layer:
    """One source of settings, with its values; the first layer that names a setting wins."""

    kind: Literal["argument", "env", "file"]
    values: Mapping[str, Any]

    def where(self, name: str) -> str:
        if self.kind == "argument":
            option = _CLI_OPTIONS.get(name)
            return f"option {option}" if option else f"argument {name}"
        if self.kind == "env":
            return f"env {_env_variable(name)}"
        return f"file {_settings_file()}, key {name}"


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning every bad value into one line naming the setting and where the
    value came from: an argument (a command-line option), a variable or the settings file.

    A value that a higher source overrides is checked all the same (WATCHLLM_PORT=abc with
    --port 8824 is refused): a bad value anywhere is a mistake worth hearing about."""
    _check_named_file()
    loading = _Loading()
    token = _LOADING.set(loading)
    settings: Settings | None = None
    error: ValidationError | None = None
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        error = exc
    except PydanticSettingsError as exc:  # a source failed in another way
        raise SettingsError(f"{exc}: {exc.__cause__}") from None
    except (OSError, ValueError) as exc:  # an unreadable or malformed watchllm.toml
        raise SettingsError(f"cannot read the settings file {_settings_file()}: {exc}") from None
    finally:
        _LOADING.reset(token)
    layers = [
        _Layer("argument", overrides),
        _Layer("env", loading.env),
        _Layer("file", loading.toml),
    ]
    lines = list(loading.env_problems)
    if error is not None:
        # With a variable left out (bad JSON), a rule across settings may fail only because
        # of that: the line about the variable says what to fix.
        lines += _error_lines(error, layers, cross_rules=not lines)
    lines += _check_overridden(layers)
    if lines or settings is None:
        raise SettingsError("\n".join(dict.fromkeys(lines)))
    _warn_of_unread_variables()
    settings._layers = tuple(layers)
    return settings


# WATCHLLM_* variables that other parts of WatchLLM read on purpose, not settings: the SDK's
# and `watchllm demo`'s key and server, the settings file's name, and the test suite's own.
READ_ELSEWHERE = frozenset(
    {
        "WATCHLLM_API_KEY",
        "WATCHLLM_BASE_URL",
        "WATCHLLM_CONFIG",
        "WATCHLLM_TEST_CLICKHOUSE_URL",
        "WATCHLLM_TEST_URL",
        "WATCHLLM_TEST_KEY",
    }
)
_WARNED: set[str] = set()  # once a process: commands load settings more than once


def _warn_of_unread_variables() -> None:
    """A WARNING for each WATCHLLM_* variable that nothing reads (a typo would otherwise
    leave its setting at its default without a word), naming the likely meant variable."""
    variables = {f"WATCHLLM_{name.upper()}" for name in Settings.model_fields}
    for key in os.environ:
        upper = key.upper()  # pydantic-settings reads the variables in any case
        if not upper.startswith("WATCHLLM_") or upper in variables | READ_ELSEWHERE:
            continue
        if key in _WARNED:
            continue
        _WARNED.add(key)
        close = difflib.get_close_matches(upper, sorted(variables), n=1)
        hint = f"; did you mean {close[0]}?" if close else " (docs/SETTINGS.md lists them)"
        logging.getLogger("watchllm.settings").warning(
            "environment variable %s is not a setting's and is ignored%s", key, hint
        )


def _check_named_file() -> None:
    """A settings file named on purpose must be there: a typo in its name would otherwise
    start on defaults. The default ./watchllm.toml is optional."""
    named = os.environ.get("WATCHLLM_CONFIG")
    if named is None:
        return
    path = Path(named)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise SettingsError(f"the settings file {named} (env WATCHLLM_CONFIG) {what}")
    if not os.access(path, os.R_OK):
        raise SettingsError(f"the settings file {named} (env WATCHLLM_CONFIG) cannot be read")


def _check_overridden(layers: Sequence[_Layer]) -> list[str]:
    """Lines for the bad values of settings that a higher layer overrides."""
    lines = []
    for at, layer in enumerate(layers[1:], start=1):
        hidden = {
            name: value
            for name, value in layer.values.items()
            if any(name in higher.values for higher in layers[:at])
        }
        if not hidden:
            continue
        token = _ARGUMENTS_ONLY.set(True)
        try:
            # The extra key fails the model, so its rules across settings (which need the
            # other settings' values) and its warnings are skipped: each value alone is checked.
            Settings(**hidden, **{_PROBE: None})
        except ValidationError as exc:
            for err in exc.errors():
                loc = err["loc"]
                # A key missing from an overridden value may be given by the layer above it;
                # a dict's key that no layer above has reached Settings, and was reported.
                if (
                    loc
                    and loc[0] in hidden
                    and err["type"] != "missing"
                    and _layer_of(loc, layers) is not layer
                ):
                    lines.append(_describe_one(err, layer.where(str(loc[0]))))
        finally:
            _ARGUMENTS_ONLY.reset(token)
    return lines


_PROBE = " probe"  # not a setting name: Settings refuses it as extra


def describe_settings_error(exc: ValidationError, layers: Sequence[_Layer] = ()) -> str:
    """One line per error; `layers` (highest first) tell where each bad value came from."""
    return "\n".join(_error_lines(exc, layers))


def _error_lines(
    exc: ValidationError, layers: Sequence[_Layer], *, cross_rules: bool = True
) -> list[str]:
    lines = []
    for err in exc.errors():
        if not err["loc"]:  # a rule across settings; its message names them
            if cross_rules:
                lines.append(f"invalid settings: {err['msg'].removeprefix('Value error, ')}")
            continue
        name = str(err["loc"][0])
        layer = _layer_of(err["loc"], layers)
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            # Only the settings file (or an argument) can name a setting that does not exist
            # (unknown WATCHLLM_* variables are not read): say where, and what was meant.
            close = difflib.get_close_matches(name, Settings.model_fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (docs/SETTINGS.md lists them)"
            where = "as an argument" if layer and layer.kind == "argument" else None
            lines.append(f"unknown setting {name!r} {where or f'in {_settings_file()}'}{hint}")
            continue
        lines.append(_describe_one(err, layer.where(name) if layer else None))
    return lines


def _describe_one(err: Any, where: str | None) -> str:
    name = str(err["loc"][0])
    inside = ".".join(str(part) for part in err["loc"][1:])  # a key inside its value
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] in ("too_short", "too_long") and isinstance(
        value, str | bytes | SecretStr | SecretBytes
    ):
        # pydantic counts "items" for a secret's length; a string has characters.
        unit = "characters" if isinstance(value, str | SecretStr) else "bytes"
        ctx = err.get("ctx") or {}
        limit = ctx.get("min_length") if err["type"] == "too_short" else ctx.get("max_length")
        least = "least" if err["type"] == "too_short" else "most"
        message = f"Value should have at {least} {limit} {unit}, not {ctx.get('actual_length')}"
    return (
        f"invalid setting {name}{f' ({where})' if where else ''}:"
        f"{f' at {inside}:' if inside else ''} {message} ({_shown(name, value)})"
    )


def _unreadable_env_value(name: str, value: Any, exc: ValueError) -> str:
    what = f"not valid JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc)
    return f"invalid setting {name} (env {_env_variable(name)}): {what} ({_shown(name, value)})"


def _shown(name: str, value: Any) -> str:
    if name == "clickhouse_url" and isinstance(value, str):
        return f"got {masked_clickhouse_url(value)!r}"
    if name not in _SECRET_SETTINGS:
        return f"got {value!r}"
    if isinstance(value, SecretStr | SecretBytes):
        value = value.get_secret_value()
    if isinstance(value, str | bytes):
        return f"got {len(value)} {'characters' if isinstance(value, str) else 'bytes'}, not shown"
    return "the value is not shown"


def _layer_of(loc: Sequence[Any], layers: Sequence[_Layer]) -> _Layer | None:
    """The layer whose value is at `loc` in what Settings got: the first layer that has the
    path, where dicts of several layers merge key by key (pydantic-settings' deep update)
    and any other value hides the lower layers' ones."""
    found = None
    candidates = [(layer, layer.values) for layer in layers]
    for key in loc:
        here = []
        for layer, value in candidates:
            in_dict = isinstance(value, Mapping) and key in value
            in_list = isinstance(value, list | tuple) and isinstance(key, int) and key < len(value)
            if in_dict or in_list:
                here.append((layer, value[key]))
        if not here:
            break
        found = here[0][0]
        merged = 0
        while merged < len(here) and isinstance(here[merged][1], Mapping):
            merged += 1
        candidates = here[: max(merged, 1)]
    return found


def _env_variable(name: str) -> str:
    """The variable that sets `name`, spelt as in the environment (names are not case
    sensitive)."""
    wanted = f"WATCHLLM_{name}".lower()
    return next((key for key in os.environ if key.lower() == wanted), wanted.upper())


def _settings_file() -> str:
    return os.environ.get("WATCHLLM_CONFIG", "watchllm.toml")


# --- clickhouse_url -------------------------------------------------------------------------

# What plugins/clickhouse_store.py's parse_url accepts, checked here so that a bad URL is
# refused in settings' words (source named, password never shown); tests keep the two in step.
CLICKHOUSE_URL_FORM = "http(s)://user:password@host:port/database"
CLICKHOUSE_URL_OPTIONS = ("compress", "connect_timeout", "send_receive_timeout", "pool_size")
_COMPRESS_VALUES = ("lz4", "zstd", "gzip", "br", "true", "none", "false", "0", "off", "no")
_ESCAPES = "write / ? # @ in a password as %2F %3F %23 %40"


def clickhouse_url_problem(url: str) -> str | None:
    """Why the store would refuse `url` as clickhouse_url, in words that repeat neither its
    password nor an unknown option's value; None if it would not."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - the property raises for a bad port
    except ValueError as exc:
        if "out of range" in str(exc):
            return "the port is out of range (it is at most 65535)"
        # Not str(exc): it can quote part of the password ("could not be cast ... 'pa'").
        return f"its host and port cannot be read ({_ESCAPES})"
    if "://" not in url:
        # `user:password@host` alone reads as the scheme `user`: never name it.
        return f"it has no http:// or https:// in front (the form is {CLICKHOUSE_URL_FORM})"
    if parts.scheme.lower() not in ("http", "https"):
        return f"the scheme must be http or https, not {parts.scheme!r}"
    if not parts.hostname:
        return "no host"
    if "/" in unquote(parts.path.strip("/")):
        return "the path must be only the database name"
    if parts.fragment:
        return f"no #fragment is allowed ({_ESCAPES})"
    for piece in parts.query.split("&"):
        if not piece:
            continue
        name, eq, value = piece.partition("=")
        name, value = unquote_plus(name), unquote_plus(value)
        if name not in CLICKHOUSE_URL_OPTIONS:
            known = ", ".join(CLICKHOUSE_URL_OPTIONS)
            if not eq:  # a bare word may be a secret: not repeated
                return f"a query part is not name=value (options: {known})"
            return f"unknown option {name!r} (known: {known}; the password goes before the @)"
        problem = _option_problem(name, value)
        if problem:
            return problem
    return None


def _option_problem(name: str, value: str) -> str | None:
    if name == "compress":
        if value.strip().lower() not in _COMPRESS_VALUES:
            return f"compress must be one of lz4, zstd, gzip, br, true, none; not {value!r}"
    elif name == "pool_size":
        if not value.isdigit() or not 1 <= int(value) <= 1000:
            return f"pool_size must be a whole number from 1 to 1000, not {value!r}"
    else:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not (0 < seconds <= 86400 and math.isfinite(seconds)):
            return f"{name} must be a number of seconds above 0, not {value!r}"
    return None


def masked_clickhouse_url(url: str) -> str:
    """`url` with its password, and the values of query parts that are not known options, as
    `***`, however malformed it is: a password may hold / ? # @ unescaped, and the scheme
    may be missing."""
    # The user information ends at the last @ (as urlsplit reads it); it starts after the
    # scheme's //, or at the start when there is none. A password may hold :// itself, and
    # `user://pw@host` may be a user with a password and no scheme: then the user goes too.
    head, at, tail = url.rpartition("@")
    if at:
        scheme = re.match(r"(?:https?:)?//", head, re.IGNORECASE) or re.match(
            r"[A-Za-z][A-Za-z0-9+.-]*://(?=[^@]*:)", head
        )
        start = scheme.end() if scheme else 0
        colon = head.find(":", start)
        if colon != -1:
            head = head[: colon + 1] + "***"
        url = head + at + tail
    base, question, query = url.partition("?")
    if not question:
        return url
    pieces = []
    for piece in query.split("&"):
        name, eq, _ = piece.partition("=")
        shown = eq and unquote_plus(name) in CLICKHOUSE_URL_OPTIONS
        pieces.append(piece if shown else f"{name}=***" if eq else "***" if piece else "")
    return f"{base}?{'&'.join(pieces)}"
