"""The store sink's look-up of stored ids (store_sink.lookup_times) reads about one small
granule per id looked up, whatever the size of the table (migration 0010's event_ids), and
finds every stored copy, on every store."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

import pytest
from stores import EVERY_STORE, StoreBackend

from watchllm_ext.builtins.store_sink import lookup_times
from watchllm_ext.store import Store, apply_migrations

pytestmark = EVERY_STORE

ROWS = 400_000
# ms since the epoch of the stored copies: row n at BASE_MS + n, a second copy of every
# 1,000th id one second later (as two racing writers may leave before the clean-up).
BASE_MS = 1_780_000_000_000


@pytest.fixture
def store(store_backend: StoreBackend) -> Iterator[Store]:
    s = store_backend.open()
    apply_migrations(s)
    # Ids spread over the whole key range, as random client ids are.
    s.execute(
        "INSERT INTO event_ids SELECT 'acme', concat('id-', toString(cityHash64(number))),"
        f" fromUnixTimestamp64Milli(toInt64({BASE_MS} + number)) FROM numbers({ROWS})"
    )
    s.execute(
        "INSERT INTO event_ids SELECT 'acme', concat('id-', toString(cityHash64(number))),"
        f" fromUnixTimestamp64Milli(toInt64({BASE_MS} + number + 1000))"
        f" FROM numbers({ROWS}) WHERE number % 1000 = 0"
    )
    yield s
    s.close()


def test_a_lookup_reads_a_granule_an_id_and_finds_every_copy(store: Store) -> None:
    rng = random.Random(7)
    numbers = sorted({*rng.sample(range(ROWS), 200), 0, 1000})
    hashes = store.query(
        "SELECT number AS n, toString(cityHash64(number)) AS h FROM numbers({rows:UInt64})"
        " WHERE has({wanted:Array(UInt64)}, number)",
        {"rows": ROWS, "wanted": numbers},
    )
    ids = {int(r["n"]): f"id-{r['h']}" for r in hashes}
    missing = [f"missing-{k}" for k in range(100)]
    keys = [("acme", ids[n]) for n in numbers] + [("acme", m) for m in missing]
    found = lookup_times(store, keys)
    want = {
        ("acme", ids[n]): [BASE_MS + n] + ([BASE_MS + n + 1000] if n % 1000 == 0 else [])
        for n in numbers
    }
    assert found == want
    # The plan: the primary key of event_ids keeps ~one granule (256 rows) per id looked up,
    # out of the table's ~1,600 (a lookup in event_times' 8,192-row granules reads them all).
    listed = "', '".join(ids[n] for n in numbers) + "', '" + "', '".join(missing)
    plan = store.query(
        "EXPLAIN indexes = 1 SELECT event_id FROM event_ids"
        f" WHERE project_id = 'acme' AND event_id IN ['{listed}']"
    )
    text = "\n".join(str(next(iter(row.values()))) for row in plan)
    granules = [tuple(map(int, g)) for g in re.findall(r"Granules: (\d+)/(\d+)", text)]
    assert granules, text
    read, total = granules[-1]
    assert total >= ROWS // 256
    assert read <= len(keys) + 10, text
