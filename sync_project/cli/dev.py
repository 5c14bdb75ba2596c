"""``sync-project dev`` (what ``make run`` runs): the whole project on one machine, no services.

It starts the sandbox CRM, the webhook receiver and ``dagster dev`` (webserver + daemon) on the
embedded default (SQLite under the project), registers two demo connections, turns the sandbox's
change generator on and prints where to look. Ctrl-C stops every process it started: each runs in
a process group of its own, gets SIGINT (``dagster dev`` needs it to stop its webserver, daemon and
code servers) and whatever is left of a group afterwards is killed.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import httpx
import yaml

from sync_project import settings
from sync_project.cli.connections import dagster_instance
from sync_project.orchestration.partitions import partitions_name
from sync_project.providers.standard_webhooks import generate_secret
from sync_project.sandbox.client import SandboxAdmin
from sync_project.store import Store

DEMO_ACCOUNTS = {"demo-1": "acct-1", "demo-2": "acct-2"}
SHUTDOWN_GRACE_S = 30.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Supervisor:
    """Starts children in their own process groups and stops all of them, whatever happens."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("ab")
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            if child.process.poll() is not None:
                raise click.ClickException(
                    f"{child.name} exited with code {child.process.returncode}; see {child.log_path}"
                )

    def stop_all(self) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                _signal_group(child.process.pid, signal.SIGINT)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                click.echo(f"{child.name} did not stop within {SHUTDOWN_GRACE_S:.0f} s; killing it", err=True)
            # Grandchildren (dagster's webserver, daemon, code servers) share the group.
            _signal_group(child.process.pid, signal.SIGKILL)
            child.process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def wait_until(ready: Callable[[], bool], what: str, supervisor: Supervisor, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        supervisor.check_alive()
        if time.monotonic() > deadline:
            raise click.ClickException(f"{what} was not ready within {timeout_s:.0f} s")
        time.sleep(0.5)


def http_ok(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


def missing_run_monitoring(home: Path) -> str | None:
    """A warning when the instance config lacks run monitoring.

    ``DAGSTER_HOME/dagster.yaml`` is copied from the project's once and never overwritten, so a
    home made before run monitoring was configured keeps runs whose worker died STARTED forever.
    """
    config_path = home / "dagster.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    if (config.get("run_monitoring") or {}).get("enabled"):
        return None
    return (
        f"warning: {config_path} does not enable run_monitoring, so a run whose worker died stays STARTED "
        f"and holds its partition; copy the project's: cp {settings.INSTANCE_TEMPLATE} {config_path}"
    )


def register_demo_connections(sandbox_url: str, token_envs: dict[str, str]) -> None:
    with Store() as store:
        existing = {c.connection_id for c in store.connections.list("sandbox")}
        for connection_id, account_id in DEMO_ACCOUNTS.items():
            if connection_id in existing:
                # The sandbox is new on every start (its data lives in memory): follow its URL.
                store.connections.remove("sandbox", connection_id)
            store.connections.add(
                "sandbox", connection_id, account_id=account_id,
                credentials_env=token_envs[connection_id], config={"base_url": sandbox_url},
            )
    dagster_instance().add_dynamic_partitions(partitions_name("sandbox"), list(DEMO_ACCOUNTS))


@click.command("dev")
@click.option("--ui-port", default=3000, show_default=True, type=int, help="The Dagster UI.")
@click.option("--receiver-port", default=8000, show_default=True, type=int)
@click.option("--sandbox-port", default=8765, show_default=True, type=int)
@click.option("--change-rate", default=0.5, show_default=True, type=click.FloatRange(0, 1000),
              help="Sandbox changes per second; 0 leaves the change generator off.")
def command(ui_port: int, receiver_port: int, sandbox_port: int, change_rate: float) -> None:
    """Run the sandbox, the receiver and the Dagster UI on the embedded default until Ctrl-C."""
    home = settings.dagster_home()
    data = settings.data_dir()
    log_dir = data / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    receiver_url = f"http://127.0.0.1:{receiver_port}"
    ui_url = f"http://127.0.0.1:{ui_port}"

    # Secrets live in this process tree's environment only: nothing is written to disk.
    token_envs = {cid: f"SYNC_DEMO_{cid.upper().replace('-', '_')}_TOKEN" for cid in DEMO_ACCOUNTS}
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "SYNC_DATABASE_URL": settings.database_url(),
        "SYNC_SANDBOX_WEBHOOK_SECRET": os.environ.get("SYNC_SANDBOX_WEBHOOK_SECRET") or generate_secret(),
        "SYNC_SANDBOX_ADMIN_TOKEN": os.environ.get("SYNC_SANDBOX_ADMIN_TOKEN") or "adm_" + secrets.token_urlsafe(24),
        # Set beforehand, they are kept: a shell that also runs `dagster asset materialize` needs them.
        **{name: os.environ.get(name) or "tok_" + secrets.token_urlsafe(18) for name in token_envs.values()},
    }
    os.environ.update(env)  # the connection registration below runs in this process
    cli = [sys.executable, "-m", "sync_project.cli"]
    supervisor = Supervisor(log_dir)

    def request_stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Installed explicitly: a shell starting us in the background would leave SIGINT ignored.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        click.echo(f"records store: {settings.database_url()}\nDAGSTER_HOME: {home}\nlogs: {log_dir}")
        if warning := missing_run_monitoring(home):
            click.echo(warning, err=True)
        click.echo("starting the receiver ...")
        supervisor.start("receiver", [*cli, "receiver", "--port", str(receiver_port)], env)
        wait_until(http_ok(f"{receiver_url}/healthz"), "the receiver", supervisor)
        if env.get("SYNC_FORWARD_URL"):
            click.echo("starting the webhook forwarder (SYNC_FORWARD_URL is set) ...")
            supervisor.start("forwarder", [*cli, "forwarder", "run"], env)
        click.echo("starting the sandbox CRM ...")
        supervisor.start(
            "sandbox",
            [*cli, "sandbox", "--port", str(sandbox_port), "--accounts", "0", "--rate-limit", "50", "--burst", "100",
             "--webhook-url", f"{receiver_url}/webhooks/sandbox"],
            env,
        )
        wait_until(http_ok(f"{sandbox_url}/health"), "the sandbox", supervisor)
        with SandboxAdmin(sandbox_url, env["SYNC_SANDBOX_ADMIN_TOKEN"]) as admin:
            for connection_id, account_id in DEMO_ACCOUNTS.items():
                admin.create_account(account_id, token=env[token_envs[connection_id]], contacts=25, deals=15)
            register_demo_connections(sandbox_url, token_envs)
            click.echo("starting dagster dev (webserver + daemon) ...")
            supervisor.start(
                "dagster",
                [str(Path(sys.executable).with_name("dagster")), "dev", "-w", str(settings.project_root() / "workspace.yaml"),
                 "-h", "127.0.0.1", "-p", str(ui_port)],
                env,
            )
            wait_until(http_ok(f"{ui_url}/server_info"), "the Dagster UI", supervisor, timeout_s=180)
            if change_rate > 0:
                admin.set_generator(running=True, rate_per_s=change_rate)
        click.echo(
            "\n".join(
                [
                    "",
                    f"Dagster UI      {ui_url}   (assets sandbox/contacts, sandbox/deals; schedules; inbox_sensor)",
                    f"receiver        {receiver_url}/webhooks/sandbox   (health: {receiver_url}/healthz)",
                    f"sandbox CRM     {sandbox_url}   (changes {change_rate}/s, webhooks to the receiver)",
                    f"connections     {', '.join(f'{c} ({a})' for c, a in DEMO_ACCOUNTS.items())}",
                    "Webhook runs apply changes within seconds; polling reconciles every 5 minutes.",
                    "Ctrl-C stops everything.",
                ]
            )
        )
        while True:
            supervisor.check_alive()
            time.sleep(1.0)
    except KeyboardInterrupt:
        click.echo("\nstopping ...")
    finally:
        supervisor.stop_all()
        click.echo("stopped: " + ", ".join(c.name for c in supervisor.children) if supervisor.children else "stopped")
