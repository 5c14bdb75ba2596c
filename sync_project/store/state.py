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
            row = conn.execute(
                select(sync_state).where(sync_state.c.sync == sync, sync_state.c.connection_id == connection_id)
            ).mappings().first()
        if row is None:
            return None
        values = dict(row)
        values["checkpoint"] = json.loads(row["checkpoint"]) if row["checkpoint"] else None
        return SyncState.model_validate(values)

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
