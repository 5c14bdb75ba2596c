"""``sync-project sandbox`` as a real process: serves, delivers, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from sync_project.providers.sandbox import PROVIDER
from sync_project.sandbox import SandboxAdmin
from sync_project_tests.sandbox.support import Receiver, receiver  # noqa: F401

CLI = [sys.executable, "-c", "from sync_project.cli import main; main()", "sandbox"]
SECRET = "whsec_c2FuZGJveC1zZWNyZXQtZm9yLXRlc3Rz"


@pytest.fixture
def sandbox_process(receiver: Receiver) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    env = {**os.environ, "SYNC_SANDBOX_WEBHOOK_SECRET": SECRET, "SYNC_SANDBOX_ADMIN_TOKEN": "admin-token-for-tests"}
    process = subprocess.Popen(
        [
            *CLI,
            "--port",
            "0",
            "--accounts",
            "2",
            "--contacts",
            "4",
            "--deals",
            "3",
            "--webhook-url",
            receiver.url,
            "--rate-limit",
            "0",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    banner: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        banner.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C"):
            break
    yield process, banner
    if process.poll() is None:
        process.kill()
        process.wait(10)


def test_the_command_serves_the_sandbox_and_stops_on_ctrl_c(
    sandbox_process: tuple[subprocess.Popen[str], list[str]], receiver: Receiver
) -> None:
    process, banner = sandbox_process
    text = "\n".join(banner)
    base_url = re.search(r"sandbox listening on (http://\S+)", text).group(1)  # type: ignore[union-attr]
    tokens = dict(re.findall(r"account (acct-\d): API token (\S+)", text))
    assert sorted(tokens) == ["acct-1", "acct-2"]
    # Credentials that were passed in are not echoed.
    assert SECRET not in text and "admin-token-for-tests" not in text
    assert "webhook secret: (from --secret/SYNC_SANDBOX_WEBHOOK_SECRET)" in text

    with httpx.Client(base_url=base_url, headers={"authorization": f"Bearer {tokens['acct-2']}"}) as api:
        assert api.get("/v1/account").json() == {"account_id": "acct-2"}
        assert len(api.get("/v1/contacts").json()["results"]) == 4
        assert len(api.get("/v1/deals").json()["results"]) == 3
    with SandboxAdmin(base_url, "admin-token-for-tests") as admin:
        events = admin.apply_changes(3, account_id="acct-1")
        assert admin.flush().sent == 3
    assert receiver.ids() == [e["id"] for e in events]
    PROVIDER.verify(receiver.received[0].as_request(), [SECRET])

    process.send_signal(signal.SIGINT)
    assert process.wait(15) == 0
    assert process.stdout is not None
    assert "sandbox stopped" in process.stdout.read()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--secret", "whsec_not base64!"], 1, "webhook secret is not whsec_ followed by base64"),
        (["--mix", "1:2"], 2, "'1:2': expected three numbers, as create:update:delete"),
        (["--mix", "0:0:0"], 2, "at least one of create, update, delete must have a positive weight"),
        (["--drop-pct", "120"], 2, "120.0 is not in the range 0<=x<=100"),
    ],
    ids=["secret", "mix-arity", "mix-zero", "drop-range"],
)
def test_bad_options_are_refused_before_serving(args: list[str], code: int, message: str) -> None:
    result = subprocess.run([*CLI, "--port", "0", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == code
    assert message in result.stderr
