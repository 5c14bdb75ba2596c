"""The sandbox on disk: a restarted sandbox is the same provider, with the same accounts and records.

Before, the sandbox lived in memory only, so after ``make run`` restarted, the records store (kept
under ``data/``) held a previous sandbox's records while the new one reissued the same ids with
other content.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from sync_project.sandbox import SandboxAdmin
from sync_project.sandbox.data import ChangeEvent, MonotonicClock, SandboxError, SandboxState, parse_timestamp
from sync_project.sandbox.persistence import SandboxJournal

CLI = [sys.executable, "-c", "from sync_project.cli import main; main()", "sandbox"]


def open_state(path: Path, **options: object) -> tuple[SandboxState, SandboxJournal]:
    journal = SandboxJournal(path)
    return SandboxState(journal=journal, **options), journal  # type: ignore[arg-type]


def test_accounts_records_deletes_and_ids_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.db"
    state, journal = open_state(path, seed=3)
    state.create_account("acct-1", "token-of-acct-1", contacts=5, deals=2)
    state.create_account("acct-2", "token-of-acct-2", contacts=1)
    state.apply_random(40)
    deleted = state.delete("acct-1", "contacts", state.truth("acct-1")["contacts"][0]["id"])
    before = {a: state.truth(a) for a in state.account_ids()}
    issued = state.create("acct-1", "deals").data["id"]
    before["acct-1"] = state.truth("acct-1")
    journal.close()

    restarted, journal = open_state(path, seed=3)
    try:
        assert {a: restarted.truth(a) for a in restarted.account_ids()} == before
        assert deleted.data["id"] in restarted.truth("acct-1")["deleted"]["contacts"]
        # Ids are never reissued: the next deal follows the last one issued before the restart.
        following = restarted.create("acct-1", "deals").data["id"]
        assert int(following.removeprefix("deal_")) == int(issued.removeprefix("deal_")) + 1
        # The token still opens its account (its digest was kept), and only its own.
        assert restarted.account_for_token("token-of-acct-1") == "acct-1"
        assert restarted.account_for_token("token-of-acct-X") is None
    finally:
        journal.close()


def test_the_file_holds_no_token(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.db"
    state, journal = open_state(path)
    state.create_account("acct-1", "sbx_very-secret-token", contacts=1)
    state.set_token("acct-1", "sbx_another-secret-token")
    journal.close()
    raw = path.read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("sandbox.db-*"))
    assert b"very-secret" not in raw and b"another-secret" not in raw


def test_a_new_token_replaces_the_old_one_and_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.db"
    state, journal = open_state(path)
    state.create_account("acct-1", "token-of-acct-1")
    state.create_account("acct-2", "token-of-acct-2")
    with pytest.raises(SandboxError, match="already in use"):
        state.set_token("acct-1", "token-of-acct-2")
    generated = state.set_token("acct-1")
    assert generated.startswith("sbx_")
    assert state.account_for_token("token-of-acct-1") is None
    journal.close()
    restarted, journal = open_state(path)
    try:
        assert restarted.account_for_token(generated) == "acct-1"
        assert restarted.account_for_token("token-of-acct-1") is None
    finally:
        journal.close()


def test_timestamps_keep_increasing_across_a_restart_when_the_wall_clock_stepped_back(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.db"
    state, journal = open_state(path)
    state.create_account("acct-1", "token-of-acct-1")
    last = state.create("acct-1", "contacts").data["updated_at"]
    journal.close()
    behind = datetime.now(timezone.utc) - timedelta(days=1)
    restarted, journal = open_state(path, clock=MonotonicClock(lambda: behind))
    try:
        after = restarted.create("acct-1", "contacts").data["updated_at"]
        assert parse_timestamp(after) > parse_timestamp(last)
    finally:
        journal.close()


def test_a_webhook_is_queued_only_after_its_change_is_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "sandbox.db"
    on_disk: list[bool] = []

    def announce(event: ChangeEvent) -> None:
        with sqlite3.connect(path) as reader:  # another connection sees only what was committed
            row = reader.execute("SELECT deleted FROM objects WHERE object_id = ?", (event.data["id"],)).fetchone()
        # A later change of the same call may have superseded a create or update; a delete is final.
        on_disk.append(row is not None and (bool(row[0]) or not event.type.endswith(".deleted")))

    state, journal = open_state(path, on_change=announce)
    try:
        state.create_account("acct-1", "token-of-acct-1", contacts=3)
        state.apply_random(30)
        assert len(on_disk) == 30 and all(on_disk)
    finally:
        journal.close()


def serve(data: Path, env_token: str = "admin-token-for-tests") -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            *CLI,
            "--port",
            "0",
            "--accounts",
            "1",
            "--contacts",
            "6",
            "--rate-limit",
            "0",
            "--log-level",
            "warning",
            "--data",
            str(data),
            "--admin-token",
            env_token,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    banner = []
    assert process.stdout is not None
    for line in process.stdout:
        banner.append(line)
        if line.startswith("Ctrl-C"):
            break
    return process, "".join(banner)


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_the_command_keeps_its_data_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "sandbox.db"
    process, banner = serve(data)
    try:
        assert f"data: {data} (new)" in banner
        base_url = re.search(r"listening on (http://\S+)", banner).group(1)  # type: ignore[union-attr]
        first_token = re.search(r"account acct-1: API token (\S+)", banner).group(1)  # type: ignore[union-attr]
        with SandboxAdmin(base_url, "admin-token-for-tests") as admin:
            admin.apply_changes(20, account_id="acct-1")
            truth = admin.truth("acct-1")
    finally:
        stop(process)

    process, banner = serve(data)
    try:
        assert f"data: {data}, kept from the last run: acct-1" in banner
        base_url = re.search(r"listening on (http://\S+)", banner).group(1)  # type: ignore[union-attr]
        token = re.search(r"account acct-1: API token (\S+)", banner).group(1)  # type: ignore[union-attr]
        with SandboxAdmin(base_url, "admin-token-for-tests") as admin:
            assert admin.truth("acct-1") == truth  # not 6 new contacts
            assert admin.accounts() == {"acct-1": {"contacts": len(truth["contacts"]), "deals": len(truth["deals"])}}
            chosen = admin.set_token("acct-1", "token-chosen-by-admin")
        with httpx.Client(base_url=base_url) as api:
            assert api.get("/v1/account", headers={"authorization": f"Bearer {first_token}"}).status_code == 401
            assert api.get("/v1/account", headers={"authorization": f"Bearer {token}"}).status_code == 401
            listed = api.get("/v1/contacts", headers={"authorization": f"Bearer {chosen}"}, params={"limit": 100})
            assert listed.json()["results"] == sorted(truth["contacts"], key=lambda c: (c["updated_at"], c["id"]))
    finally:
        stop(process)
