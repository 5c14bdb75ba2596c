"""``sync-project leases list``: what an operator reads to see who holds a partition."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from sync_project.cli import main
from sync_project.store import Store


@pytest.fixture
def cli(database_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("SYNC_DATABASE_URL", database_url)
    return CliRunner()


def test_lists_holders_tokens_and_expiry(cli: CliRunner, database_url: str) -> None:
    assert "no leases yet" in cli.invoke(main, ["leases", "list"]).output
    with Store(database_url) as store:
        store.leases.acquire("sandbox/contacts", "acme", "poll", "run-poll-1", ttl_s=60)
        drain = store.leases.acquire("sandbox/contacts", "acme", "drain", "run-drain-1", ttl_s=60)
        store.leases.release(drain)
        store.leases.acquire("sandbox/deals", "acme", "poll", "run-deals", ttl_s=60)

    result = cli.invoke(main, ["leases", "list", "--sync", "sandbox/contacts"])
    assert result.exit_code == 0, result.output
    header, *rows = [line.split() for line in result.output.splitlines()]
    assert header == ["SYNC", "CONNECTION", "ROLE", "HOLDER", "TOKEN", "EXPIRES"]
    assert rows[0][:5] == ["sandbox/contacts", "acme", "drain", "(free)", "1"]
    assert rows[1][:5] == ["sandbox/contacts", "acme", "poll", "run-poll-1", "1"] and rows[1][5] == "in"
    assert len(rows) == 2  # the deals lease is another sync's
