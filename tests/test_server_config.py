"""The ClickHouse server files we ship (clickhouse/server/, clickhouse/cluster/), loaded by the
ClickHouse engine itself (chDB with the file as its config, in a subprocess each, since a
process holds one chDB instance): the system-log TTLs and memory budget take effect, the
profile names only real settings, and the example cluster is what docs/DEPLOY.md describes."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "clickhouse" / "server"

_PROBE = """
import json, sys
from chdb import session
s = session.Session(sys.argv[1] + "?config-file=" + sys.argv[2])
s.query("SELECT 1")
s.query("SYSTEM FLUSH LOGS")
out = {}
for name, sql in json.loads(sys.argv[3]).items():
    text = s.query(sql, "JSONEachRow").data()
    out[name] = [json.loads(line) for line in text.split("\\n") if line]
print(json.dumps(out))
"""


def probe(tmp_path: Path, config: Path, queries: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "chdb"), str(config), json.dumps(queries)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_system_logs_get_ttls_and_the_memory_budget_applies(tmp_path: Path) -> None:
    config = SERVER / "config.d" / "watchllm.xml"
    got = probe(
        tmp_path,
        config,
        {
            "logs": "SELECT name, engine_full FROM system.tables"
            " WHERE database = 'system' AND engine = 'MergeTree' ORDER BY name",
            "server": "SELECT name, value FROM system.server_settings WHERE name IN"
            " ('max_server_memory_usage_to_ram_ratio', 'mark_cache_size') ORDER BY name",
        },
    )
    configured = {
        child.tag: child.findtext("ttl")
        for child in ET.parse(config).getroot()
        if child.find("ttl") is not None
    }
    created = {row["name"]: row["engine_full"] for row in got["logs"]}
    assert {"query_log", "part_log", "metric_log", "text_log"} <= set(configured)
    for table, ttl in configured.items():
        days = ttl.split("INTERVAL ")[1].split(" DAY")[0]
        assert f"toIntervalDay({days})" in created[table], (table, created.get(table))
    assert {r["name"]: r["value"] for r in got["server"]} == {
        "mark_cache_size": "1073741824",
        "max_server_memory_usage_to_ram_ratio": "0.8",
    }


def test_the_profile_names_real_settings(tmp_path: Path) -> None:
    profile = ET.parse(SERVER / "users.d" / "watchllm.xml").getroot().find("profiles/default")
    assert profile is not None
    wanted = {child.tag: child.text for child in profile}
    names = ", ".join(f"'{name}'" for name in wanted)
    got = probe(
        tmp_path,
        SERVER / "config.d" / "watchllm.xml",
        {"known": f"SELECT name FROM system.settings WHERE name IN ({names})"},
    )
    assert {r["name"] for r in got["known"]} == set(wanted)
    assert int(wanted["max_memory_usage"]) > int(wanted["max_bytes_before_external_group_by"])


def test_the_example_cluster(tmp_path: Path) -> None:
    got = probe(
        tmp_path,
        ROOT / "clickhouse" / "cluster" / "remote_servers.example.xml",
        {
            "hosts": "SELECT shard_num, replica_num, host_name FROM system.clusters"
            " WHERE cluster = 'watchllm' ORDER BY shard_num, replica_num",
            "macros": "SELECT macro, substitution FROM system.macros ORDER BY macro",
        },
    )
    assert [(r["shard_num"], r["replica_num"]) for r in got["hosts"]] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
    ]
    # The macros the replication path in layout.toml uses.
    assert {r["macro"] for r in got["macros"]} == {"shard", "replica"}
