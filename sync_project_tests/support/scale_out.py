"""deploy/celery/ brought up for real: the webserver, the daemon and two receivers on this host,
Celery run workers on namespace hosts (see hosts.py), Dagster's storage and the records store in
one private Postgres that listens on loopback and on the hosts' links only.

Used by the scale-out test and by benchmarks/scale_out.py. Every process, namespace, relay and the
server go in :meth:`ScaleOutDeployment.close`, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import sqlalchemy as sa
import yaml

from sync_project import settings
from sync_project.core.standard_webhooks import generate_secret
from sync_project.orchestration.partitions import partitions_name
from sync_project.sandbox.client import SandboxAdmin
from sync_project.sandbox.fake import ChangeMix
from sync_project.sandbox.generator import GeneratorSettings
from sync_project.sandbox.ratelimit import RateLimitSettings
from sync_project.sandbox.server import SandboxServer
from sync_project.sandbox.service import SandboxConfig
from sync_project.sandbox.webhooks import RetryPolicy
from sync_project.serving import BackgroundServer
from sync_project.store import Store
from sync_project_tests.support import hosts
from sync_project_tests.support.dagster_ui import BACKFILL_STATUS, LAUNCH_BACKFILL
from sync_project_tests.support.load_balancer import round_robin_app
from sync_project_tests.support.private_postgres import PrivatePostgres
from sync_project_tests.support.private_postgres import unavailable_reason as postgres_unavailable

ROOT = settings.project_root()
BIN = Path(sys.executable).parent
DEPLOY = ROOT / "deploy" / "celery"
BROKER_PORT = 5672
REDIS_PORT = 6379
#: Celery keeps task states here; a database number of its own on the shared Redis.
REDIS_DB = 5
TASK_ID_TAG = "dagster-celery/task_id"
INSTANCE_ENV = ("DAGSTER_PG_URL", "DAGSTER_CELERY_BROKER", "DAGSTER_CELERY_BACKEND")


def unavailable_reason() -> str | None:
    """Why the deployment cannot come up here, or None (RabbitMQ and Redis on loopback, root, ...)."""
    for name, port in (("RabbitMQ", BROKER_PORT), ("Redis", REDIS_PORT)):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except OSError as error:
            return f"{name} is not listening on 127.0.0.1:{port} ({error})"
    try:
        import dagster_celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as error:
        return f"the celery extra is not installed ({error}): pip install -e '.[test,celery]'"
    return postgres_unavailable() or hosts.unavailable_reason()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Worker:
    """A run worker: ``dagster-celery worker start -n NAME`` on its own namespace host."""

    name: str
    host: hosts.NetnsHost
    home: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def celery_name(self) -> str:
        return f"{self.name}@{socket.gethostname()}"


@dataclass
class ScaleOutDeployment:
    """The deployment; ``start()`` it, then ``launch_backfill`` and read ``instance``/``store``."""

    root: Path
    workers: int = 2
    concurrency: int = 2
    accounts: int = 12
    contacts: int = 50
    receivers: int = 2
    #: Instance settings the test shortens (poll intervals); the rest is deploy/celery/dagster.yaml.
    monitoring: dict[str, Any] = field(default_factory=lambda: {"poll_interval_seconds": 5})
    generator_accounts: int = 2

    def __post_init__(self) -> None:
        self.secret = generate_secret()
        self.tokens: dict[str, str] = {}
        self.connection_ids = [f"c{n:02d}" for n in range(1, self.accounts + 1)]
        self.account_of = {c: f"acct-{c}" for c in self.connection_ids}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.worker_hosts: list[Worker] = []
        self.served: Counter[str] = Counter()
        self._closers: list[Any] = []
        self.instance: dg.DagsterInstance | None = None
        self.store: Store | None = None
        self._saved_env: dict[str, str | None] = {}

    # -- bring-up -------------------------------------------------------------------------------

    def start(self) -> ScaleOutDeployment:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        subnet = hosts.free_subnet()
        links = list(subnet.subnets(new_prefix=30))
        for n in range(self.workers):
            host = hosts.NetnsHost(f"w{n + 1}", links[n])
            self._closers.append(host.close)
            host.create()
            self.worker_hosts.append(Worker(f"w{n + 1}", host, self.root / f"home-w{n + 1}"))

        # One private server for Dagster's storage and the records: reachable on loopback (this
        # host's services) and on each host's link (its workers), and nowhere else.
        listen = ",".join(["127.0.0.1", *(w.host.host_ip for w in self.worker_hosts)])
        self.pg = PrivatePostgres(start=False, settings={"listen_addresses": listen, "max_connections": "150"})
        self._closers.append(self.pg.close)
        hba = self.pg._data / "pg_hba.conf"  # noqa: SLF001 - the trust lines for the links
        with hba.open("a") as file:
            for worker in self.worker_hosts:
                file.write(f"host all all {worker.host.link} trust\n")
        self.pg.start()
        admin = sa.create_engine(self.pg.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE dagster"))
            conn.execute(sa.text("CREATE DATABASE records"))
        admin.dispose()

        self.sandbox = SandboxServer(
            SandboxConfig(
                seed=23,
                webhook_secret=self.secret,
                rate_limit=RateLimitSettings(enabled=False),
                retry=RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, timeout_s=10.0),
            )
        )
        self.sandbox_url = self.sandbox.start()
        self._closers.append(self.sandbox.stop)
        self.sandbox_port = int(self.sandbox_url.rsplit(":", 1)[1])
        self.admin = SandboxAdmin(self.sandbox_url, self.sandbox.admin_token)
        self._closers.append(self.admin.close)

        # The namespace hosts reach the broker, Redis and the sandbox at their link's host side.
        listen_on = [w.host.host_ip for w in self.worker_hosts]
        for port in (BROKER_PORT, REDIS_PORT, self.sandbox_port):
            relay = hosts.TcpRelay([(ip, port) for ip in listen_on], [("127.0.0.1", port)]).start()
            self._closers.append(relay.stop)

        self.store = Store(self.database_url("127.0.0.1", "records"))
        self._closers.append(self.store.close)
        self._write_home(self.root / "home")
        for worker in self.worker_hosts:
            self._write_home(worker.home)

        receiver_urls = [self._start_receiver(n) for n in range(self.receivers)]
        self.balancer = BackgroundServer(round_robin_app(receiver_urls, self.served)).start()
        self._closers.append(self.balancer.stop)
        self.admin.set_webhook_url(f"{self.balancer.url}/webhooks/sandbox")

        # The test process reads the instance as the services do (its yaml names env vars).
        for key in INSTANCE_ENV:
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = self.services_env()[key]
        self.instance = dg.DagsterInstance.from_config(str(self.root / "home"))
        self._closers.append(self.instance.dispose)
        for connection_id in self.connection_ids:
            _, self.tokens[connection_id] = self.admin.create_account(
                self.account_of[connection_id], contacts=self.contacts
            )
            self.store.connections.add(
                "sandbox",
                connection_id,
                account_id=self.account_of[connection_id],
                credentials_env=self.token_env(connection_id),
                config={"base_url": f"http://{hosts.SERVICES_HOSTNAME}:{self.sandbox_port}"},
            )
        self.instance.add_dynamic_partitions(partitions_name("sandbox"), self.connection_ids)

        self.ui_port = free_port()
        self._spawn(
            "webserver",
            [
                str(BIN / "dagster-webserver"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.ui_port),
                "-w",
                str(DEPLOY / "workspace.yaml"),
            ],
            self.services_env(),
        )
        self._spawn(
            "daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(DEPLOY / "workspace.yaml")], self.services_env()
        )
        for worker in self.worker_hosts:
            self.start_worker(worker)
        self._wait_http(f"{self.ui_url}/server_info", "webserver", 180)
        for worker in self.worker_hosts:
            self.wait_worker_ready(worker)

    def _write_home(self, home: Path) -> None:
        """deploy/celery/dagster.yaml as shipped, with the run limit and monitoring the test sets."""
        home.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
        # As many runs in progress as the workers have pool processes: more would wait in the
        # broker in STARTING, where run monitoring's start timeout fails them.
        config["concurrency"]["runs"]["max_concurrent_runs"] = self.workers * self.concurrency
        config["run_monitoring"] = {**config.get("run_monitoring", {}), **self.monitoring}
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))

    def database_url(self, host: str, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://postgres@{host}:{self.pg.port}/{database}"

    def token_env(self, connection_id: str) -> str:
        return f"SCALEOUT_SANDBOX_TOKEN_{connection_id.upper()}"

    def _env(self, via: str, home: Path) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("DAGSTER_", "SYNC_"))}
        return {
            **env,
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_URL": self.database_url(via, "dagster", "postgresql"),
            "DAGSTER_CELERY_BROKER": f"amqp://guest:guest@{via}:{BROKER_PORT}//",
            "DAGSTER_CELERY_BACKEND": f"redis://{via}:{REDIS_PORT}/{REDIS_DB}",
            "SYNC_DATABASE_URL": self.database_url(via, "records"),
            "SYNC_SANDBOX_WEBHOOK_SECRET": self.secret,
            **{self.token_env(c): token for c, token in self.tokens.items()},
        }

    def services_env(self) -> dict[str, str]:
        return self._env("127.0.0.1", self.root / "home")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        self.processes[name], self.logs[name] = process, log
        return process

    def _start_receiver(self, n: int) -> str:
        port = free_port()
        self._spawn(
            f"receiver{n + 1}",
            [str(BIN / "sync-project"), "receiver", "--port", str(port), "--workers", "2"],
            self.services_env(),
        )
        url = f"http://127.0.0.1:{port}"
        self._wait_http(f"{url}/healthz", f"receiver{n + 1}", 90)
        return url

    def start_worker(self, worker: Worker) -> None:
        env = {**self._env(worker.host.host_ip, worker.home), "DAGSTER_HOME": str(worker.home)}
        argv = worker.host.argv(
            [
                str(BIN / "dagster-celery"),
                "worker",
                "start",
                "-A",
                "dagster_celery.app",
                "-y",
                str(DEPLOY / "worker.yaml"),
                "-n",
                worker.name,
                "-q",
                "dagster",
                "--",
                f"--concurrency={self.concurrency}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
        worker.process = self._spawn(f"worker-{worker.name}", argv, env)
        worker.log = self.logs[f"worker-{worker.name}"]

    def wait_worker_ready(self, worker: Worker, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        assert worker.log is not None and worker.process is not None
        while " ready." not in worker.log.read_text(errors="replace"):
            assert worker.process.poll() is None, self.tail(f"worker-{worker.name}")
            assert time.monotonic() < deadline, self.tail(f"worker-{worker.name}")
            time.sleep(0.5)

    def _wait_http(self, url: str, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.processes[name].poll() is None, self.tail(name)
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"{name} did not answer at {url}\n{self.tail(name)}"
            time.sleep(0.5)

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}"

    # -- what a test does -----------------------------------------------------------------------

    def start_webhook_stream(self, rate_per_s: float = 2.0) -> None:
        """Changes to the first accounts all the time, each announced by a signed webhook."""
        accounts = [self.account_of[c] for c in self.connection_ids[: self.generator_accounts]]
        # Contacts only: the backfilled sync, whose store the test compares with the truth.
        settings_ = GeneratorSettings(
            running=True, rate_per_s=rate_per_s, account_ids=accounts, mix=ChangeMix(deal_share=0.0)
        )
        self.admin.set_generator(**settings_.model_dump(mode="json"))

    def stop_webhook_stream(self) -> None:
        self.admin.set_generator(running=False)
        self.admin.flush()

    def graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(f"{self.ui_url}/graphql", json={"query": query, "variables": variables}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body
        return body["data"]

    def launch_backfill(self, partitions: list[str], tags: dict[str, str]) -> str:
        """An asset backfill of sandbox/contacts, launched as the UI's "Materialize..." does."""
        launched = self.graphql(
            LAUNCH_BACKFILL,
            {
                "backfillParams": {
                    "assetSelection": [{"path": ["sandbox", "contacts"]}],
                    "partitionNames": partitions,
                    "fromFailure": False,
                    "allPartitions": False,
                    "tags": [{"key": key, "value": value} for key, value in tags.items()],
                }
            },
        )["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        return str(launched["backfillId"])

    def backfill_status(self, backfill_id: str) -> str:
        status = self.graphql(BACKFILL_STATUS, {"backfillId": backfill_id})["partitionBackfillOrError"]
        return str(status.get("status"))

    def task_worker(self, run: dg.DagsterRun) -> str | None:
        """The Celery worker that took the run's task, from the result backend (``result_extended``)."""
        import redis

        task_id = run.tags.get(TASK_ID_TAG)
        if task_id is None:
            return None
        client = redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=REDIS_DB, socket_timeout=5)
        try:
            raw = client.get(f"celery-task-meta-{task_id}")
        finally:
            client.close()
        if raw is None:
            return None
        meta = json.loads(raw)
        result = meta.get("result")
        return meta.get("worker") or (result.get("hostname") if isinstance(result, dict) else None)

    def tail(self, name: str, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return f"--- {name} ---\n" + "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])
        return f"--- {name}: no log ---"

    def tails(self) -> str:
        return "\n".join(self.tail(name) for name in self.logs)

    # -- tear-down ------------------------------------------------------------------------------

    def close(self) -> None:
        for name in ("daemon", "webserver"):
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
        for name, process in self.processes.items():
            try:
                process.wait(timeout=30 if name in ("daemon", "webserver") else 0.1)
            except subprocess.TimeoutExpired:
                pass
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM if name.startswith("receiver") else signal.SIGKILL)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()
