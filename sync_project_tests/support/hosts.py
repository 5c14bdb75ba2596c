"""Hosts of a test's own: Linux network namespaces, each joined to this one by a veth pair.

A process started in a :class:`NetnsHost` sees its loopback and its /30 link and nothing else, so
it reaches a service only at the address a real remote host would use: the host-side end of its
veth. No default route is set, so nothing else is reachable from it.

Services that listen on loopback only (RabbitMQ, Redis, the sandbox) are offered on the host-side
addresses by a :class:`TcpRelay` running in the test process. RabbitMQ's ``guest`` user may log in
only from loopback, which the relay's upstream connection is, as a local proxy's would be.

Names resolve per host: ``ip netns exec`` bind-mounts ``/etc/netns/NAME/hosts`` over /etc/hosts,
so one URL (``http://SERVICES_HOSTNAME:port``) stored once, in a connection's config, reaches the
services from every host over that host's own link.

Everything is removed in :meth:`NetnsHost.close` (namespace, veth, hosts file); killing the
namespace's processes is :meth:`NetnsHost.kill_all`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

#: What the services are called on every namespace host (its /etc/netns/NAME/hosts).
SERVICES_HOSTNAME = "scaleout-services"
NETNS_ETC = Path("/etc/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no iproute2, a kernel/container refusing), or None."""
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"sp-probe-{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def free_subnet() -> ipaddress.IPv4Network:
    """A 10.231.x.0/24 (64 links of /30) no interface or route here uses yet."""
    used = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
    for third in itertools.chain(range(os.getpid() % 200 + 20, 250), range(20, 250)):
        if f"10.231.{third}." not in used:
            return ipaddress.IPv4Network(f"10.231.{third}.0/24")
    raise RuntimeError("no free 10.231.x.0/24 subnet")


class NetnsHost:
    """One namespace host, ``/30`` ``link``: host side ``.1`` (+4n), namespace side ``.2`` (+4n)."""

    def __init__(self, tag: str, link: ipaddress.IPv4Network) -> None:
        assert link.prefixlen == 30
        self.name = f"sp-{tag}-{uuid.uuid4().hex[:6]}"
        self.link = link
        first = link.network_address
        self.host_ip, self.ns_ip = str(first + 1), str(first + 2)
        suffix = uuid.uuid4().hex[:5]
        # Interface names are at most 15 characters.
        self.veth_host, self.veth_ns = f"sph{tag[:3]}{suffix}", f"spn{tag[:3]}{suffix}"
        self._created = False

    def create(self) -> NetnsHost:
        self._created = True
        steps = [
            ["netns", "add", self.name],
            ["link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns],
            ["link", "set", self.veth_ns, "netns", self.name],
            ["addr", "add", f"{self.host_ip}/30", "dev", self.veth_host],
            ["link", "set", self.veth_host, "up"],
            ["-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.veth_ns],
            ["-n", self.name, "link", "set", self.veth_ns, "up"],
            ["-n", self.name, "link", "set", "lo", "up"],
        ]
        for step in steps:
            _ip(*step)
        etc = NETNS_ETC / self.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.host_ip} {SERVICES_HOSTNAME}\n")
        return self

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` as run on this host."""
        return ["ip", "netns", "exec", self.name, *command]

    def pids(self) -> list[int]:
        listed = _ip("netns", "pids", self.name, check=False).stdout.split()
        return [int(pid) for pid in listed if pid.isdigit()]

    def signal_all(self, signum: int, timeout_s: float = 10.0) -> list[int]:
        """Send ``signum`` to every process on this host until no new one appears; their pids.

        Repeated because a process may fork between listing and signalling (a Celery worker
        starting a run): with SIGSTOP, the host is frozen whole once a listing adds no pid.
        """
        signalled: list[int] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            new = [pid for pid in self.pids() if pid not in signalled]
            if not new:
                return signalled
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
                    signalled.append(pid)
        raise RuntimeError(f"processes keep appearing in {self.name}: {self.pids()}")

    def freeze_all(self) -> list[int]:
        """SIGSTOP every process on this host: nothing there progresses until thaw_all or kill_all."""
        return self.signal_all(signal.SIGSTOP)

    def thaw_all(self) -> list[int]:
        return self.signal_all(signal.SIGCONT)

    def kill_all(self, timeout_s: float = 10.0) -> list[int]:
        """SIGKILL every process on this host, as a host that loses power; returns their pids."""
        killed: list[int] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return killed
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.1)
        raise RuntimeError(f"processes still alive in {self.name}: {self.pids()}")

    def close(self) -> None:
        if not self._created:
            return
        with contextlib.suppress(Exception):
            self.kill_all()
        _ip("link", "delete", self.veth_host, check=False)  # deletes its peer too
        _ip("netns", "delete", self.name, check=False)
        shutil.rmtree(NETNS_ETC / self.name, ignore_errors=True)
        self._created = False


class TcpRelay:
    """Accepts on every ``listen`` address and pipes each connection to the next of ``upstreams``
    (round robin), in a background thread with its own event loop."""

    def __init__(self, listen: Sequence[tuple[str, int]], upstreams: Sequence[tuple[str, int]]) -> None:
        self._listen = list(listen)
        self._upstreams = itertools.cycle(list(upstreams))
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.base_events.Server] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-relay", daemon=True)

    def start(self) -> TcpRelay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    async def _serve(self) -> None:
        for host, port in self._listen:
            self._servers.append(await asyncio.start_server(self._pipe, host, port, reuse_address=True))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = next(self._upstreams)
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (TimeoutError, OSError):
            writer.close()
            return

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        try:
            await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        except asyncio.CancelledError:
            # stop() cancels open pipes; the connection simply ends, as a relay going away does.
            for end in (writer, up_writer):
                end.close()

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
