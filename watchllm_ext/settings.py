"""Settings: `WATCHLLM_*` environment variables, then `watchllm.toml`, then defaults.

Every field is documented in docs/SETTINGS.md (a test keeps the two in step).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
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
    )

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
        " complete this long after the connection opened or the request began (seconds).",
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
        " of them stopped the event loop for 60-150 ms every few thousand requests. Objects"
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

    @field_validator("plugins", "disable_plugins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # Env values arrive as one string; accept "a.b,c.d" as well as a JSON list.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
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
        toml_path = Path(_settings_file())
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_path),
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


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning a validation error into one message per bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(exc)) from None
    except PydanticSettingsError as exc:  # a value that is not even parseable (bad JSON)
        raise SettingsError(f"{exc}: {exc.__cause__}") from None
    except (OSError, ValueError) as exc:  # an unreadable or malformed watchllm.toml
        raise SettingsError(f"cannot read the settings file: {exc}") from None


def describe_settings_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        if not err["loc"]:  # a rule across settings; its message names them
            lines.append(f"invalid settings: {err['msg'].removeprefix('Value error, ')}")
            continue
        name = str(err["loc"][0])
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            # Only the settings file can name a setting that does not exist (unknown
            # WATCHLLM_* variables are not read): say where, and what was meant.
            close = difflib.get_close_matches(name, Settings.model_fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (docs/SETTINGS.md lists them)"
            lines.append(f"unknown setting {name!r} in {_settings_file()}{hint}")
            continue
        inside = ".".join(str(part) for part in err["loc"][1:])  # a key inside its value
        lines.append(
            f"invalid setting {name} (env WATCHLLM_{name.upper()}):"
            f"{f' at {inside}:' if inside else ''} {err['msg']} (got {err.get('input')!r})"
        )
    return "\n".join(lines)


def _settings_file() -> str:
    return os.environ.get("WATCHLLM_CONFIG", "watchllm.toml")
