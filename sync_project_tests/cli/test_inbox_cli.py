"""``sync-project inbox stats`` and ``sync-project inbox replay`` against the configured database."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from sync_project.cli import main
from sync_project.store import RoutedEvent, Store
from sync_project.store.schema import inbox


@pytest.fixture
def cli(database_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("SYNC_DATABASE_URL", database_url)
    return CliRunner()


def routed(key: str, connection_id: str = "north", provider_account: str = "acct-1") -> RoutedEvent:
    return RoutedEvent(
        event_key=key,
        event_type="t",
        account_id=provider_account,
        payload={},
        sync="acme/contacts",
        connection_id=connection_id,
    )


def test_stats_prints_every_status_and_the_oldest_pending(cli: CliRunner, database_url: str) -> None:
    with Store(database_url) as store:
        store.inbox.receive("acme", [routed("e1"), routed("e2"), routed("u1", connection_id="")])
    result = cli.invoke(main, ["inbox", "stats"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines() if not line.startswith("oldest"))
    assert (lines["pending"], lines["unroutable"], lines["dead"]) == ("2", "1", "0")
    assert "oldest pending:" in result.output and "s ago" in result.output

    as_json = cli.invoke(main, ["inbox", "stats", "--json"])
    figures = json.loads(as_json.output)
    assert figures["counts"]["pending"] == 2 and figures["oldest_pending_age_s"] >= 0


def test_replay_dead_makes_them_pending(cli: CliRunner, database_url: str) -> None:
    with Store(database_url) as store:
        store.inbox.receive("acme", [routed("e1"), routed("e2")])
        for row in store.inbox.events():
            store.inbox.mark_failed(row.id, "boom", max_attempts=1)
    result = cli.invoke(main, ["inbox", "replay", "--status", "dead"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "2 event(s) became pending; 0 still dead"
    with Store(database_url) as store:
        assert store.inbox.count(status="pending") == 2


def test_replay_unroutable_routes_what_now_has_a_connection(cli: CliRunner, database_url: str) -> None:
    with Store(database_url) as store:
        store.inbox.receive(
            "acme", [routed("u1", connection_id=""), routed("u2", connection_id="", provider_account="acct-x")]
        )
        store.connections.add("acme", "north", account_id="acct-1")
    result = cli.invoke(main, ["inbox", "replay", "--status", "unroutable", "--provider", "acme"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "1 event(s) of provider acme became pending; 1 still unroutable"


def test_replay_refuses_a_status_it_cannot_replay(cli: CliRunner) -> None:
    result = cli.invoke(main, ["inbox", "replay", "--status", "done"])
    assert result.exit_code == 2
    assert "'done' is not one of 'dead', 'unroutable'" in result.output


def test_purge_removes_old_finished_events_only(cli: CliRunner, database_url: str) -> None:
    with Store(database_url) as store:
        store.inbox.receive("acme", [routed("done-old"), routed("done-new"), routed("pending-old")])
        with store.engine.begin() as conn:
            finished = [e.id for e in store.inbox.events() if e.event_key.startswith("done")]
            store.inbox.mark_done(conn, finished)
            conn.execute(
                sa.update(inbox)
                .where(inbox.c.event_key.like("%-old"))
                .values(received_at=datetime.now(timezone.utc) - timedelta(days=3))
            )
    result = cli.invoke(main, ["inbox", "purge", "--older-than-days", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "1 finished event(s) purged"
    with Store(database_url) as store:
        assert [e.event_key for e in store.inbox.events()] == ["done-new", "pending-old"]
    assert cli.invoke(main, ["inbox", "purge", "--older-than-days", "0"]).exit_code == 2


def test_purge_shows_progress_when_there_is_much_to_delete(
    cli: CliRunner, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sync_project.cli.inbox as inbox_cli

    monkeypatch.setattr(inbox_cli, "PROGRESS_FROM", 2)  # a bar from two rows to delete, not 10,000
    with Store(database_url) as store:
        store.inbox.receive("acme", [routed("a"), routed("b"), routed("c")])
        with store.engine.begin() as conn:
            store.inbox.mark_done(conn, [e.id for e in store.inbox.events()])
            conn.execute(sa.update(inbox).values(received_at=datetime.now(timezone.utc) - timedelta(days=9)))
    result = cli.invoke(main, ["inbox", "purge", "--older-than-days", "7"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("purging finished events")  # off a terminal, click shows the label once
    assert lines[-1] == "3 finished event(s) purged"
    with Store(database_url) as store:
        assert store.inbox.events() == []
