"""The README's commands, run as it writes them, against the program they describe.

The shell blocks are read from README.md itself, so a command the README shows and the program
no longer takes (a port, an option, a job name) fails here. Two things are adapted, the way a
person adapts them when running beside other programs: the default addresses (127.0.0.1:8000,
:8765, :3000) become the free ports these tests serve on, and ``.venv/bin/`` the environment the
tests run in. Placeholders the README spells ``rec_...`` and ``NEXT=...`` get what ``make run``
printed and what the previous answer said.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from sync_project import settings
from sync_project.orchestration.partitions import partitions_name
from sync_project.sandbox.ratelimit import RateLimitSettings
from sync_project.sandbox.server import SandboxServer
from sync_project.sandbox.service import AccountSpec, SandboxConfig
from sync_project.store import Store
from sync_project_tests.cli.dev_support import Dev, DevPorts

ROOT = settings.project_root()
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent


def section(heading: str) -> str:
    """The README text under ``heading`` up to the next heading of the same or a higher level
    (lines of fenced code are never headings: a shell comment starts with "# " too)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = README.splitlines()
    start = lines.index(heading)
    fenced = False
    for end in range(start + 1, len(lines)):
        line = lines[end]
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            return "\n".join(lines[start:end]) + "\n"
    return "\n".join(lines[start:]) + "\n"


def shell_blocks(text: str) -> list[list[str]]:
    """Each ```bash block as its commands: continuation lines joined, comment lines dropped."""
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        commands, current = [], ""
        for line in body.splitlines():
            current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                if current.strip() and not current.lstrip().startswith("#"):
                    commands.append(current.strip())
                current = ""
        blocks.append(commands)
    return blocks


def here(command: str, ports: dict[int, int]) -> str:
    for default, port in ports.items():
        command = command.replace(f"127.0.0.1:{default}", f"127.0.0.1:{port}")
    return command.replace(".venv/bin/", f"{BIN}/")


def run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["bash", "-c", command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_declared_sync_is_the_sandbox_sync_as_it_is() -> None:
    """ "Declaring a sync" shows sync_project/syncs/sandbox_contacts.py: every line of it."""
    [example] = re.findall(r"```python\n(.*?)```", section("## Declaring a sync"), re.DOTALL)
    source = (ROOT / "sync_project" / "syncs" / "sandbox_contacts.py").read_text()
    lines = [line for line in example.splitlines() if line.strip()]
    assert len(lines) > 20
    for line in lines:
        assert f"\n{line}\n" in source, line
    from sync_project.syncs.sandbox_contacts import contacts

    assert contacts.cron == "*/5 * * * *" and "`*/5 * * * *` here" in section("## Declaring a sync")


@pytest.fixture
def isolated(tmp_path: Path) -> Iterator[tuple[dict[str, str], dict[int, int], SandboxServer]]:
    """A shell of its own: a records store, a Dagster home, and a sandbox with account acct-1."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(settings.INSTANCE_TEMPLATE.read_text())
    config = SandboxConfig(
        accounts=[
            AccountSpec(account_id="acct-1", token="token-of-acct-1", contacts=7, deals=2),
            AccountSpec(account_id="acct-2", token="token-of-acct-2", contacts=3),
        ],
        rate_limit=RateLimitSettings(enabled=False),
    )
    with SandboxServer(config) as sandbox:
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "SYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'sync.db'}",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "ACME_TOKEN": "token-of-acct-1",
        }
        yield env, {8765: int(sandbox.base_url.rsplit(":", 1)[1])}, sandbox


def test_the_connections_and_command_line_sections_run_as_written(
    isolated: tuple[dict[str, str], dict[int, int], SandboxServer],
) -> None:
    env, ports, sandbox = isolated
    [connections, credentials] = shell_blocks(section("### Connections"))
    [command_line] = shell_blocks(section("### From the command line"))
    assert [c.split()[2] for c in connections] == [
        "add",
        "list",
        "set",
        "set",
        "pause",
        "resume",
        "status",
        "status",
        "remove",
    ]
    *before_remove, remove = connections

    for command in before_remove:
        done = run(here(command, ports), env)
    assert "sandbox/contacts  acme" in run(here(before_remove[6], ports), env).stdout
    assert "account acct-1" in done.stdout and "poll_sandbox__contacts" in done.stdout  # the full view

    # "From the command line" needs a second connection for its backfill over acme,globex.
    with Store(env["SYNC_DATABASE_URL"]) as store:
        store.connections.add("sandbox", "globex", account_id="acct-2", credentials_env="ACME_TOKEN")
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        instance.add_dynamic_partitions(partitions_name("sandbox"), ["globex"])
    full, incremental, backfill = command_line
    run(here(full, ports), env)
    with Store(env["SYNC_DATABASE_URL"]) as store:
        assert store.count("sandbox/contacts", "acme") == 7
        assert store.state.get("sandbox/contacts", "acme").last_mode == "full"  # type: ignore[union-attr]
    sandbox.sandbox.state.apply_random(5, account_ids=["acct-1"])
    run(here(incremental, ports), env)
    with Store(env["SYNC_DATABASE_URL"]) as store:
        assert store.state.get("sandbox/contacts", "acme").last_mode == "incremental"  # type: ignore[union-attr]
        truth = sandbox.sandbox.state.truth("acct-1")["contacts"]
        assert store.count("sandbox/contacts", "acme") == len(truth)
    run(here(backfill, ports), env)
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        [submitted] = instance.get_backfills()
        assert sorted(submitted.partition_names or []) == ["acme", "globex"]

    run(here(remove, ports), env)
    listed = run("sync-project connections list --json", env)
    assert [c["connection_id"] for c in json.loads(listed.stdout)] == ["globex"]

    # The credentials block: a key as the README makes one, a secret sealed into the store.
    export, add_stored, switch = credentials
    key = run(here(export, ports) + '; printf %s "$SYNC_CREDENTIALS_KEY"', env).stdout
    keyed = {**env, "SYNC_CREDENTIALS_KEY": key}
    added = run(here(add_stored, ports), keyed)
    assert env["ACME_TOKEN"] not in added.stdout + added.stderr
    with Store(env["SYNC_DATABASE_URL"]) as store:
        stored = store.connections.get("sandbox", "acme2")
        assert stored.credentials_kind == "stored" and stored.credentials_sealed is not None
    with pytest.MonkeyPatch.context() as patch:  # what a run with the deployment's key resolves
        patch.setenv("SYNC_CREDENTIALS_KEY", key)
        assert stored.credentials() == env["ACME_TOKEN"]
    run(here(switch, ports), keyed)
    with Store(env["SYNC_DATABASE_URL"]) as store:
        switched = store.connections.get("sandbox", "acme2")
        assert (switched.credentials_kind, switched.credentials_secret) == ("secret", "acme-token")


def test_the_demo_commands_and_the_records_api_run_as_written(tmp_path: Path) -> None:
    ports = DevPorts()
    dev = Dev(tmp_path, ports, change_rate=4)
    try:
        dev.wait_for_banner()
        token = dev.printed(r"records API .* token (rec_\S+)")
        # The banner's own suggestions, as printed.
        suggested = [line.strip() for line in dev.output.splitlines() if line.strip().startswith("curl ")]
        assert len(suggested) == 2
        env = {**dev.env, "SYNC_DATABASE_URL": dev.store_url}
        with Store(dev.store_url) as store:
            deadline = time.monotonic() + 180
            while not store.count("sandbox/contacts", "demo-1"):  # a webhook created one
                assert time.monotonic() < deadline, store.inbox.stats()
                time.sleep(1)
        for command in suggested:
            assert json.loads(run(command, env).stdout), command

        [demo] = shell_blocks(section("## The demo: `make run`"))
        mapping = {8000: ports.receiver, 8765: ports.sandbox, 3000: ports.ui}
        export, *commands = demo
        assert export.startswith("export SYNC_RECORDS_API_TOKEN=rec_...")
        env["SYNC_RECORDS_API_TOKEN"] = token
        # Keyed by the command without its comment and its program: "connections status", ...
        outputs = {
            " ".join(shlex.split(command, comments=True)[1 : 3 if command.startswith("curl") else None]): run(
                here(command, mapping), env
            ).stdout
            for command in commands
        }
        page = json.loads(next(out for key, out in outputs.items() if key.startswith("-H")))
        assert page["records"] and {"id", "data", "last_action"} <= set(page["records"][0])
        status = outputs["connections status"]
        assert status.splitlines()[0].startswith("SYNC") and "sandbox/contacts  demo-1" in status
        assert "sandbox/demo-1: active" in outputs["connections status sandbox demo-1"]
        assert "pending" in outputs["inbox stats"]
        by_connection = outputs["inbox stats --by-connection"]
        assert "demo-1" in by_connection and "demo-2" in by_connection
        assert "became pending" in outputs["inbox replay --status dead"]
        assert "sandbox    demo-1" in outputs["connections list"]

        [api, _scoped] = shell_blocks(section("### Records API"))
        assert api[0].startswith("export SYNC_RECORDS_API_TOKEN=rec_...")
        first, next_line, second = api[1:]
        answer = json.loads(run(here(first, mapping), env).stdout)
        assert next_line.startswith("NEXT=...")
        env["NEXT"] = answer["next_cursor"]
        later = json.loads(run(here(second, mapping), env).stdout)
        assert set(later) == {"records", "next_cursor", "has_more"}
        assert all(r["last_action"] in ("added", "updated") for r in later["records"])
        # Without the token the documented call is refused, as the README says.
        wrong = here(first, mapping).replace("$SYNC_RECORDS_API_TOKEN", "wrong")
        assert run(f"{wrong} -s -o /dev/null -w '%{{http_code}}'", env).stdout == "401"
    finally:
        stopped = dev.stop()
    assert dev.process.returncode == 0, stopped
