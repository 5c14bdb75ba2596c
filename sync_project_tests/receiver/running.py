"""``sync-project receiver`` started as an operator starts it, for tests of its limits and of what
it answers a hostile client: a real process, with uvicorn configured by the CLI, on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sync_project.core import standard_webhooks

SANDBOX_SECRET = "whsec_" + "aGFyZGVuaW5nLXRlc3Qtc2VjcmV0"  # base64 of "hardening-test-secret"
RECORDS_TOKEN = "records-token-for-tests-7c1e"


@dataclass
class RunningReceiver:
    url: str
    host: str
    port: int
    pid: int
    log_path: Path

    def rss_kib(self) -> int:
        """The process's resident memory (``VmRSS``), as the kernel counts it."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines written so far (a line still being written is left for the next read)."""
        complete = self.log_path.read_text().split("\n")[:-1]
        return [json.loads(line) for line in complete if line.startswith("{")]

    def log_lines_when(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 15.0
    ) -> list[dict[str, Any]]:
        """The log's lines once ``done`` holds of them, or at the deadline, whichever comes first.

        A line reaches the file after its answer: the log writer is a thread of its own, which on a
        loaded machine waits for the GIL while the event loop answers a burst."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = self.log_lines()
            if done(lines) or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


@contextlib.contextmanager
def receiver_process(
    database_url: str, tmp_path: Path, *options: str, env: dict[str, str] | None = None
) -> Iterator[RunningReceiver]:
    """The receiver CLI on a free port, stopped with SIGINT (and killed if it does not stop)."""
    environ = {
        **os.environ,
        "SYNC_DATABASE_URL": database_url,
        "SYNC_SANDBOX_WEBHOOK_SECRET": SANDBOX_SECRET,
        "SYNC_RECORDS_API_TOKEN": RECORDS_TOKEN,
        **(env or {}),
    }
    log_path = tmp_path / f"receiver-{time.monotonic_ns()}.log"
    command = [str(Path(sys.executable).parent / "sync-project"), "receiver", "--port", "0", *options]
    with log_path.open("w") as stderr:
        process = subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:(\d+))", log_path.read_text())
            url = found.group(1) if found else None
            time.sleep(0.05)
        assert url, log_path.read_text()[-3000:]
        port = int(url.rsplit(":", 1)[1])
        yield RunningReceiver(url, "127.0.0.1", port, process.pid, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def sandbox_delivery(
    event_id: str, *, account_id: str = "acct-1", secret: str = SANDBOX_SECRET
) -> tuple[bytes, dict[str, str]]:
    """A signed ``contact.updated`` delivery of the sandbox provider, as the sandbox sends it."""
    now = datetime.now(timezone.utc).isoformat()
    body = json.dumps(
        {
            "id": event_id,
            "type": "contact.updated",
            "account_id": account_id,
            "occurred_at": now,
            "data": {
                "id": f"con_{event_id}",
                "email": "ada@example.com",
                "first_name": "Ada",
                "last_name": "Lovelace",
                "updated_at": now,
                "created_at": now,
            },
        }
    ).encode()
    headers = standard_webhooks.sign_headers(secret, event_id, body)
    headers["content-type"] = "application/json"
    return body, headers
