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
    assert [(d["provider"], d["status"], d["outcome"]) for d in deliveries] == [
        ("no-such-provider", 404, "unknown_provider")
    ]


def _storing_pids(log_path: Path) -> set[int]:
    """The processes that logged a delivery stored (202) in the receiver's JSON lines."""
    pids = set()
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("outcome") == "stored":
                pids.add(entry["pid"])
    return pids


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_receiver_workers_share_a_port_and_store_each_delivery_once(database_url: str, tmp_path: Path) -> None:
    """``--workers 2``: two processes behind one port, each with its own store; a delivery sent
    over and over on fresh connections (so it lands on either process) is stored once, and both
    processes store signed deliveries (their log lines name them)."""
    from concurrent.futures import ThreadPoolExecutor

    from sync_project.core import standard_webhooks
    from sync_project.store import Store
    from sync_project_tests.cli.test_dev import free_port

    secret = standard_webhooks.generate_secret()
    env = {**os.environ, "SYNC_DATABASE_URL": database_url, "SYNC_SANDBOX_WEBHOOK_SECRET": secret}
    port = free_port()
    stderr_path = tmp_path / "receiver.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "sync-project"), "receiver", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None and time.monotonic() < deadline, stderr_path.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert len(_children(process.pid)) >= 2, stderr_path.read_text()
        deliveries = []
        for n in range(5):
            body = json.dumps(
                {
                    "id": f"evt-{n}",
                    "type": "contact.updated",
                    "account_id": "acct-unknown",
                    "occurred_at": "2026-01-01T00:00:00Z",
                    "data": {"id": f"c{n}"},
                }
            ).encode()
            deliveries.append((f"msg-{n}", body))
        stored = duplicates = 0
        for _ in range(4):
            for msg_id, body in deliveries:
                # A fresh connection each time: the kernel hands it to either worker.
                with httpx.Client() as client:
                    answer = client.post(
                        f"{url}/webhooks/sandbox",
                        content=body,
                        headers=standard_webhooks.sign_headers(secret, msg_id, body),
                    )
                assert answer.status_code in (200, 202), answer.text
                stored, duplicates = stored + answer.json()["stored"], duplicates + answer.json()["duplicates"]
        assert (stored, duplicates) == (len(deliveries), 3 * len(deliveries))
        forged = httpx.post(
            f"{url}/webhooks/sandbox",
            content=deliveries[0][1],
            headers=standard_webhooks.sign_headers(standard_webhooks.generate_secret(), "msg-x", deliveries[0][1]),
        )
        assert forged.status_code == 401

        def send(n: int) -> int:
            body = json.dumps(
                {"id": f"spread-{n}", "type": "contact.updated", "account_id": "acct-unknown",
                 "occurred_at": "2026-01-01T00:00:00Z", "data": {"id": f"s{n}"}}
            ).encode()  # fmt: skip
            with httpx.Client() as client:  # a fresh connection: either worker accepts it
                headers = standard_webhooks.sign_headers(secret, f"spread-msg-{n}", body)
                return client.post(f"{url}/webhooks/sandbox", content=body, headers=headers).status_code

        # Concurrent connections until each worker has stored some (the kernel picks the acceptor).
        storing: set[int] = set()
        spread = 0
        with ThreadPoolExecutor(8) as pool:
            while len(storing) < 2 and spread < 480:
                assert set(pool.map(send, range(spread, spread + 16))) == {202}
                spread += 16
                storing = _storing_pids(stderr_path)
        deadline = time.monotonic() + 10
        while len(storing) < 2 and time.monotonic() < deadline:  # the last lines may still be on their way
            time.sleep(0.2)
            storing = _storing_pids(stderr_path)
        workers = set(_children(process.pid))
        assert len(storing) == 2 and storing <= workers, (storing, workers, spread)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    with Store(database_url) as store:
        stats = store.inbox.stats()
        assert sum(stats.counts.values()) == len(deliveries) + spread, stats
