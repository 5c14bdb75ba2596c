"""Shared helpers for the store tests: provider-shaped records and whole-database snapshots."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from sync_project.store import MergeStrategy, RecordSpec, Store
from sync_project.store.schema import feed_entries, records, sync_state

BASE = datetime(2024, 1, 1, tzinfo=timezone.utc)
CONN = "acme"

NEWEST = RecordSpec(primary_key="id", updated_field="updated_at", strategy=MergeStrategy.NEWEST_SOURCE_WINS)
MODIFIED_AFTER = RecordSpec(
    primary_key="id", updated_field="updated_at", strategy=MergeStrategy.IGNORE_IF_MODIFIED_AFTER
)
OVERRIDE = RecordSpec(primary_key="id", updated_field="updated_at", strategy=MergeStrategy.OVERRIDE)


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


def stamp(seconds: float) -> str:
    """A provider timestamp as ISO text, ``seconds`` after BASE."""
    return at(seconds).isoformat()


def contact(key: str, version: int, **fields: Any) -> dict[str, Any]:
    """A CRM contact at provider version ``version`` (its updated_at grows with the version)."""
    return {"id": key, "updated_at": stamp(version), "name": f"{key} v{version}", "version": version, **fields}


def snapshot(store: Store) -> list[tuple[Any, ...]]:
    """Every row of the records, feed and sync_state tables, to prove a refused batch changed nothing."""
    with store.engine.connect() as conn:
        rows = [("records", *row) for row in conn.execute(sa.select(records).order_by(*records.primary_key))]
        rows += [("feed", *row) for row in conn.execute(sa.select(feed_entries).order_by(*feed_entries.primary_key))]
        rows += [("state", *row) for row in conn.execute(sa.select(sync_state).order_by(*sync_state.primary_key))]
    return rows


def insert_old_records(engine: sa.Engine, rows: list[dict[str, Any]]) -> None:
    """Records written as an older revision's code wrote them (the columns are unchanged since 0002),
    for migration tests: today's writers also need the tables of today's schema."""
    defaults = {"connection_id": CONN, "source_updated_at": None, "deleted_at": None, "seen_by_run": None}
    with engine.begin() as conn:
        conn.execute(
            sa.insert(records),
            [
                {
                    **defaults,
                    "data": json.dumps({"id": row["external_id"]}),
                    "data_hash": "0" * 32,
                    "first_seen_at": row["last_modified_at"],
                    "last_action": "deleted" if row.get("deleted_at") else "added",
                    **row,
                }
                for row in rows
            ],
        )
