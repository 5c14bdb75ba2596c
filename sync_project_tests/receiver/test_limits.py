"""The receiver process's limits, as an unauthenticated client meets them: a body deadline and a
cap on connections. Found by the fuzz campaign: connections that sent headers and part of a body
were held for ever (none of 2,000 closed after 90 s), so a client could exhaust file descriptors.
"""

from __future__ import annotations

import selectors
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from sync_project.store import Store
from sync_project_tests.receiver.running import receiver_process, sandbox_delivery

HALF_SENT = 500
BODY_TIMEOUT_S = 2.0
#: The deadline the test holds the receiver to: its body timeout, plus time to answer 500 of them
#: on a loaded 2-core machine.
CLOSED_WITHIN_S = BODY_TIMEOUT_S + 8.0


def half_sent_request(host: str, port: int, path: str = "/webhooks/sandbox") -> socket.socket:
    """A connection that sent its headers and 100 of the 1,000 body bytes it announced, then stalls."""
    sock = socket.create_connection((host, port), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    sock.sendall(head + b"{" + b" " * 99)
    sock.setblocking(False)
    return sock


def wait_until_closed(sockets: list[socket.socket], deadline: float) -> dict[socket.socket, bytes]:
    """What each socket received until the server closed it (or the deadline passed)."""
    received = {sock: b"" for sock in sockets}
    still_open = set(sockets)
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        while still_open and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[sock] += chunk
                else:
                    selector.unregister(sock)
                    still_open.discard(sock)
    assert not still_open, f"{len(still_open)} of {len(sockets)} half-sent connections still open"
    return received


def test_500_half_sent_requests_are_all_closed_by_the_deadline_and_deliveries_go_on(
    database_url: str, tmp_path: Path
) -> None:
    with Store(database_url) as store:
        store.connections.add("sandbox", "acme", account_id="acct-1")
    with receiver_process(database_url, tmp_path, "--body-timeout", str(BODY_TIMEOUT_S)) as receiver:
        sockets: list[socket.socket] = []
        try:
            started = time.monotonic()
            for _ in range(HALF_SENT):
                sockets.append(half_sent_request(receiver.host, receiver.port))
            # Normal deliveries while all 500 are held: each is answered, and stored.
            with httpx.Client(timeout=10) as client:
                for index in range(20):
                    body, headers = sandbox_delivery(f"evt-{index}")
                    response = client.post(f"{receiver.url}/webhooks/sandbox", content=body, headers=headers)
                    assert response.status_code == 202, response.text
            received = wait_until_closed(sockets, started + CLOSED_WITHIN_S)
        finally:
            for sock in sockets:
                sock.close()
        answers = {data.split(b"\r\n", 1)[0] for data in received.values()}
        assert answers == {b"HTTP/1.1 408 Request Timeout"}

        def outcomes(lines: list[dict[str, Any]]) -> list[Any]:
            return [line.get("outcome") for line in lines if line.get("logger") == "sync_project.receiver"]

        logged = outcomes(receiver.log_lines_when(lambda lines: outcomes(lines).count("body_timeout") >= HALF_SENT))
        assert logged.count("body_timeout") == HALF_SENT
        assert logged.count("stored") == 20
    with Store(database_url) as store:
        assert sorted(e.event_key for e in store.inbox.events()) == sorted(f"evt-{i}" for i in range(20))


def test_connections_past_the_cap_are_answered_503_and_the_cap_frees_as_they_close(
    database_url: str, tmp_path: Path
) -> None:
    with Store(database_url) as store:
        store.connections.add("sandbox", "acme", account_id="acct-1")
    with receiver_process(
        database_url, tmp_path, "--body-timeout", str(BODY_TIMEOUT_S), "--max-connections", "20"
    ) as receiver:
        sockets = [half_sent_request(receiver.host, receiver.port) for _ in range(20)]
        try:
            body, headers = sandbox_delivery("evt-over-the-cap")
            refused = httpx.post(f"{receiver.url}/webhooks/sandbox", content=body, headers=headers, timeout=10)
            assert refused.status_code == 503
            wait_until_closed(sockets, time.monotonic() + CLOSED_WITHIN_S)
        finally:
            for sock in sockets:
                sock.close()
        # The provider's retry, once the held connections were closed by the deadline.
        retried = httpx.post(f"{receiver.url}/webhooks/sandbox", content=body, headers=headers, timeout=10)
        assert retried.status_code == 202
    with Store(database_url) as store:
        assert [e.event_key for e in store.inbox.events()] == ["evt-over-the-cap"]
