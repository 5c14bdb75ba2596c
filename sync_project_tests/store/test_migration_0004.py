"""Revision 0004 (the records primary key leads with the id) on a database holding records, both backends."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from sync_project.store import migrate
from sync_project.store.engine import make_engine
from sync_project.store.schema import records

from .helpers import at, insert_old_records

SYNC = "crm/contacts"


def primary_key(engine: Engine) -> list[str]:
    return list(inspect(engine).get_pk_constraint("records")["constrained_columns"])


def all_records(engine: Engine) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(records.c.sync, records.c.external_id, records.c.data)).all())


def test_upgrading_reorders_the_key_and_keeps_every_record(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine, "0003f")
        assert primary_key(engine) == ["sync", "connection_id", "external_id"]
        insert_old_records(
            engine,
            [
                {"sync": SYNC, "external_id": "a", "last_modified_at": at(1)},
                {"sync": SYNC, "external_id": "b", "last_modified_at": at(2), "deleted_at": at(2)},
                {"sync": "other/sync", "external_id": "a", "last_modified_at": at(1)},
            ],
        )
        before = all_records(engine)

        migrate.upgrade(engine, "0004")
        assert primary_key(engine) == ["external_id", "sync", "connection_id"]
        assert all_records(engine) == before
        # The key still refuses a second row of one record.
        with pytest.raises(IntegrityError):
            insert_old_records(engine, [{"sync": SYNC, "external_id": "a", "last_modified_at": at(3)}])

        with engine.begin() as conn:
            command.downgrade(migrate._config(conn), "0003f")
        assert primary_key(engine) == ["sync", "connection_id", "external_id"]
        assert all_records(engine) == before
    finally:
        engine.dispose()
