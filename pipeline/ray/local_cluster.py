"""A multi-node Ray cluster on this machine: a head and worker nodes, each its own `ray start --block`.

What the cluster tests and the scaling benchmark run on: every node has its own raylet, object store and
resources, as on separate machines, and token authentication (Ray's shared-secret mode, a fresh token per
cluster). Not loopback-only: `ray start` swaps the node IP 127.0.0.1 for the machine's address, and Ray 2.60
cannot start worker nodes with that swap turned off, so their servers listen on every interface, each
requiring the token (docs/robustness.md). The engine's own local cluster does listen on loopback only.
Each node runs in its own process group, so a node is killed (its raylet
alone, SIGKILL) or stopped (the whole group) by PID, never with `ray stop`, which would kill every Ray process
on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, pgid, ...; empty when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def is_live(pid: int) -> bool:
    """Running, not a zombie (which holds nothing but its exit status)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def group_pids(pgid: int) -> list[int]:
    """Live processes of one process group."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else []
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:  # read once: it may exit meanwhile
            found.append(int(entry.name))
    return found


def processes_mentioning(text: str) -> list[int]:
    """Live processes (other than this one) whose command line contains ``text``: a folder they run from."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# Every node of this cluster shares one host, so nodes unpack a job's working dir into the same place: a
# worker process that starts while another node unpacks it again can die before it registers, and its
# raylet waits Ray's registration timeout (60 s) before it starts another. Machines of a real cluster
# unpack their own copies; here the wait is cut to a few times what a healthy worker needs to register
# (about 2 s; a slower one is started again, not failed).
NODE_ENV = {"RAY_worker_register_timeout_seconds": "5"}


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    gone: bool = False  # stopped or killed on purpose: its exit is no failure

    @property
    def pgid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return group_pids(self.pgid)

    def raylet_pid(self) -> int | None:
        return next((pid for pid in self.pids() if process_name(pid) == "raylet"), None)


@dataclass
class LocalRayCluster:
    """``workers``: per worker node, its ``cpus``, optional custom ``resources`` and core ``affinity``."""

    root: Path
    workers: list[dict[str, Any]] = field(default_factory=lambda: [{"cpus": 1}, {"cpus": 1}])
    head_cpus: int = 0
    object_store_mb: int = 300
    nodes: list[RayNode] = field(default_factory=list)
    port: int = 0
    dashboard_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    def client_env(self) -> dict[str, str]:
        """What a client needs to reach this cluster: the token, and the venv's commands first on PATH."""
        env = dict(os.environ)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        env.pop("RAY_AUTH_TOKEN", None)
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self, timeout: float = 120.0) -> LocalRayCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.port, self.dashboard_port = free_port(), free_port()
        head = [
            "--head",
            f"--port={self.port}",
            f"--num-cpus={self.head_cpus}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={self.root / 'ray'}",
        ]
        try:
            self.nodes.append(self._start_node("head", head))
            self.wait_for_nodes(1, timeout)
            for index, worker in enumerate(self.workers):
                self.add_worker(f"worker{index + 1}", worker)
                self.wait_for_nodes(
                    2 + index, timeout
                )  # one at a time: nodes starting together race for ports
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, name: str, worker: dict[str, Any]) -> RayNode:
        args = [f"--address={self.address}", f"--num-cpus={worker['cpus']}"]
        if worker.get("resources"):
            args.append(f"--resources={json.dumps(worker['resources'])}")
        node = self._start_node(name, args, worker.get("affinity"), worker.get("hide", []))
        self.nodes.append(node)
        return node

    def restore(self, timeout: float = 120.0) -> None:
        """Every worker node of ``workers`` live again after a test killed or stopped some: each such node's
        leftovers are stopped and the node started afresh under its name (a new Ray node), one at a time
        (nodes starting together race for ports). Nodes a caller added beyond ``workers`` are its to stop."""
        names = [f"worker{index + 1}" for index in range(len(self.workers))]
        lost = [node for node in self.nodes if node.name in names and not self._running(node)]
        live = 1 + len(self.workers) - len(lost)
        for node in lost:
            _signal_group(node.pgid, signal.SIGKILL)
            node.process.wait(timeout=30)
            self.nodes.remove(node)
            self.add_worker(node.name, self.workers[names.index(node.name)])
            live += 1
            self.wait_for_nodes(live, timeout)

    @staticmethod
    def _running(node: RayNode) -> bool:
        return not node.gone and node.process.poll() is None and node.raylet_pid() is not None

    def stop_node(self, name: str, grace: float = 20.0) -> None:
        """Stop the node last started under ``name`` (a name may be used again once its node is stopped)."""
        node = next(n for n in reversed(self.nodes) if n.name == name and not n.gone)
        node.gone = True
        _signal_group(node.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and node.pids():
            time.sleep(0.5)
        _signal_group(node.pgid, signal.SIGKILL)
        node.process.wait(timeout=30)

    def _start_node(
        self, name: str, args: list[str], affinity: list[int] | None = None, hide: list[str] | None = None
    ) -> RayNode:
        """``affinity``: the CPU cores every process of the node is bound to (a machine of its own).
        ``hide``: folders this node cannot see (an empty tmpfs over each, in a mount namespace of its own),
        as a machine without the shared storage mounted."""
        ray = Path(sys.executable).parent / "ray"
        log = self.root / f"{name}.log"
        command = [
            str(ray),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            "--disable-usage-stats",
            *args,
        ]
        if hide:
            mounts = " && ".join(f"mount -t tmpfs deeplab-hidden {shlex.quote(p)}" for p in hide)
            unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"']
            command = [*unshare, "sh", *command]
        with log.open("wb") as sink:
            process = subprocess.Popen(
                command,
                env=self.client_env() | NODE_ENV,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopped as one, by PID
                preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None,
            )
        return RayNode(name, process, log)

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The cluster's node table as the dashboard reports it (authenticated with the token)."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/nodes?view=summary",
            headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            summary = json.loads(response.read())["data"]["summary"]
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        seen = -1
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.gone and node.process.poll() is not None:
                    raise RuntimeError(f"Ray node {node.name} exited: see {node.log}")
            try:
                seen = len(self.alive_nodes())
            except OSError:
                seen = -1  # the dashboard is not up yet
            if seen == count:
                return
            time.sleep(1)
        raise TimeoutError(f"{seen} of {count} Ray nodes alive after {timeout:.0f} s (logs in {self.root})")

    def kill_raylet(self, name: str) -> int:
        """SIGKILL one node's raylet, as when its machine is lost; returns the PID killed."""
        node = next(n for n in self.nodes if n.name == name)
        pid = node.raylet_pid()
        if pid is None:
            raise RuntimeError(f"node {name} has no raylet running")
        node.gone = True
        os.kill(pid, signal.SIGKILL)
        return pid

    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.pids()]

    def stop(self, grace: float = 20.0) -> None:
        """Workers first, then the head: SIGTERM each group, SIGKILL what is left after ``grace`` s."""
        for node in reversed(self.nodes):
            _signal_group(node.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.pids():
            time.sleep(0.5)
        for node in self.nodes:
            _signal_group(node.pgid, signal.SIGKILL)
            node.process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.pids():
            time.sleep(0.2)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # the group is gone already
        os.killpg(pgid, sig)
