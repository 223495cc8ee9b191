"""The `watchllm` command.

Read commands (verify-clickhouse, check-tables, count-rows) open the data folder, or, with
`--url URL --key KEY`, ask a running server (a chDB folder can be open in one process only).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_FAILED = 1
_DEMO_URL = "http://127.0.0.1:8787"  # where `watchllm serve` listens by default


class CliError(Exception):
    """A failure to report as one line, without a traceback."""


class RemoteError(CliError):
    """The server asked with --url answered something else than 200."""

    def __init__(self, message: str, response: Any) -> None:
        super().__init__(message)
        self.status: int = response.status_code


class CliUsageError(CliError):
    """A command given without what it needs (exit code 2, as argparse's own errors)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        from .settings import SettingsError
        from .store.folders import DataFolderError
    except ImportError as exc:  # the base install has only the client
        if not _http_only(args):  # a client (pydantic and httpx) does not need the server
            print(
                "error: the server needs the 'server' extra: pip install -e '.[server]' in"
                f" WatchLLM's folder ({exc})",
                file=sys.stderr,
            )
            return EXIT_FAILED
        # Nothing raises them without the extra.
        SettingsError = CliUsageError
        DataFolderError = CliError
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so a closed pipe is caught below and not at exit
        return code
    # DataFolderError: a folder the command opened cannot be used (store/folders.py, raised
    # where it is opened), the one line that names it.
    except (CliError, SettingsError, DataFolderError) as exc:
        # A SettingsError has a line per bad setting: each one reads as an error on its own.
        lines = str(exc).splitlines() if isinstance(exc, SettingsError) else [str(exc)]
        for line in lines or [""]:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, SettingsError | CliUsageError) else EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `watchllm demo | head`: the reader left; no traceback, and none at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process killed by SIGPIPE


def _http_only(args: argparse.Namespace) -> bool:
    """The command only speaks HTTP to a running server (demo; the others given --url): the
    base install, pydantic and httpx, is enough for it."""
    return args.func is cmd_demo or bool(getattr(args, "url_is_a_server", False) and args.url)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="watchllm", description="WatchLLM: LLM observability.")
    parser.add_argument("--version", action="version", version=f"watchllm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir", type=Path, help="data folder (default: $WATCHLLM_DATA_DIR or ./.watchllm)"
        )

    def remote(
        p: argparse.ArgumentParser,
        key_help: str = "an API key for --url: admin (its own project) or operator (every project)",
    ) -> None:
        data_dir(p)
        p.add_argument(
            "--url", type=_server_url, help="ask a running server at this URL instead of the folder"
        )
        p.add_argument("--key", help=key_help)
        # With --url the command speaks only HTTP (the base install does), and a busy
        # folder's message points at --url.
        p.set_defaults(url_is_a_server=True)

    p = sub.add_parser("serve", help="run the server on the embedded store")
    data_dir(p)
    p.add_argument("--host", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default 8787)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="apply the schema migrations that are not applied yet")
    data_dir(p)
    p.add_argument(
        "--print-sql",
        action="store_true",
        help="print every statement (in its cluster form with cluster_name) and apply nothing",
    )
    p.add_argument("--cluster", help="with --print-sql: the cluster name to render for")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("verify-clickhouse", help="connect to the store and print its version")
    remote(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("check-tables", help="list the store's tables, one a line")
    remote(p)
    p.set_defaults(func=cmd_check_tables)

    p = sub.add_parser("count-rows", help="count the rows of a table (the count is the last line)")
    remote(p)
    p.add_argument("--project", help="count only this project's rows")
    p.add_argument("--table", default="events", help="table to count (default: events)")
    p.add_argument(
        "--run",
        metavar="RUN_ID",
        help="count only this run's rows (a trace id for spans): with --wait, wait for your"
        " own run whatever else the table holds",
    )
    p.add_argument(
        "--wait",
        type=_positive,
        metavar="N",
        help="with --url: ask again until the count is at least N (events reach the store"
        " within flush_interval_s, 1 s by default, of their 202)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="with --wait: give up after S seconds, exit 1 (default 30)",
    )
    p.set_defaults(func=cmd_count_rows)

    p = sub.add_parser(
        "demo",
        help="load a realistic sample (runs, tool calls, errors, slow calls, last 7 days)"
        " into a running server, to look at in the analytics API",
    )
    p.add_argument("--events", type=_positive, default=1000, help="how many events (default 1000)")
    p.add_argument(
        "--url", type=_server_url, help=f"the server (default: $WATCHLLM_BASE_URL or {_DEMO_URL})"
    )
    p.add_argument("--key", help="a key of the project to load (default: $WATCHLLM_API_KEY)")
    p.add_argument(
        "--seed", type=int, default=0, help="the same seed in the same minute: the same events"
    )
    p.add_argument("--days", type=float, default=7.0, help="spread over this many days (7)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "golden-path", help="send an event over HTTP and wait until the analytics API shows it"
    )
    p.add_argument(
        "--url", type=_server_url, help="the server (default: a temporary one on a scratch folder)"
    )
    p.add_argument("--key", help="a key with ingest and read scopes (admin) for --url")
    p.set_defaults(func=cmd_golden_path, url_is_a_server=True)

    p = sub.add_parser(
        "export",
        help="write the embedded store's data to Parquet files and a manifest, for `import`",
    )
    data_dir(p)
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a new (or empty) folder")
    p.add_argument(
        "--max-rows-per-file",
        type=_positive,
        default=1_000_000,
        help="split a table's month into files of at most this many rows (default 1000000)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="load an export into a ClickHouse server, then check the counts"
    )
    p.add_argument("in_dir", type=Path, metavar="IN_DIR", help="a folder written by `export`")
    p.add_argument(
        "--url",
        help="the ClickHouse server, http(s)://user:password@host:port/database"
        " (default: $WATCHLLM_CLICKHOUSE_URL or the clickhouse_url setting)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted import of this same export into the same database",
    )
    p.add_argument(
        "--batch-rows",
        type=_positive,
        help="rows per insert (default: about 64 MB of data per insert)",
    )
    p.set_defaults(func=cmd_import)

    dead = sub.add_parser("dead-letter", help="see and replay events a sink refused for good")
    dead_sub = dead.add_subparsers(dest="dead_command", metavar="ACTION", required=True)
    p = dead_sub.add_parser("list", help="list dead letters: sink, time, reason, events")
    remote(p)
    p.add_argument("--sink", help="only this sink's")
    p.add_argument("--project", help="only this project's events")
    p.set_defaults(func=cmd_dead_list)
    p = dead_sub.add_parser("replay", help="put dead letters back in the spool for their sink")
    remote(p)
    p.add_argument("--sink", help="only this sink's")
    p.add_argument("--project", help="only this project's events")
    p.set_defaults(func=cmd_dead_replay)

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = keys_sub.add_parser("create", help="create a key; it is printed once, as the last line")
    data_dir(p)
    p.add_argument("--project", required=True)
    p.add_argument(
        "--scope",
        choices=["ingest", "read", "admin", "operator"],
        default="ingest",
        help="default: ingest (send events only); read: its project's analytics; admin: both,"
        " and administer its own project; operator: every project (docs/API.md)",
    )
    p.add_argument("--name", default="", help="a note to recognise the key by")
    p.set_defaults(func=cmd_keys_create)
    p = keys_sub.add_parser("list", help="list keys (never their secrets)")
    data_dir(p)
    p.add_argument("--project")
    p.set_defaults(func=cmd_keys_list)
    p = keys_sub.add_parser("revoke", help="revoke a key by its id (or the whole key)")
    data_dir(p)
    p.add_argument("key_id")
    p.set_defaults(func=cmd_keys_revoke)
    p = keys_sub.add_parser(
        "copy-to-server",
        help="copy the key file's keys (their hashes) to the ClickHouse server, for key_store"
        " = clickhouse; keys it knows already are left as they are",
    )
    data_dir(p)
    p.set_defaults(func=cmd_keys_copy)

    usage = sub.add_parser("usage", help="see and change a project's quota usage and plan")
    usage_sub = usage.add_subparsers(dest="usage_command", metavar="ACTION", required=True)
    for action, text in (
        ("show", "the project's plan, limits, usage and what remains"),
        ("set", "set usage counters (or the plan) by hand; the server sees it at once"),
        ("reset", "zero the project's usage in the current minute, day and month"),
    ):
        p = usage_sub.add_parser(action, help=text)
        # Changing usage needs an operator key (quotas/routes.py): a project's own admin
        # must not change what it is billed on.
        remote(
            p,
            "an API key for --url: admin (its own project) or operator (every project)"
            if action == "show"
            else "an operator API key for --url (an admin key may only show its project's usage)",
        )
        p.add_argument("--project", required=True)
        if action == "set":
            for window in ("minute", "day", "month", "payload-bytes"):
                p.add_argument(f"--{window}", type=_count, metavar="N", help=f"{window} usage")
            p.add_argument("--plan", help="assign this plan (from quota_plans); 'none' unassigns")
        p.set_defaults(func=cmd_usage)
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {text!r}")
    return value


def _server_url(text: str) -> str:
    from .remote import server_url_problem

    problem = server_url_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {text!r}")
    return value


def _settings(args: argparse.Namespace, **more: Any) -> Any:
    from .settings import load_settings

    overrides = {k: v for k, v in more.items() if v is not None}
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    return load_settings(**overrides)


# --- serve / migrate ------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import check_spool, create_app
    from .keys import KeyStore, ServerKeyStore
    from .observability.metrics import count_refused
    from .plugins import PluginError
    from .serving.protocol import uvicorn_options
    from .serving.tuning import tune_for_serving
    from .store import StoreError, StoreUnavailable, apply_migrations

    settings = _settings(args, host=args.host, port=args.port)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    url = f"http://{settings.host}:{settings.port}"
    # Before a key is made and printed: a busy port would make them point at another server.
    _check_port(settings.host, settings.port, _host_source(settings))
    try:
        app = create_app(settings)
        # Open the store now, and see that the spool can be, so a busy data folder or one
        # that cannot be used is one clear line, not a lifespan traceback.
        store = app.state.watchllm.open_store()
        check_spool(settings)
        keys: Any = KeyStore(settings.keys_path)
        key = None
        if settings.key_store == "clickhouse" and store is not None:
            try:
                apply_migrations(store)  # the api_keys table, before the first key
                keys = ServerKeyStore(store)
            except StoreUnavailable:
                keys = None  # down at start: no first key; the copy of the keys serves
        if keys is not None and settings.create_default_key and keys.is_empty():
            key = keys.create("default", scope="admin", name="created by the first serve")
    except (StoreError, PluginError) as exc:
        raise _folder_failure(args, exc) from None
    if key:
        print("No API keys yet: created project 'default' with an admin key (shown only once).")
        print(f"  URL: {url}")
        print(f"  Key: {key}")
        print("Try it:")
        print(f"  curl -X POST {url}/v1/projects/default/events \\")
        print(f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\")
        # The shell fills in the time when the line is pasted, not when it was printed: the
        # event lands in the analytics' default window (the last 24 hours) whenever it is sent.
        # Its ids are not the README's ("e1", "r1"): pasting both would store one event, the
        # first (a resend of an id is the first copy's).
        print(
            '    -d \'{"event_id":"hello-1","event_type":"prompt_call","run_id":"hello",'
            '"timestamp":"\'"$(date -u +%Y-%m-%dT%H:%M:%SZ)"\'","model":"gpt-4o",'
            '"tokens_input":10,"tokens_output":20}\''
        )
        print("Then load a sample to look at (a few seconds):")
        print(f"  watchllm demo --url {url} --key {key}", flush=True)
    print(f"WatchLLM {_version()} listening on {url} (data in {settings.data_dir})", flush=True)
    tune_for_serving(settings.store_threads_nice)
    # With the time limits for slow headers and idle keep-alive connections (serving/protocol.py).
    uvicorn.run(app, **uvicorn_options(settings, count_refused(app.state.watchllm)))
    return 0


def _host_source(settings: Any) -> str:
    """Where the listen address came from: --host, a variable, the file, or the default."""
    where = settings.source_of("host")
    return "--host" if where == "option --host" else where


def _check_port(host: str, port: int, host_source: str = "--host") -> None:
    from .serving.ports import port_problem

    problem = port_problem(host, port, host_source)
    if problem is not None:
        raise CliError(problem)


def _version() -> str:
    from . import __version__

    return __version__


def _folder_failure(args: argparse.Namespace, exc: Exception) -> CliError:
    """A store (or plugin) failure as the CLI's one line. A folder another process holds
    gets the advice that works for this command."""
    from .locks import with_advice
    from .store import StoreLockedError

    if not isinstance(exc, StoreLockedError):
        return CliError(str(exc))
    return CliError(with_advice(str(exc), _locked_advice(args)))


def _locked_advice(args: argparse.Namespace) -> str:
    """What this command can do about a folder another process holds (locks.py)."""
    from .locks import ASK_INSTEAD, STOP_IT

    if args.func is cmd_serve:  # a second server is not helped by --url: it needs a folder
        return "stop that process, or start this one with another --data-dir"
    if getattr(args, "url_is_a_server", False):
        return ASK_INSTEAD
    if args.func is cmd_migrate:
        return f"{STOP_IT} (a server applies the migrations itself when it starts)"
    return STOP_IT


def _open_store(args: argparse.Namespace) -> Any:
    from .plugins import PluginError, get_plugin_manager
    from .store import StoreError
    from .store.folders import open_store

    settings = _settings(args)
    _quiet_store_logs()  # every command that opens a store reports its failure as one line
    try:
        pm = get_plugin_manager(settings)
        store = open_store(pm, settings)
    except (StoreError, PluginError) as exc:
        raise _folder_failure(args, exc) from None
    if store is None:
        raise CliError(
            "no store plugin is installed (the chDB store comes with the 'server' extra:"
            " pip install -e '.[server]')"
        )
    return store


def cmd_migrate(args: argparse.Namespace) -> int:
    from .app import prepare_store
    from .store import StoreError

    if args.print_sql:
        return _print_migrations(args.cluster or _settings(args).cluster_name)
    if args.cluster:
        # It only renders the printed SQL; applying uses the cluster_name setting.
        raise CliUsageError(
            "--cluster only goes with --print-sql (the cluster to print the statements for);"
            " to apply them ON CLUSTER, set cluster_name (WATCHLLM_CLUSTER_NAME)"
        )
    store = _open_store(args)
    try:
        applied = prepare_store(store, _settings(args))
    except StoreError as exc:
        raise CliError(str(exc)) from None
    finally:
        store.close()
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("schema is up to date")
    else:
        print(f"{len(applied)} migration{'' if len(applied) == 1 else 's'} applied")
    return 0


def _print_migrations(cluster: str | None) -> int:
    from .store import load_migrations
    from .store.migrations import in_form_for, tracking_table_statements

    print(f"-- WatchLLM schema, {'cluster ' + cluster if cluster else 'single node'}")
    print("\n\n".join(statement + ";" for statement in tracking_table_statements(cluster)))
    for migration in load_migrations():
        print(f"\n-- {migration.version:04d}_{migration.name}")
        print("\n\n".join(s + ";" for s in in_form_for(migration.statements(), cluster)))
    return 0


# --- read commands ------------------------------------------------------------------------------


def _remote(
    args: argparse.Namespace,
    path: str,
    params: dict[str, str] | None = None,
    method: str = "GET",
    body: Any = None,
) -> Any:
    import httpx

    from .remote import unreachable

    if not args.key:
        raise CliError("--url needs --key (an admin-scope API key)")
    url = args.url.rstrip("/") + path
    try:
        response = httpx.request(
            method,
            url,
            params=params,
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {args.key}"},
        )
    except httpx.HTTPError as exc:
        raise CliError(unreachable(args.url, exc)) from None
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text[:200]
        raise RemoteError(f"{args.url} answered {response.status_code}: {message}", response)
    return response.json()


@contextmanager
def _migrated_store(args: argparse.Namespace) -> Iterator[Any]:
    """The settings' store with its schema up to date; a store error is one CLI line."""
    from .store import StoreError, apply_migrations

    store = _open_store(args)
    try:
        apply_migrations(store)
        yield store
    except StoreError as exc:
        raise CliError(str(exc)) from None
    finally:
        store.close()


def _with_local_store(args: argparse.Namespace, fn: Any) -> Any:
    """`fn(store)` for a read command. An embedded store that does not exist yet is not made
    for it (a read in the wrong folder left an empty data folder behind)."""
    settings = _settings(args)
    if not settings.clickhouse_url and not settings.store_path.exists():
        raise CliError(
            f"no embedded store in {settings.data_dir.resolve()}: nothing is stored there yet"
            " (`watchllm serve` makes it on its first start; --data-dir or WATCHLLM_DATA_DIR"
            " names another folder, --url asks a running server)"
        )
    with _migrated_store(args) as store:
        return fn(store)


def _quiet_store_logs() -> None:
    """A command that reports a store failure as one line: the store's and clickhouse-connect's
    own warnings (a server down: "Unexpected Http Driver Exception") would repeat it."""
    for name in ("clickhouse_connect", "watchllm.clickhouse"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_verify(args: argparse.Namespace) -> int:
    if args.url:
        version = _remote(args, "/v1/admin/store")["version"]
    else:
        version = _with_local_store(args, lambda store: store.version())
    print(f"Successfully connected to ClickHouse! Version: {version}")
    return 0


def cmd_check_tables(args: argparse.Namespace) -> int:
    if args.url:
        tables = _remote(args, "/v1/admin/tables")["tables"]
    else:
        from .app import list_tables

        tables = _with_local_store(args, list_tables)
    for name in tables:
        print(name)
    return 0


def cmd_count_rows(args: argparse.Namespace) -> int:
    if args.url:  # the server says which tables it counts (and needs none of .app here)
        params = {"table": args.table}
        if args.project:
            params["project"] = args.project
        if args.run:
            params["run"] = args.run
        answer = _remote(args, "/v1/admin/count", params)
        # An admin key counts its own project when none is named: say which one was counted.
        count, project = answer["count"], answer.get("project")
        deadline = time.monotonic() + args.timeout
        # Accepted events reach the store at the writer's next flush (flush_interval_s).
        while args.wait and count < args.wait and time.monotonic() < deadline:
            time.sleep(0.2)
            count = _remote(args, "/v1/admin/count", params)["count"]
    else:
        from .app import STORE_TABLES, count_rows

        if args.table not in STORE_TABLES:
            raise CliError(f"--table must be one of {', '.join(STORE_TABLES)}")
        if args.wait:
            # The folder is open in one process only: no server is writing to it now.
            raise CliUsageError("--wait needs --url: only a running server adds rows")
        count = _with_local_store(args, lambda s: count_rows(s, args.table, args.project, args.run))
        project = args.project
    scope = f"project {project}" if project else "all projects"
    if args.run:
        scope += f", run {args.run}"
    print(f"rows in {args.table} ({scope}):")
    print(count)
    if args.wait and count < args.wait:
        raise CliError(
            f"{args.table} has {count} rows, not {args.wait}, after --timeout {args.timeout:g} s"
            " (events reach the store within the server's flush_interval_s of their 202;"
            " more missing means they were not accepted, or the store is behind: GET /readyz)"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoError, build, look_at, send, summary
    from .remote import server_url_problem

    url = args.url or os.environ.get("WATCHLLM_BASE_URL") or _DEMO_URL
    if args.url is None and (problem := server_url_problem(url)) is not None:
        raise CliUsageError(f"WATCHLLM_BASE_URL {url!r}: {problem}")
    key = args.key or os.environ.get("WATCHLLM_API_KEY")
    if not key:
        raise CliUsageError(
            "demo needs a key of the project to load: --key, or WATCHLLM_API_KEY"
            " (the first `watchllm serve` prints one)"
        )
    try:
        sample = build(args.events, seed=args.seed, days=args.days)
        project = send(url, key, sample)
    except DemoError as exc:
        raise CliError(str(exc)) from None
    for line in [*summary(sample), *look_at(url, project, sample)]:
        print(line)
    return 0


def cmd_golden_path(args: argparse.Namespace) -> int:
    from .golden_path import StepFailed, run, run_on_scratch_server

    try:
        if args.url:
            if not args.key:
                raise CliError("--url needs --key (a key with ingest and read scopes)")
            run(args.url, args.key)
        else:
            run_on_scratch_server()
    except StepFailed as exc:
        raise CliError(str(exc)) from None
    return 0


# --- export / import ---------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from .store.transfer import TransferError, export_folder

    try:
        export_folder(_settings(args), args.out_dir, max_rows_per_file=args.max_rows_per_file)
    except TransferError as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        print(
            f"interrupted: {args.out_dir} is incomplete (it has no manifest.json);"
            " delete it and export again",
            file=sys.stderr,
        )
        return 130
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .store.transfer import CountMismatch, TransferError, import_folder

    # --url as the clickhouse_url setting: a bad one is refused now, before the files are
    # verified, naming --url (or the variable, or the file) and never its password.
    settings = _settings(args, clickhouse_url=args.url)
    url = settings.clickhouse_url
    if not url:
        raise CliUsageError(
            "import needs the ClickHouse server to import into: --url"
            " http(s)://user:password@host:port/database, or WATCHLLM_CLICKHOUSE_URL"
        )
    _quiet_store_logs()
    try:
        import_folder(settings, args.in_dir, url, resume=args.resume, batch_rows=args.batch_rows)
    except CountMismatch as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        raise CliError(str(exc)) from None
    except TransferError as exc:
        raise CliError(str(exc)) from None
    except KeyboardInterrupt:
        print(
            "interrupted: the import is incomplete; run the same command with --resume"
            " to finish it",
            file=sys.stderr,
        )
        return 130
    return 0


# --- dead letters -------------------------------------------------------------------------------


def cmd_dead_list(args: argparse.Namespace) -> int:
    if args.url:
        body = _remote(args, "/v1/admin/dead-letters", _dead_params(args))
        entries, torn = body["dead_letters"], body.get("torn_records", 0)
    else:
        from .delivery.dead_letters import read_dead_letters, summary

        folder = _spool_of_a_data_folder(args) / "dead-letter"
        found = read_dead_letters(folder, args.sink, args.project)
        entries, torn = summary(found.entries), found.torn_records
    for e in entries:
        print(f"{e['at']}  {e['sink']}  {e['events']} events  {e['reason']}")
    print(f"{sum(e['events'] for e in entries)} events in {len(entries)} dead letters")
    if torn:
        print(f"{torn} torn records skipped (cut short by a crash; see docs/DURABILITY.md)")
    return 0


def _spool_of_a_data_folder(args: argparse.Namespace) -> Path:
    """The spool folder of the data folder named, which must exist: a typo in --data-dir is
    said, not answered "0 events in 0 dead letters" (nor made into a new empty folder)."""
    settings = _settings(args)
    if not settings.data_dir.exists() and not _under_a_file(settings.data_dir):
        raise CliError(
            f"no data folder {settings.data_dir.resolve()} (`watchllm serve` makes it on its"
            " first start; --data-dir or WATCHLLM_DATA_DIR names another folder, --url asks a"
            " running server)"
        )
    return settings.spool_path


def _dead_params(args: argparse.Namespace) -> dict[str, str] | None:
    params = {"sink": args.sink, "project": args.project}
    return {k: v for k, v in params.items() if v} or None


def cmd_dead_replay(args: argparse.Namespace) -> int:
    if args.url:
        body = _remote(args, "/v1/admin/dead-letters/replay", _dead_params(args), method="POST")
        entries, events = body["entries"], body["replayed_events"]
        if body.get("unknown_sinks"):
            print(f"kept (no such sink is running): {', '.join(body['unknown_sinks'])}")
    else:
        _spool_of_a_data_folder(args)
        entries, events = _replay_local(args)
        if not entries and (args.sink or args.project):
            _nothing_for(args)
    print(f"replayed {events} events from {entries} dead letters")
    return 0


def _nothing_for(args: argparse.Namespace) -> None:
    """A sink or project named with no dead letters is likely a typo: say so, and which
    sinks do have some, rather than "replayed 0 events"."""
    from .delivery.dead_letters import read_dead_letters

    named = " and ".join(
        f"{what} {value!r}"
        for what, value in (("sink", args.sink), ("project", args.project))
        if value
    )
    found = read_dead_letters(_settings(args).spool_path / "dead-letter")
    sinks = sorted({e.sink for e in found.entries})
    have = f"sinks with dead letters: {', '.join(sinks)}" if sinks else "there are none at all"
    raise CliError(f"no dead letters for {named}; {have}")


def _replay_local(args: argparse.Namespace) -> tuple[int, int]:
    from .app import open_spool
    from .delivery.dead_letters import done, put_back, take_dead_letters, targeted_payload
    from .delivery.spool import SpoolFull
    from .delivery.writer import SPANS, TARGETED
    from .store import StoreError

    try:
        spool, lock = open_spool(_settings(args))
    except StoreError as exc:
        raise _folder_failure(args, exc) from None
    try:
        taken = take_dead_letters(spool.dead_letter_dir, args.sink, args.project)
        events = 0
        for at, entry in enumerate(taken.entries):
            payload = targeted_payload(entry.sink, entry.events, entry.kind)
            flags = TARGETED | SPANS if entry.kind == "spans" else TARGETED
            try:
                spool.write(payload, len(entry.events), flags)
            except SpoolFull as exc:
                spool.close()  # what went in is on disk; the rest goes back to its files
                put_back(taken, at)
                raise CliError(
                    f"the spool is full ({exc}): replayed {events} events first; the other"
                    f" {len(taken.entries) - at} dead letters are kept for the next replay"
                ) from None
            events += len(entry.events)
        spool.close()  # fsyncs: the records are on disk for the next start
        done(taken.moved)
    finally:
        lock.release()
    return len(taken.entries), events


# --- keys -----------------------------------------------------------------------------------------


@contextmanager
def _keys(args: argparse.Namespace, *, make: bool = False) -> Iterator[Any]:
    """The key file, or with key_store = clickhouse the keys on the server. Only `make`
    (keys create) makes a key file that is not there: listing or revoking in the wrong
    folder says so instead of leaving an empty file behind."""
    from .keys import KeyStore, ServerKeyStore

    settings = _settings(args)
    if settings.key_store != "clickhouse":
        _check_key_file(settings.keys_path, make)
        yield KeyStore(settings.keys_path)
        return
    # Migrated: the api_keys table, on a server that has not served yet.
    with _migrated_store(args) as store:
        yield ServerKeyStore(store)


def _under_a_file(path: Path) -> bool:
    """Whether the nearest of `path`'s folders that exists is a file (where a folder must
    be): then the code that opens it names the problem ("cannot use the data folder")."""
    for folder in path.parents:
        if folder.exists():
            return not folder.is_dir()
    return False


def _check_key_file(path: Path, make: bool) -> None:
    if make or path.exists() or _under_a_file(path):
        return  # a file where a folder must be: the key store's own error names it
    raise CliError(
        f"no key file at {path.resolve()}: the first `watchllm serve` or `watchllm keys create`"
        " makes it (--data-dir or WATCHLLM_DATA_DIR names another folder)"
    )


def cmd_keys_create(args: argparse.Namespace) -> int:
    from .keys import KeyStoreError

    settings = _settings(args)
    local = settings.key_store != "clickhouse"
    path = settings.keys_path.resolve()
    new_file = local and not path.exists()
    try:
        with _keys(args, make=True) as keys:
            key = keys.create(args.project, scope=args.scope, name=args.name)
    except KeyStoreError as exc:
        raise CliError(str(exc)) from None
    # Where it went: the data folder is ./.watchllm unless given, so the same command in
    # another folder makes a key that the server does not know.
    where = f"in {path}" if local else "on the ClickHouse server (key_store = clickhouse)"
    article = _article(args.scope)
    print(
        f"Created {article} {args.scope} key for project {args.project} {where}."
        " It is shown only once:"
    )
    print(key, flush=True)
    if new_file:
        served_by = (
            f"a server with keys_file {path}"
            if settings.keys_file
            else f"a server started on the data folder {path.parent}"
        )
        print(
            f"note: {path} is a new key file: only {served_by} knows this key"
            " (--data-dir or WATCHLLM_DATA_DIR names another folder)",
            file=sys.stderr,
        )
    return 0


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _keys(args) as keys:
        records = keys.list(args.project)
    print(f"{'KEY ID':<14}{'PROJECT':<20}{'SCOPE':<10}{'CREATED':<27}{'REVOKED':<27}NAME")
    for r in records:
        print(
            f"{r.key_id:<14}{r.project_id:<20}{r.scope:<10}{r.created_at:<27}"
            f"{r.revoked_at or '-':<27}{r.name}"
        )
    return 0


def cmd_keys_copy(args: argparse.Namespace) -> int:
    from .keys import KeyStore, ServerKeyStore

    settings = _settings(args)
    if not settings.clickhouse_url:
        raise CliUsageError("copy-to-server needs the server: set WATCHLLM_CLICKHOUSE_URL")
    with _migrated_store(args) as store:
        _check_key_file(settings.keys_path, make=False)
        rows = KeyStore(settings.keys_path).rows()
        added = ServerKeyStore(store).add(rows)
    print(f"copied {len(added)} of {len(rows)} keys from {settings.keys_path} to the server")
    if settings.key_store != "clickhouse":
        print("servers read them with WATCHLLM_KEY_STORE=clickhouse")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from .keys import split_key

    # The whole key may be given: only its id is ever printed (the rest is the secret).
    parts = split_key(args.key_id)
    key_id = parts[0] if parts else args.key_id
    with _keys(args) as keys:
        revoked = keys.revoke(args.key_id)
    if not revoked:
        raise CliError(f"no active key with id {key_id!r}")
    print(f"revoked {key_id}; running servers stop accepting it within 2 seconds")
    return 0


# --- usage (quotas) -------------------------------------------------------------------------------


def cmd_usage(args: argparse.Namespace) -> int:
    """`usage show|set|reset`: through a running server (--url), or straight to Redis."""
    change: dict[str, Any] = {}
    if args.usage_command == "reset":
        change["reset"] = True
    elif args.usage_command == "set":
        values = {
            w: getattr(args, w)
            for w in ("minute", "day", "month", "payload_bytes")
            if getattr(args, w) is not None
        }
        if values:
            change["set"] = values
        if args.plan is not None:
            change["plan"] = None if args.plan == "none" else args.plan
        if not change:
            raise CliUsageError(
                "usage set needs --minute, --day, --month, --payload-bytes or --plan"
            )
    if args.url:
        params = {"project": args.project}
        try:
            if change:
                report = _remote(args, "/v1/admin/usage", params, method="POST", body=change)
            else:
                report = _remote(args, "/v1/admin/usage", params)
        except RemoteError as exc:
            if exc.status != 404 or "no route" not in str(exc):  # not another 404 (a proxy's)
                raise
            # The route exists only while quotas are on (as the local form says it).
            raise CliError(
                f"{args.url} has quotas off (quota_backend = off): no usage to show or"
                " change; see docs/QUOTAS.md"
            ) from None
    else:
        report = _usage_local(args, change)
    _print_usage(report)
    return 0


def _usage_local(args: argparse.Namespace, change: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    from .errors import Problem
    from .quotas.engine import QuotaUnavailable
    from .quotas.plugin import QuotaPlugin
    from .quotas.routes import apply_change

    settings = _settings(args)
    if settings.quota_backend != "redis":
        raise CliUsageError(
            f"quota_backend is {settings.quota_backend!r}: usage is kept inside the running"
            " server; ask it with --url URL --key KEY (an admin key of the project)"
            if settings.quota_backend == "memory"
            else "quotas are off (quota_backend = off); see docs/QUOTAS.md"
        )
    plugin = QuotaPlugin(settings)

    async def run() -> dict[str, Any]:
        try:
            if change:
                await apply_change(plugin, args.project, change)
            return await plugin.report(args.project)
        finally:
            await plugin.backend.close()

    try:
        return asyncio.run(run())
    except QuotaUnavailable as exc:
        raise CliError(str(exc)) from None
    except Problem as exc:  # 422 (an unknown plan) or 503 (Redis did not answer)
        raise (CliUsageError if exc.status < 500 else CliError)(exc.message) from None


def _print_usage(report: dict[str, Any]) -> None:
    limits = report["limits"]
    print(f"project {report['project_id']}: plan {report['plan']} ({report['backend']} backend)")
    print(f"{'WINDOW':<15}{'USED':>14}{'LIMIT':>16}{'REMAINING':>14}  RESETS IN")
    resets = report.get("resets_in_s", {})
    for window, field in (
        ("minute", "events_per_minute"),
        ("day", "events_per_day"),
        ("month", "events_per_month"),
        ("payload_bytes", "payload_bytes_per_month"),
    ):
        limit = limits.get(field)
        remaining = report["remaining"].get(window)
        reset = resets.get(window, resets.get("month"))
        print(
            f"{window:<15}{report['used'][window]:>14,}{(f'{limit:,}' if limit else '-'):>16}"
            f"{(f'{remaining:,}' if remaining is not None else '-'):>14}  {reset} s"
        )
    if "spent_usd_this_month" in report:
        budget = limits.get("usd_per_month")
        of = f" of ${budget:g}" if budget else ""
        print(f"spent this month: ${report['spent_usd_this_month']:.6f}{of}")


if __name__ == "__main__":
    sys.exit(main())
