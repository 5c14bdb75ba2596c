"""``sync-project dev`` as a child process of a test: started on free ports with its own data
folder and Dagster home, read until its banner, stopped with Ctrl-C (SIGINT) and waited for."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from sync_project.sandbox.client import SandboxAdmin
from sync_project.store import Store
from sync_project_tests.cli.test_dev import free_port
from sync_project_tests.support.realtime import sandbox_syncs, stored_state

ACCOUNTS = {"demo-1": "acct-1", "demo-2": "acct-2"}
BANNER_END = "Ctrl-C stops everything"


@dataclass
class DevPorts:
    ui: int = field(default_factory=free_port)
    receiver: int = field(default_factory=free_port)
    sandbox: int = field(default_factory=free_port)

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox}"


class Dev:
    """One ``sync-project dev`` process; its output is collected on a thread until it exits."""

    def __init__(
        self, tmp_path: Path, ports: DevPorts, *, change_rate: float = 4.0, env: dict[str, str] | None = None
    ) -> None:
        self.data = tmp_path / "data"
        self.home = tmp_path / "dagster_home"
        self.ports = ports
        self.env = {**os.environ, "SYNC_DATA_DIR": str(self.data), "DAGSTER_HOME": str(self.home), **(env or {})}
        for name in ("SYNC_DATABASE_URL", "SYNC_RECORDS_API_TOKEN", "SYNC_SANDBOX_ADMIN_TOKEN"):
            if env is None or name not in env:
                self.env.pop(name, None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sync_project.cli",
                "dev",
                "--ui-port",
                str(ports.ui),
                "--receiver-port",
                str(ports.receiver),
                "--sandbox-port",
                str(ports.sandbox),
                "--change-rate",
                str(change_rate),
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.data / 'sync.db'}"

    def wait_for_banner(self, timeout_s: float = 240) -> str:
        deadline = time.monotonic() + timeout_s
        while BANNER_END not in self.output:
            assert self.process.poll() is None, self.output
            assert time.monotonic() < deadline, self.output
            time.sleep(0.2)
        return self.output

    def printed(self, pattern: str) -> str:
        found = re.search(pattern, self.output)
        assert found is not None, f"{pattern!r} not in:\n{self.output}"
        return found.group(1)

    def admin(self) -> SandboxAdmin:
        return SandboxAdmin(self.ports.sandbox_url, self.printed(r"sandbox admin .* token (adm_\S+)"))

    def stop(self, timeout_s: float = 120) -> str:
        """Ctrl-C, as a person stops it; kills the group only if it did not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise
        finally:
            self._reader.join(10)
        return self.output


def wait_until_applied(store: Store, events: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while store.inbox.stats().counts["done"] < events:
        assert time.monotonic() < deadline, f"fewer than {events} webhook events applied: {store.inbox.stats()}"
        time.sleep(1)


def wait_until_drained(store: Store, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while store.inbox.stats().counts["pending"]:
        assert time.monotonic() < deadline, store.inbox.stats()
        time.sleep(1)


def differences(
    store: Store, admin: SandboxAdmin, *, kinds: Collection[str] | None = None, connections: Collection[str] = ACCOUNTS
) -> list[str]:
    """What the store and the sandbox disagree on, per (sync, connection): empty when they agree.

    ``kinds`` (sandbox object names, e.g. "contacts") and ``connections`` narrow the comparison to
    the partitions a test has synced in full; by default every sandbox sync and demo connection."""
    found = []
    for sync in sandbox_syncs():
        kind = sync.name
        if kinds is not None and kind not in kinds:
            continue
        for connection_id in connections:
            truth = admin.truth(ACCOUNTS[connection_id])
            live, deleted = stored_state(store, sync.key, connection_id)
            expected = {o["id"]: sync.model.model_validate(o).model_dump(mode="json") for o in truth[kind]}
            for key in sorted(set(live) | set(expected)):
                if live.get(key) != expected.get(key):
                    found.append(f"{sync.key} {connection_id} {key}: store {live.get(key)} sandbox {expected.get(key)}")
            found += [
                f"{sync.key} {connection_id} {key}: deleted at the sandbox, not in the store"
                for key in sorted(set(truth["deleted"][kind]) - deleted)
            ]
    return found
