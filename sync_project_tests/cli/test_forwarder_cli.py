"""``sync-project forwarder`` stats, replay, purge and run's configuration errors, on both backends."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from sync_project.cli import main
from sync_project.store import RoutedEvent, Store


@pytest.fixture
def cli(database_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("SYNC_DATABASE_URL", database_url)
    monkeypatch.delenv("SYNC_FORWARD_URL", raising=False)
    monkeypatch.delenv("SYNC_FORWARD_SECRET", raising=False)
    return CliRunner()


def queue(database_url: str, *keys: str) -> list[int]:
    with Store(database_url) as store:
        forwards = store.forwards()
        forwards.enqueue(start_at="beginning")
        store.inbox.receive(
            "acme",
            [
                RoutedEvent(event_key=k, event_type="t", payload={}, sync="acme/contacts", connection_id="north")
                for k in keys
            ],
        )
        forwards.enqueue(now=datetime.now(timezone.utc) - timedelta(days=30))
        return [f.id for f in forwards.list()]


def test_stats_replay_and_purge(cli: CliRunner, database_url: str) -> None:
    first, second, third = queue(database_url, "a", "b", "c")
    with Store(database_url) as store:
        forwards = store.forwards()
        forwards.mark_delivered(first)
        forwards.mark_failed(second, "HTTP 500", max_attempts=1)
    stats = cli.invoke(main, ["forwarder", "stats", "--json"])
    assert stats.exit_code == 0, stats.output
    figures = json.loads(stats.output)
    assert figures["counts"] == {"pending": 1, "delivered": 1, "dead": 1}
    assert figures["inbox_cursor"] > 0

    text = cli.invoke(main, ["forwarder", "stats"]).output
    assert "dead       1" in text and "oldest pending:" in text

    replay = cli.invoke(main, ["forwarder", "replay"])
    assert replay.output.strip() == "1 dead forward(s) became pending"
    purge = cli.invoke(main, ["forwarder", "purge", "--older-than-days", "7"])
    assert purge.output.strip() == "1 delivered forward(s) purged"
    with Store(database_url) as store:
        assert {f.id: f.status for f in store.forwards().list()} == {second: "pending", third: "pending"}


def test_run_without_a_configured_url_or_secret_says_what_to_set(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = cli.invoke(main, ["forwarder", "run"])
    assert result.exit_code == 2 and "SYNC_FORWARD_URL" in result.output
    monkeypatch.setenv("SYNC_FORWARD_URL", "http://127.0.0.1:9/hook")
    result = cli.invoke(main, ["forwarder", "run"])
    assert result.exit_code == 2 and "SYNC_FORWARD_SECRET" in result.output
