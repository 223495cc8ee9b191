"""The cluster form of a migration statement (layout in clickhouse/cluster/layout.toml).

There is one SQL source, the single-node migrations; this is the small adapter that turns each
of their statements into what a ClickHouse cluster needs:

    CREATE TABLE t (...) ENGINE = X(args)   ->  CREATE TABLE t_local ON CLUSTER c (...)
                                                ENGINE = ReplicatedX('path', 'replica', args)
                                            +   CREATE TABLE t ON CLUSTER c AS t_local
                                                ENGINE = Distributed(c, db, t_local, key)
    CREATE TABLE t (...) ENGINE = Null      ->  CREATE TABLE t ON CLUSTER c (...) ENGINE = Null
    CREATE TABLE t AS s ENGINE = Null           (an input table, layout.toml input_tables:
                                                nothing is stored, so no replica, no shard)
    CREATE VIEW v AS ...                    ->  CREATE VIEW v ON CLUSTER c AS ...
                                                (it reads the Distributed tables)
    CREATE OR REPLACE VIEW v AS ...         ->  CREATE OR REPLACE VIEW v ON CLUSTER c AS ...
    CREATE MATERIALIZED VIEW m TO t AS ... FROM s
                                            ->  ... m ON CLUSTER c TO t_local AS ... FROM s_local
                                                (it fires on each node for the rows it stores)
    CREATE MATERIALIZED VIEW m TO t AS ... FROM i   (i an input table)
                                            ->  ... m ON CLUSTER c TO t AS ... FROM i
                                                (rows inserted on any node go through the
                                                Distributed t to the shard of their key)
    ALTER TABLE t <index, TTL, mutation>    ->  ALTER TABLE t_local ON CLUSTER c ...
    ALTER TABLE t ADD/DROP/RENAME COLUMN    ->  the same on t_local, then on t
    INSERT INTO t ...                       ->  unchanged: it runs once, through t
    DELETE FROM t WHERE ...                 ->  DELETE FROM t_local ON CLUSTER c WHERE ...
                                                (a Distributed table takes no DELETE)
    DROP VIEW IF EXISTS v                   ->  DROP VIEW IF EXISTS v ON CLUSTER c
    DROP TABLE IF EXISTS t                  ->  DROP TABLE IF EXISTS t ON CLUSTER c, then
                                                t_local (an input table: only t)

Any other statement raises ClusterFormError, so a new kind of statement gets a cluster form
(and a test) before it ships.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources


class ClusterFormError(ValueError):
    """A statement has no cluster form yet, or the layout lacks what it needs."""


@dataclass(frozen=True)
class Layout:
    replica_path: str
    replica_name: str
    local_suffix: str
    sharding_key: dict[str, str]
    input_tables: frozenset[str] = frozenset()

    def local(self, table: str) -> str:
        return table + self.local_suffix


@cache
def load_layout() -> Layout:
    text = (resources.files("watchllm_clickhouse") / "cluster" / "layout.toml").read_text()
    data = tomllib.loads(text)
    return Layout(
        replica_path=data["replica_path"],
        replica_name=data["replica_name"],
        local_suffix=data["local_suffix"],
        sharding_key=dict(data["sharding_key"]),
        input_tables=frozenset(data.get("input_tables", ())),
    )


_CREATE_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS (\w+)(\s*\()", re.I)
_CREATE_INPUT = re.compile(
    r"^CREATE TABLE IF NOT EXISTS (\w+)(\s*\(|\s+AS\s+\w+\s)(.*\bENGINE\s*=\s*Null)\s*$",
    re.I | re.S,
)
_ENGINE = re.compile(r"\bENGINE\s*=\s*(\w*MergeTree)\b(?:\(([^()]*)\))?", re.I)
_CREATE_VIEW = re.compile(
    r"^(CREATE VIEW IF NOT EXISTS|CREATE OR REPLACE VIEW) (\w+)(\s+AS\b)", re.I
)
_CREATE_MV = re.compile(
    r"^CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+)\s+TO\s+(\w+)(\s+AS\b)(.*)$", re.I | re.S
)
_ALTER = re.compile(r"^ALTER TABLE (\w+)(\s)", re.I)
# Changes to the column list: the Distributed table has the columns too. A MODIFY COLUMN
# that only sets or removes a TTL or codec concerns the stored data, so only the local table.
_COLUMN_CHANGE = re.compile(
    r"\b(?:ADD|DROP|RENAME|COMMENT)\s+COLUMN\b"
    r"|\bMODIFY\s+COLUMN\s+(?:IF\s+EXISTS\s+)?\w+\s+(?!TTL\b|REMOVE\b|CODEC\b)",
    re.I,
)
_INSERT = re.compile(r"^INSERT INTO \w+", re.I)
_DELETE = re.compile(r"^DELETE FROM (\w+)(\s)", re.I)
_DROP_VIEW = re.compile(r"^DROP VIEW IF EXISTS (\w+)$", re.I)
_DROP_TABLE = re.compile(r"^DROP TABLE IF EXISTS (\w+)$", re.I)
_TABLE_JOIN = re.compile(r"(?<!ARRAY )\bJOIN\b", re.I)  # a join of tables, not ARRAY JOIN
_FROM_TABLE = re.compile(r"\b(FROM|JOIN)(\s+)(\w+)\b", re.I)


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def for_cluster(statement: str, cluster: str, layout: Layout | None = None) -> list[str]:
    """The statements that do on `cluster` what `statement` does on one node."""
    layout = layout or load_layout()
    on_cluster = f" ON CLUSTER {quote(cluster)}"
    sql = statement.strip()

    if (found := _CREATE_INPUT.match(sql)) and found[1] in layout.input_tables:
        return [f"CREATE TABLE IF NOT EXISTS {found[1]}{on_cluster}{sql[found.start(2) :]}"]

    if found := _CREATE_TABLE.match(sql):
        table = found[1]
        key = layout.sharding_key.get(table)
        if key is None:
            raise ClusterFormError(
                f"table {table} has no sharding key in clickhouse/cluster/layout.toml"
            )
        local = layout.local(table)
        body = f"CREATE TABLE IF NOT EXISTS {local}{on_cluster}{found[2]}{sql[found.end() :]}"
        body = _replicated(body, table, layout)
        distributed = (
            f"CREATE TABLE IF NOT EXISTS {table}{on_cluster} AS {local}\n"
            f"ENGINE = Distributed({quote(cluster)}, currentDatabase(), {quote(local)}, {key})"
        )
        return [body, distributed]

    if found := _CREATE_VIEW.match(sql):
        return [f"{found[1]} {found[2]}{on_cluster}{sql[found.start(3) :]}"]

    if found := _CREATE_MV.match(sql):
        name, target, as_, select = found[1], found[2], found[3], found[4]
        sources = set(re.findall(r"\bFROM\s+(\w+)", select, re.I))
        if sources and sources <= layout.input_tables and not _TABLE_JOIN.search(select):
            # Fed by an input table on the node that took the insert: the rows go through
            # the Distributed table to the shard of their key. (ARRAY JOIN joins no table.)
            head = f"CREATE MATERIALIZED VIEW IF NOT EXISTS {name}{on_cluster} TO {target}"
            return [f"{head}{as_}{select}"]
        if re.search(r"\bJOIN\b", select, re.I):
            raise ClusterFormError(f"materialized view {name}: a JOIN has no cluster form yet")
        select = _FROM_TABLE.sub(
            lambda m: m[1] + m[2] + (layout.local(m[3]) if m[3] in layout.sharding_key else m[3]),
            select,
        )
        return [
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {name}{on_cluster}"
            f" TO {layout.local(target)}{as_}{select}"
        ]

    if found := _ALTER.match(sql):
        table, rest = found[1], sql[found.start(2) :]
        if table not in layout.sharding_key:
            raise ClusterFormError(f"ALTER of {table}, which layout.toml does not know")
        local_alter = f"ALTER TABLE {layout.local(table)}{on_cluster}{rest}"
        if _COLUMN_CHANGE.search(rest):
            return [local_alter, f"ALTER TABLE {table}{on_cluster}{_without_codec_ttl(rest)}"]
        return [local_alter]

    if _INSERT.match(sql):
        return [sql]

    if found := _DELETE.match(sql):
        table = found[1]
        if table not in layout.sharding_key:
            raise ClusterFormError(f"DELETE from {table}, which layout.toml does not know")
        return [f"DELETE FROM {layout.local(table)}{on_cluster}{sql[found.start(2) :]}"]

    if found := _DROP_VIEW.match(sql):
        return [f"DROP VIEW IF EXISTS {found[1]}{on_cluster}"]

    if found := _DROP_TABLE.match(sql):
        table = found[1]
        if table in layout.input_tables:
            return [f"DROP TABLE IF EXISTS {table}{on_cluster}"]
        if table not in layout.sharding_key:
            raise ClusterFormError(f"DROP of {table}, which layout.toml does not know")
        # The Distributed table first: nothing reads the local tables through it any more.
        return [
            f"DROP TABLE IF EXISTS {table}{on_cluster}",
            f"DROP TABLE IF EXISTS {layout.local(table)}{on_cluster}",
        ]

    raise ClusterFormError(f"no cluster form for this statement: {sql[:80]!r}")


def _replicated(create: str, table: str, layout: Layout) -> str:
    engine = _ENGINE.search(create)
    if engine is None:
        raise ClusterFormError(f"table {table}: only MergeTree-family engines can be replicated")
    if create[engine.end() :].lstrip().startswith("("):  # arguments with parentheses inside
        raise ClusterFormError(f"table {table}: engine arguments too complex for the adapter")
    name, args = engine[1], (engine[2] or "").strip()
    replica_args = [quote(layout.replica_path), quote(layout.replica_name)]
    if args:
        replica_args.append(args)
    return (
        create[: engine.start()]
        + f"ENGINE = Replicated{name}({', '.join(replica_args)})"
        + create[engine.end() :]
    )


def _without_codec_ttl(alter: str) -> str:
    # A Distributed table stores nothing: codecs and TTLs belong to the local table only.
    alter = re.sub(r"\s+CODEC\((?:[^()]|\([^()]*\))*\)", "", alter)
    return re.sub(r"\s+TTL\s+.*?(?=\s+(?:AFTER|FIRST|SETTINGS|COMMENT)\b|,|$)", "", alter)
