"""``sync-project dev`` (what ``make run`` runs): the whole project on one machine, no services.

It starts the sandbox CRM, the webhook receiver and ``dagster dev`` (webserver + daemon) on the
embedded default (SQLite under the project), registers two demo connections, turns the sandbox's
change generator on and prints where to look. Ctrl-C stops every process it started: each runs in
a process group of its own, gets SIGINT (``dagster dev`` needs it to stop its webserver, daemon and
code servers) and whatever is left of a group afterwards is killed.

The demo survives restarts: the records store and the sandbox's own data both live in the data
folder (``sync.db``, ``sandbox.db``), so after a restart they still describe the same records.
Before stopping, the sandbox's change generator is turned off and its queued webhooks are sent,
so the inbox holds every change the sandbox made; then the runs in progress are canceled (see
:func:`cancel_runs`), so a stop leaves no failed run. If the sandbox's data is new while the store
already holds demo records (an older checkout kept the sandbox in memory; ``sandbox.db`` was
deleted), dev says so and runs a full refresh of the demo connections before anything else.
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
import dagster as dg
import httpx
import yaml

from sync_project import settings
from sync_project.cli.connections import dagster_instance
from sync_project.core.standard_webhooks import generate_secret
from sync_project.orchestration.connection_partitions import reconcile_partitions
from sync_project.receiver.records_api import TOKEN_ENV as RECORDS_TOKEN_ENV
from sync_project.sandbox.client import SandboxAdmin
from sync_project.store import Store

DEMO_ACCOUNTS = {"demo-1": "acct-1", "demo-2": "acct-2"}
DEMO_SYNCS = ("sandbox/contacts", "sandbox/deals")
SHUTDOWN_GRACE_S = 30.0
#: How long a stop waits for the sandbox to send the webhooks it has queued.
WEBHOOK_FLUSH_S = 10
ADMIN_TOKEN_ENV = "SYNC_SANDBOX_ADMIN_TOKEN"
#: `dagster dev` warns on every start that it is superseded by `dg dev`, a command of a package
#: (dagster-dg-cli) the project does not use: nothing a person could act on, so it is filtered by
#: its exact text, and every other warning still shows.
DAGSTER_DEV_WARNINGS = "ignore:Function `dev_command` is superseded"
#: Without it, Dagster fails a backfill for good, with no run launched, when one of the daemon's
#: evaluations finds the code location unloadable (its code server busy past a gRPC timeout, or
#: restarting): "existed at storage-time, but no longer does". Set, the daemon skips that
#: evaluation and resumes once the location loads. An environment that sets it ("" for off) wins.
BACKFILL_WAITS_FOR_CODE_ENV = "DAGSTER_BACKFILL_RETRY_DEFINITION_CHANGED_ERROR"


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    #: SIGINT to the whole process group, or to the child alone (``dagster dev`` stops its daemon
    #: and webserver first and its code servers after them; signalled all at once, the daemon's
    #: last sensor tick found its code location gone: DagsterCodeLocationNotFoundError).
    interrupt_group: bool = True


@dataclass
class Supervisor:
    """Starts children in their own process groups and stops all of them, whatever happens."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str], *, interrupt_group: bool = True) -> Child:
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("ab")
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(name, process, log_path, interrupt_group)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            if child.process.poll() is not None:
                raise click.ClickException(
                    f"{child.name} exited with code {child.process.returncode}; see {child.log_path}"
                )

    def stop_all(self, before_kill: Callable[[], None] | None = None) -> None:
        """SIGINT every child, wait for them (bounded), call ``before_kill``, then kill whatever
        is left of each process group."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                if child.interrupt_group:
                    _signal_group(child.process.pid, signal.SIGINT)
                else:
                    child.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                click.echo(f"{child.name} did not stop within {SHUTDOWN_GRACE_S:.0f} s; killing it", err=True)
        if before_kill is not None:
            before_kill()
        for child in reversed(self.children):
            # Grandchildren (dagster's webserver, daemon, code servers, run workers) share the group.
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


def missing_warehouse_pool(home: Path) -> str | None:
    """A warning when the instance config sets no pool limit (a home made before the warehouse):
    the warehouse loads would then run at once, and all but one fail on the DuckDB file's lock."""
    config_path = home / "dagster.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    if ((config.get("concurrency") or {}).get("pools") or {}).get("default_limit"):
        return None
    return (
        f"warning: {config_path} sets no concurrency.pools.default_limit, so warehouse loads may run at once "
        f"and fail on the DuckDB file's lock; copy the project's: cp {settings.INSTANCE_TEMPLATE} {config_path}"
    )


def register_demo_connections(sandbox_url: str, token_envs: dict[str, str]) -> None:
    """Add the demo connections, or keep them as they are when they already point at this sandbox
    (re-adding a connection would drop nothing, but a connection is not something to churn)."""
    with Store() as store:
        existing = {c.connection_id: c for c in store.connections.list("sandbox")}
        for connection_id, account_id in DEMO_ACCOUNTS.items():
            wanted = (account_id, token_envs[connection_id], {"base_url": sandbox_url})
            current = existing.get(connection_id)
            if current is not None and (current.account_id, current.credentials_env, current.config) == wanted:
                continue
            if current is not None:  # another --sandbox-port than last time: follow it
                store.connections.remove("sandbox", connection_id)
            store.connections.add(
                "sandbox",
                connection_id,
                account_id=account_id,
                credentials_env=token_envs[connection_id],
                config={"base_url": sandbox_url},
            )
        reconcile_partitions(dagster_instance(), store, ["sandbox"])


def prepare_demo_accounts(admin: SandboxAdmin, env: dict[str, str], token_envs: dict[str, str]) -> list[str]:
    """Create the demo accounts, or give the ones the sandbox kept from its last run this start's
    tokens (its data file keeps digests only). Returns the accounts that were kept."""
    existing = admin.accounts()
    kept = []
    for connection_id, account_id in DEMO_ACCOUNTS.items():
        token = env[token_envs[connection_id]]
        if account_id in existing:
            admin.set_token(account_id, token)
            kept.append(account_id)
        else:
            admin.create_account(account_id, token=token, contacts=25, deals=15)
    return kept


def demo_records_held() -> int:
    """Records (live or tombstoned) the store holds for the demo connections."""
    with Store() as store:
        return sum(
            store.count(sync, connection_id, include_deleted=True)
            for sync in DEMO_SYNCS
            for connection_id in DEMO_ACCOUNTS
        )


def refresh_demo_connections() -> None:
    """A full refresh of every demo partition, in this process, recorded in the Dagster instance
    like any launch: the sandbox's records replace those of the sandbox that is gone, and the
    ones it does not have are tombstoned."""
    from sync_project.definitions import defs
    from sync_project.orchestration.assets import job_name
    from sync_project.registry import get_sync

    instance = dagster_instance()
    for sync_key in DEMO_SYNCS:
        job = defs.resolve_job_def(job_name(get_sync(sync_key)))
        for connection_id in DEMO_ACCOUNTS:
            result = job.execute_in_process(instance=instance, partition_key=connection_id, raise_on_error=False)
            if not result.success:
                raise click.ClickException(
                    f"the full refresh of {sync_key} for {connection_id} failed (run {result.run_id}); "
                    "see it in the UI, or `make clean` to start the demo afresh"
                )


#: How long a stop waits for the runs it canceled to end before it stops dagster dev.
RUN_STOP_WAIT_S = 20.0
_IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def cancel_runs(instance: dg.DagsterInstance, *, wait_s: float = RUN_STOP_WAIT_S) -> int:
    """Cancel the runs in progress (standing drainers linger for minutes) before dagster dev stops.

    A run worker interrupted without a termination request is failed by Dagster ("interrupted
    unexpectedly"). Terminated through the run launcher while its code server is still up, a
    drainer is interrupted and ends canceled: the batch in flight rolls back whole, its events stay
    pending for the next start, nothing is half-applied. A run not yet executing is marked
    canceled at once (one marked canceling before its worker starts would be failed by it). Waits
    up to ``wait_s`` for them to end; returns how many runs were canceled."""
    canceled = 0
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=_IN_PROGRESS)):
        run = record.dagster_run
        try:
            if run.status == dg.DagsterRunStatus.STARTED:
                if not instance.run_launcher.terminate(run.run_id):
                    instance.report_run_canceling(run, message="sync-project dev is stopping")
            elif run.status != dg.DagsterRunStatus.CANCELING:
                instance.report_run_canceled(run, message="sync-project dev is stopping")
        except Exception:  # noqa: BLE001 - a stop goes on; the pass after dagster dev stopped cancels it
            continue
        canceled += 1
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and instance.get_run_records(
        filters=dg.RunsFilter(statuses=_IN_PROGRESS), limit=1
    ):
        time.sleep(0.5)
    return canceled


def cancel_leftover_runs(instance: dg.DagsterInstance) -> int:
    """After dagster dev stopped: runs still in progress (launched by the sensor during the stop,
    or whose worker did not end in time) are about to be killed with their process group; marked
    canceled, not left for run monitoring to fail at the next start."""
    left = instance.get_run_records(filters=dg.RunsFilter(statuses=_IN_PROGRESS))
    for record in left:
        instance.report_run_canceled(record.dagster_run, message="sync-project dev stopped")
    return len(left)


def stop_the_changes(sandbox_url: str, admin_token: str) -> None:
    """Turn the generator off and wait (bounded) until the sandbox has sent its queued webhooks,
    while the receiver still takes them: the inbox then holds every change the sandbox made, and
    the restarted demo starts from a store that agrees with the sandbox."""
    try:
        with SandboxAdmin(sandbox_url, admin_token, timeout_s=WEBHOOK_FLUSH_S + 5) as admin:
            admin.set_generator(running=False)
            admin.flush(timeout_s=WEBHOOK_FLUSH_S)
    except Exception as error:  # noqa: BLE001 - a stop must go on whatever the sandbox says
        click.echo(f"the sandbox's last webhooks may be unsent ({error}); polling reconciles them", err=True)


@click.command("dev")
@click.option("--ui-port", default=3000, show_default=True, type=int, help="The Dagster UI.")
@click.option("--receiver-port", default=8000, show_default=True, type=int)
@click.option("--sandbox-port", default=8765, show_default=True, type=int)
@click.option(
    "--change-rate",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, 1000),
    help="Sandbox changes per second; 0 leaves the change generator off.",
)
def command(ui_port: int, receiver_port: int, sandbox_port: int, change_rate: float) -> None:
    """Run the sandbox, the receiver and the Dagster UI on the embedded default until Ctrl-C."""
    home = settings.dagster_home()
    data = settings.data_dir()
    log_dir = data / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    receiver_url = f"http://127.0.0.1:{receiver_port}"
    ui_url = f"http://127.0.0.1:{ui_port}"

    sandbox_data = data / "sandbox.db"

    # Secrets live in this process tree's environment only: nothing is written to disk.
    token_envs = {cid: f"SYNC_DEMO_{cid.upper().replace('-', '_')}_TOKEN" for cid in DEMO_ACCOUNTS}
    # Credentials dev makes up are printed once below, as the sandbox prints what it generates:
    # nothing else could tell them. Those set beforehand are kept, and never echoed.
    generated: dict[str, str] = {}
    for name, prefix in ((RECORDS_TOKEN_ENV, "rec_"), (ADMIN_TOKEN_ENV, "adm_")):
        if not os.environ.get(name):
            generated[name] = prefix + secrets.token_urlsafe(24)
    env = {
        **os.environ,
        **generated,
        "DAGSTER_HOME": str(home),
        "SYNC_DATABASE_URL": settings.database_url(),
        "SYNC_SANDBOX_WEBHOOK_SECRET": os.environ.get("SYNC_SANDBOX_WEBHOOK_SECRET") or generate_secret(),
        BACKFILL_WAITS_FOR_CODE_ENV: os.environ.get(BACKFILL_WAITS_FOR_CODE_ENV, "1"),
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
    sandbox_up = dagster_up = False
    try:
        click.echo(
            f"records store: {settings.database_url()}\nsandbox data: {sandbox_data}\n"
            f"DAGSTER_HOME: {home}\nlogs: {log_dir}"
        )
        for warning in (missing_run_monitoring(home), missing_warehouse_pool(home)):
            if warning:
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
            [
                *cli,
                "sandbox",
                "--port",
                str(sandbox_port),
                "--accounts",
                "0",
                "--rate-limit",
                "50",
                "--burst",
                "100",
                "--webhook-url",
                f"{receiver_url}/webhooks/sandbox",
                "--data",
                str(sandbox_data),
            ],
            env,
        )
        wait_until(http_ok(f"{sandbox_url}/health"), "the sandbox", supervisor)
        sandbox_up = True
        with SandboxAdmin(sandbox_url, env[ADMIN_TOKEN_ENV]) as admin:
            kept = prepare_demo_accounts(admin, env, token_envs)
            register_demo_connections(sandbox_url, token_envs)
            if kept:
                click.echo(f"the sandbox kept its data from the last run ({', '.join(kept)}): the store agrees with it")
            elif held := demo_records_held():
                click.echo(
                    f"the sandbox's data is new ({sandbox_data} was not there), but the store holds {held} records "
                    "of demo-1 and demo-2 from an earlier sandbox: a full refresh of both connections replaces "
                    "them with the new sandbox's records (what it does not have is tombstoned) ..."
                )
                refresh_demo_connections()
            click.echo("starting dagster dev (webserver + daemon) ...")
            supervisor.start(
                "dagster",
                [
                    str(Path(sys.executable).with_name("dagster")),
                    "dev",
                    "-w",
                    str(settings.project_root() / "workspace.yaml"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(ui_port),
                ],
                {**env, "PYTHONWARNINGS": ",".join(filter(None, (env.get("PYTHONWARNINGS"), DAGSTER_DEV_WARNINGS)))},
                interrupt_group=False,
            )
            dagster_up = True
            wait_until(http_ok(f"{ui_url}/server_info"), "the Dagster UI", supervisor, timeout_s=180)
            if change_rate > 0:
                admin.set_generator(running=True, rate_per_s=change_rate)
        click.echo("\n".join(banner(ui_url, receiver_url, sandbox_url, change_rate, generated)))
        while True:
            supervisor.check_alive()
            time.sleep(1.0)
    except KeyboardInterrupt:
        click.echo("\nstopping ...")
    finally:
        if sandbox_up:
            stop_the_changes(sandbox_url, env[ADMIN_TOKEN_ENV])
        instance = dagster_instance() if dagster_up else None
        try:
            if instance is not None and (canceled := cancel_runs(instance)):
                click.echo(f"canceled {canceled} run(s) in progress (their pending events wait for the next start)")
        except Exception as error:  # noqa: BLE001 - a stop must go on
            click.echo(f"could not cancel the runs in progress ({type(error).__name__}: {error})", err=True)

        def leftovers() -> None:
            if instance is None:
                return
            try:
                if left := cancel_leftover_runs(instance):
                    click.echo(f"canceled {left} run(s) still in progress after dagster dev stopped")
            except Exception as error:  # noqa: BLE001 - a stop must go on
                click.echo(f"could not cancel the runs left ({type(error).__name__}: {error})", err=True)

        try:
            supervisor.stop_all(before_kill=leftovers)
        finally:
            if instance is not None:
                instance.dispose()
        click.echo("stopped: " + ", ".join(c.name for c in supervisor.children) if supervisor.children else "stopped")


def banner(
    ui_url: str, receiver_url: str, sandbox_url: str, change_rate: float, generated: dict[str, str]
) -> list[str]:
    """Where to look, and the two credentials a person needs to look there (never a webhook
    secret or an account's API token: those stay between the processes)."""

    def token(name: str) -> str:
        return generated.get(name) or f"${name}"  # yours, set before the start: not echoed

    def note(name: str) -> str:
        return "" if name in generated else " (set before the start, so not echoed)"

    records = f"{receiver_url}/records/sandbox/contacts?connection=demo-1&limit=100"
    return [
        "",
        f"Dagster UI      {ui_url}   (assets sandbox/contacts, sandbox/deals; schedules; inbox_sensor)",
        f"receiver        {receiver_url}/webhooks/sandbox   (health: {receiver_url}/healthz)",
        f"records API     {receiver_url}/records/PROVIDER/OBJECT?connection=ID   "
        f"token {token(RECORDS_TOKEN_ENV)}{note(RECORDS_TOKEN_ENV)}",
        f"sandbox CRM     {sandbox_url}   (changes {change_rate}/s, webhooks to the receiver)",
        f"sandbox admin   {sandbox_url}/admin/...   token {token(ADMIN_TOKEN_ENV)}{note(ADMIN_TOKEN_ENV)}",
        f"connections     {', '.join(f'{c} ({a})' for c, a in DEMO_ACCOUNTS.items())}",
        "",
        "Try, in another shell:",
        f"  curl -H \"Authorization: Bearer {token(RECORDS_TOKEN_ENV)}\" '{records}'",
        f"  curl -H \"Authorization: Bearer {token(ADMIN_TOKEN_ENV)}\" '{sandbox_url}/admin/truth?account_id=acct-1'",
        "  .venv/bin/sync-project connections status",
        "",
        "Webhook runs apply changes within seconds; polling reconciles every 5 minutes.",
        "Ctrl-C stops everything.",
    ]
