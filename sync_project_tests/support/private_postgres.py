"""A Postgres server of the test's own, for faults that stop or freeze a server.

The shared server on 5432 is never stopped, frozen or reconfigured; a test that needs to do that
to a database starts one of these: ``initdb`` in a fresh temporary directory (as the ``postgres``
user when the tests run as root, since initdb refuses root), a free loopback port, its own socket
directory. Every wait is bounded, and the directory and server are removed whatever happens
(``with``, ``close()``, or at interpreter exit if a test forgot)::

    with PrivatePostgres() as pg:          # initdb + start
        store = Store(pg.url)
        pg.freeze()                        # SIGSTOP: the kernel still ACKs, nothing answers
        ...
        pg.thaw()                          # SIGCONT
        pg.stop(); pg.start()              # a stopped server, then the same one back

``PrivatePostgres(start=False)`` only runs initdb, so ``url`` is known before the server runs.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal

BIN_ENV = "SYNC_TEST_POSTGRES_BIN"
#: Fast and quiet for throwaway data: no fsync (no OS crash is simulated), a small footprint.
DEFAULT_SERVER_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "40",
    "shared_buffers": "16MB",
    "logging_collector": "off",
}


def postgres_bin_dir() -> Path | None:
    """Where ``initdb``/``pg_ctl`` live: ``SYNC_TEST_POSTGRES_BIN``, else the newest Debian install."""
    given = os.environ.get(BIN_ENV)
    if given:
        return Path(given)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def unavailable_reason() -> str | None:
    """Why a private server cannot be started here, or None."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None or not (bin_dir / "initdb").exists() or not (bin_dir / "pg_ctl").exists():
        return f"no Postgres server binaries (initdb, pg_ctl) found; set {BIN_ENV}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run initdb as"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivatePostgres:
    """One throwaway server; see the module docstring."""

    def __init__(
        self,
        *,
        start: bool = True,
        settings: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        problem = unavailable_reason()
        if problem:
            raise RuntimeError(problem)
        bin_dir = postgres_bin_dir()
        assert bin_dir is not None
        self._bin = bin_dir
        self._timeout_s = timeout_s
        self._settings = {**DEFAULT_SERVER_SETTINGS, **(settings or {})}
        self.port = free_port()
        self._root = Path(tempfile.mkdtemp(prefix="sync-pg-"))
        self._data = self._root / "data"
        self._log = self._root / "server.log"
        self._frozen: list[int] = []
        # Whatever a test does, the server and its directory go with the test process.
        self._finalizer = weakref.finalize(self, _cleanup, self._command("pg_ctl", "-D", str(self._data)), self._root)
        try:
            if os.geteuid() == 0:
                shutil.chown(self._root, "postgres", "postgres")
            self._run(
                self._command(
                    "initdb",
                    "-D",
                    str(self._data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-N",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                )
            )
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    # -- what a test uses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def start(self) -> None:
        """Start the server and wait (bounded) until it accepts connections."""
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-k {self._root}",
                *(f"-c {name}={value}" for name, value in self._settings.items()),
            ]
        )
        self._run(self._pg_ctl("-l", str(self._log), "-o", options, "-w", "-t", str(int(self._timeout_s)), "start"))

    def stop(self, mode: Literal["immediate", "fast", "smart"] = "immediate") -> None:
        """Stop the server (by default at once, as a crash would); a no-op when it is down."""
        if not self.running:
            return
        self.thaw()
        try:
            self._run(self._pg_ctl("-m", mode, "-w", "-t", "20", "stop"))
        except (RuntimeError, subprocess.TimeoutExpired):
            pid = self.postmaster_pid()
            if pid is not None:
                _kill_tree(pid)

    def freeze(self) -> None:
        """SIGSTOP the postmaster, then every process it started (backends, checkpointer, ...).

        The postmaster first, so it forks no new backend meanwhile. Connections stay open and the
        kernel keeps acknowledging them, so clients see a server that simply stops answering.
        """
        pid = self.postmaster_pid()
        if pid is None:
            raise RuntimeError("the private Postgres is not running")
        os.kill(pid, signal.SIGSTOP)
        self._frozen.append(pid)
        for child in _children(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGSTOP)
                self._frozen.append(child)

    def thaw(self) -> None:
        """SIGCONT everything :meth:`freeze` stopped; a no-op when nothing is frozen."""
        frozen, self._frozen = self._frozen, []
        for pid in reversed(frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        with contextlib.suppress(Exception):
            self.stop()
        self._finalizer()

    def postmaster_pid(self) -> int | None:
        try:
            first = (self._data / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first)
        except (OSError, IndexError, ValueError):
            return None
        return pid if _alive(pid) else None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> PrivatePostgres:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------

    def _command(self, program: str, *args: str) -> list[str]:
        # As root, run as the postgres user: initdb and the server refuse root.
        owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return [*owner, str(self._bin / program), *args]

    def _pg_ctl(self, *args: str) -> list[str]:
        return self._command("pg_ctl", "-D", str(self._data), *args)

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=self._timeout_s + 10, cwd=self._root)
        if done.returncode != 0:
            program = next(Path(a).name for a in argv if a.startswith(str(self._bin)))
            output = (done.stderr or done.stdout).strip()[-800:]
            raise RuntimeError(f"{program} failed ({done.returncode}): {output}\n{self.log_tail()}")


def _alive(pid: int) -> bool:
    """Running or stopped; not gone and not a zombie waiting for a parent that never reaps."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces: the parent pid is after its ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def _kill_tree(pid: int) -> None:
    for child in _children(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _cleanup(pg_ctl: list[str], root: Path) -> None:
    """Last resort (also at interpreter exit): the server down, its directory gone."""
    data = root / "data"
    pid_file = data / "postmaster.pid"
    if pid_file.exists():
        with contextlib.suppress(Exception):
            pid = int(pid_file.read_text().splitlines()[0])
            for target in [pid, *_children(pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGCONT)
            done = subprocess.run(
                [*pg_ctl, "-m", "immediate", "-w", "-t", "20", "stop"], capture_output=True, timeout=30
            )
            if done.returncode != 0 and _alive(pid):
                _kill_tree(pid)
    shutil.rmtree(root, ignore_errors=True)
