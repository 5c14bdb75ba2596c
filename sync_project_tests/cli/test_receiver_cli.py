"""``sync-project receiver`` as an operator starts it: a process serving on a port, logging JSON."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def test_the_receiver_command_serves_and_logs_json_lines(database_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "SYNC_DATABASE_URL": database_url}
    stderr_path = tmp_path / "receiver.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "sync-project"), "receiver", "--port", "0", "--max-body-bytes", "100"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", stderr_path.read_text())
            url = found.group(1) if found else None
            time.sleep(0.05)
        assert url, stderr_path.read_text()
        assert httpx.get(f"{url}/healthz").json() == {"database": "ok"}
        assert httpx.post(f"{url}/webhooks/no-such-provider", content=b"{}").status_code == 404
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    lines = [json.loads(line) for line in stderr_path.read_text().splitlines() if line.strip()]
    deliveries = [line for line in lines if line["logger"] == "sync_project.receiver" and "status" in line]
    assert [(d["provider"], d["status"], d["outcome"]) for d in deliveries] == [("no-such-provider", 404, "unknown_provider")]
