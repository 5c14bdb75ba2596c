"""Per-(sync, connection) state: checkpoint, last run, last success."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from sync_project.core.clock import utcnow
from sync_project.store.engine import reading, unavailable_as_store_error
from sync_project.store.schema import sync_state


class SyncState(BaseModel):
    sync: str
    connection_id: str
    checkpoint: dict[str, Any] | None = None
    last_success_at: datetime | None = None
    last_run_id: str | None = None
    last_mode: str | None = None
    last_error: str | None = None
    updated_at: datetime
    full_window_id: str | None = None
    full_window_started_at: datetime | None = None
    full_window_checkpoint: dict[str, Any] | None = None
    full_window_pages: int = 0
    full_window_records: int = 0
    full_window_runs: int = 0
    last_full_refresh_at: datetime | None = None

    @property
    def full_window(self) -> FullWindow | None:
        """The open full refresh, if one is (a run of it was killed or failed before its last page)."""
        if self.full_window_id is None or self.full_window_started_at is None:
            return None
        return FullWindow(
            window_id=self.full_window_id,
            started_at=self.full_window_started_at,
            checkpoint=self.full_window_checkpoint,
            pages=self.full_window_pages,
            records=self.full_window_records,
            runs=self.full_window_runs,
        )


class FullWindow(BaseModel):
    """A full refresh from its first page to its last, however many runs it takes.

    Records its pages return are marked with ``window_id`` (its first run's id); when its last
    page is in, delete detection tombstones what it never saw and nobody wrote after
    ``started_at``. A run killed in between leaves it open: the next full run resumes it at
    ``checkpoint`` (the provider's cursor after its last committed page).
    """

    window_id: str
    started_at: datetime
    checkpoint: dict[str, Any] | None = None
    pages: int = 0
    records: int = 0
    #: Runs that worked on it, the one that opened it included.
    runs: int = 1


def _state(row: Any) -> SyncState:
    values = dict(row)
    values["checkpoint"] = json.loads(row["checkpoint"]) if row["checkpoint"] else None
    values["full_window_checkpoint"] = (
        json.loads(row["full_window_checkpoint"]) if row["full_window_checkpoint"] else None
    )
    return SyncState.model_validate(values)


def upsert_state(conn: Connection, sync: str, connection_id: str, **values: Any) -> None:
    """Insert or update the state row; only the columns named in ``values`` change."""
    values["updated_at"] = utcnow()
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(sync_state).values(sync=sync, connection_id=connection_id, **values)
    conn.execute(statement.on_conflict_do_update(index_elements=["sync", "connection_id"], set_=values))


class SyncStates:
    """Reads and run bookkeeping outside a records transaction."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def get(self, sync: str, connection_id: str) -> SyncState | None:
        with unavailable_as_store_error(), reading(self._engine) as conn:
            row = (
                conn.execute(
                    select(sync_state).where(sync_state.c.sync == sync, sync_state.c.connection_id == connection_id)
                )
                .mappings()
                .first()
            )
        return None if row is None else _state(row)

    def of_sync(self, sync: str) -> dict[str, SyncState]:
        """Every connection's state of ``sync`` in one query (what a poll tick decides from)."""
        with unavailable_as_store_error(), reading(self._engine) as conn:
            rows = conn.execute(select(sync_state).where(sync_state.c.sync == sync)).mappings().all()
        return {row["connection_id"]: _state(row) for row in rows}

    def list(self, sync: str | None = None) -> list[SyncState]:
        query = select(sync_state.c.sync, sync_state.c.connection_id)
        if sync is not None:
            query = query.where(sync_state.c.sync == sync)
        with unavailable_as_store_error(), reading(self._engine) as conn:
            keys = conn.execute(query.order_by(sync_state.c.sync, sync_state.c.connection_id)).all()
        return [state for s, c in keys if (state := self.get(s, c)) is not None]

    def record_run(
        self,
        sync: str,
        connection_id: str,
        *,
        run_id: str,
        mode: str,
        succeeded_at: datetime | None = None,
        error: str | None = None,
    ) -> None:
        values: dict[str, Any] = {"last_run_id": run_id, "last_mode": mode, "last_error": error}
        if succeeded_at is not None:
            values["last_success_at"] = succeeded_at
        with unavailable_as_store_error(), self._engine.begin() as conn:
            upsert_state(conn, sync, connection_id, **values)

    def reset_checkpoint(self, sync: str, connection_id: str) -> None:
        with unavailable_as_store_error(), self._engine.begin() as conn:
            upsert_state(conn, sync, connection_id, checkpoint=None)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def open_window(conn: Connection, sync: str, connection_id: str, window: FullWindow) -> None:
    upsert_state(
        conn,
        sync,
        connection_id,
        full_window_id=window.window_id,
        full_window_started_at=window.started_at,
        full_window_checkpoint=_json(window.checkpoint),
        full_window_pages=window.pages,
        full_window_records=window.records,
        full_window_runs=window.runs,
    )


#: The state columns of no open full refresh (a closed window, or one a reset abandons).
NO_WINDOW: dict[str, Any] = {
    "full_window_id": None,
    "full_window_started_at": None,
    "full_window_checkpoint": None,
    "full_window_pages": 0,
    "full_window_records": 0,
    "full_window_runs": 0,
}


def close_window(conn: Connection, sync: str, connection_id: str, completed_at: datetime) -> None:
    upsert_state(conn, sync, connection_id, **NO_WINDOW, last_full_refresh_at=completed_at)
