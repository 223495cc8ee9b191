"""Which stores a storage test runs against, and a fresh place in each store for every test.

A test module marked ``pytestmark = EVERY_STORE`` (or one test decorated with it) runs each of
its tests that use the ``store_backend`` fixture, directly or through ``server_factory`` /
``server`` of conftest.py, once per store, the store named in the test id:

* ``chdb``: the embedded chDB store (plugins/chdb_store.py) in the test's temp folder;
* ``clickhouse``: the ClickHouse-server store (plugins/clickhouse_store.py, clickhouse-connect)
  against tests/chfixture.py, which is started once per session;
* ``server``: the same store against a real ClickHouse server, only when
  ``WATCHLLM_TEST_CLICKHOUSE_URL`` is set (``http(s)://user:password@host:port/`` with the
  options of ``WATCHLLM_CLICKHOUSE_URL``; the URL's database, ``default`` if none, must exist
  and is used only to create and drop the tests' databases). Unset, the id is not generated.

On ClickHouse every test gets databases of its own, ``watchllm_test_<random>``, created on
first use and dropped after the test. ``@CHDB_ONLY`` keeps one test of a marked module on the
embedded store alone (say why where it is used). Tests that are not marked are not
parametrized: ``store_backend`` is chdb for them, so the other suites run once, as before.

Loaded as a pytest plugin by conftest.py; test modules import the markers from here.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from chfixture import Fixture, start_fixture

from watchllm_ext.store import Store, apply_migrations
from watchllm_plugins.chdb_store import ChdbStore
from watchllm_plugins.clickhouse_store import ClickHouseStore, parse_url

TEST_SERVER_ENV = "WATCHLLM_TEST_CLICKHOUSE_URL"
ALL_STORES = ("chdb", "clickhouse", "server")

# The chfixture's user: a password that must be URL-encoded, so every test on it goes
# through the store's URL decoding (tests/test_clickhouse_store.py uses the same fixture).
FIXTURE_USER = "watchllm"
FIXTURE_PASSWORD = "p@ss:w/rd %"

EVERY_STORE = pytest.mark.stores(*ALL_STORES)
CHDB_ONLY = pytest.mark.stores("chdb")


def store_names(wanted: tuple[str, ...] = ALL_STORES) -> list[str]:
    """The stores of `wanted` that can run here: `server` only with the env variable set."""
    return [name for name in wanted if name != "server" or os.environ.get(TEST_SERVER_ENV)]


def with_database(url: str, database: str) -> str:
    """`url` (a ClickHouse URL as the store takes it) naming `database` instead of its own."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@dataclass
class ClickHouseTarget:
    """A ClickHouse to create the tests' databases on: a base URL and a store to run DDL."""

    url: str
    admin: ClickHouseStore

    @classmethod
    def open(cls, url: str) -> ClickHouseTarget:
        parse_url(url)  # a bad URL fails here, naming the problem
        return cls(url, ClickHouseStore(url))

    def create_database(self) -> str:
        name = f"watchllm_test_{uuid.uuid4().hex[:12]}"
        self.admin.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self.admin.execute(f"DROP DATABASE IF EXISTS {name} SYNC")


@dataclass
class StoreBackend:
    """The store one test runs against. `place` names a separate, empty store within the test
    (a chDB folder, or a ClickHouse database): "main" is the one servers of the test use."""

    name: str
    folder: Path
    target: ClickHouseTarget | None = None
    databases: dict[str, str] = field(default_factory=dict)

    @property
    def is_clickhouse(self) -> bool:
        return self.target is not None

    def database(self, place: str = "main") -> str:
        assert self.target is not None, "the chdb store has no database of its own"
        if place not in self.databases:
            self.databases[place] = self.target.create_database()
        return self.databases[place]

    def url(self, place: str = "main") -> str | None:
        """The ClickHouse URL of `place` (created on first use); None for chdb."""
        if self.target is None:
            return None
        return with_database(self.target.url, self.database(place))

    def open(self, place: str = "main") -> Store:
        """A new store on `place`: ChdbStore on folder/place, or ClickHouseStore on its
        database. The caller closes it."""
        url = self.url(place)
        if url is None:
            return ChdbStore(self.folder / place)
        return ClickHouseStore(url)

    def settings(self) -> dict[str, Any]:
        """Settings overrides that make a server of this test use this store ("main")."""
        url = self.url()
        return {} if url is None else {"clickhouse_url": url}

    def drop(self) -> None:
        assert self.target is not None
        for database in self.databases.values():
            self.target.drop_database(database)
        self.databases.clear()


# --- the pytest plugin ----------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stores(*names): run the test once per store of `names` that can run here "
        "(chdb, clickhouse, server); see tests/stores.py",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("stores")
    if marker is None or "store_backend" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(ALL_STORES)
    if unknown:
        raise pytest.UsageError(f"unknown stores {sorted(unknown)}; known: {ALL_STORES}")
    names = store_names(marker.args)
    if names != ["chdb"]:  # one store alone is the default: no id to add
        metafunc.parametrize("store_backend", names, indirect=True)


@pytest.fixture(scope="session")
def chfixture_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    """tests/chfixture.py in a subprocess, once for the whole session."""
    fixture = start_fixture(tmp_path_factory.mktemp("chfixture"), FIXTURE_USER, FIXTURE_PASSWORD)
    try:
        yield fixture
    finally:
        fixture.stop()
    assert "Traceback" not in fixture.log(), fixture.log()


@pytest.fixture(scope="session")
def chfixture_target(chfixture_server: Fixture) -> Iterator[ClickHouseTarget]:
    target = ClickHouseTarget.open(chfixture_server.url + "default")
    yield target
    try:  # every test dropped what it created
        left = target.admin.query(
            "SELECT name FROM system.databases WHERE startsWith(name, 'watchllm_test_')"
        )
        assert not left, f"databases left behind on the chfixture: {left}"
    finally:
        target.admin.close()


@pytest.fixture(scope="session")
def server_target() -> Iterator[ClickHouseTarget]:
    url = os.environ.get(TEST_SERVER_ENV)
    if not url:  # never parametrized then; asked for by name only
        pytest.skip(f"{TEST_SERVER_ENV} is not set")
    target = ClickHouseTarget.open(url)
    yield target
    target.admin.close()


@pytest.fixture
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    """The store of this test (chdb unless the test is parametrized by EVERY_STORE)."""
    name = getattr(request, "param", "chdb")
    if name == "chdb":
        yield StoreBackend(name, tmp_path)
        return
    target_fixture = {"clickhouse": "chfixture_target", "server": "server_target"}[name]
    backend = StoreBackend(name, tmp_path, request.getfixturevalue(target_fixture))
    try:
        yield backend
    finally:
        backend.drop()


@pytest.fixture
def store(store_backend: StoreBackend) -> Iterator[Store]:
    """The test's store, opened with its schema applied (a test module may define its own)."""
    opened = store_backend.open()
    apply_migrations(opened)
    yield opened
    opened.close()
