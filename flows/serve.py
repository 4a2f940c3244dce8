"""``deeplab serve``: a Prefect server (or an existing one), the work pool, the deployments and a worker.

The embedded default is a local server on SQLite under ``<work>/prefect``; ``--api-url`` uses an existing
server instead and starts none. The deployments are those of ``prefect.yaml``, created with the real
``prefect deploy``; the overrides given here (schedule, timezone, pool, default parameters) are applied
to a copy of it under the work folder, never to the committed file. Every process started here is
stopped by its PID on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from deeplab_common.errors import ConfigError, ServerError
from flows.settings import CLIENT_AUTH, PROJECT_DIR, SERVER_AUTH, prefect_environment, prefect_home

PREFECT_FILE = PROJECT_DIR / "prefect.yaml"
HEALTH_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


@dataclass
class ServeConfig:
    work_dir: Path
    host: str = "127.0.0.1"
    port: int = 4200
    api_url: str | None = None  # an existing server: start none
    pool: str = "deeplab"
    cron: str | None = None  # None: prefect.yaml's
    timezone: str | None = None
    ray_address: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # default flow parameters of both deployments
    concurrency_limit: int | None = 1  # flow runs at once on the pool (one machine: one Ray cluster)
    worker: bool = True

    @property
    def url(self) -> str:
        return self.api_url or f"http://{self.host}:{self.port}/api"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def render_deployments(config: ServeConfig, source: Path = PREFECT_FILE) -> dict[str, Any]:
    """prefect.yaml with this serve's overrides applied (pool, nightly schedule, default parameters)."""
    document: dict[str, Any] = yaml.safe_load(source.read_text())
    for deployment in document.get("deployments", []):
        deployment.setdefault("work_pool", {})["name"] = config.pool
        deployment["parameters"] = dict(deployment.get("parameters") or {}) | config.parameters
        for schedule in deployment.get("schedules") or []:
            if config.cron and "cron" in schedule:
                schedule["cron"] = config.cron
            if config.timezone:
                schedule["timezone"] = config.timezone
    return document


class Services:
    """Processes started by ``serve``, each in its own session so that its children stop with it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, command: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child for its lifetime
        process = subprocess.Popen(
            list(command),
            env=env,
            cwd=PROJECT_DIR,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.started.append((name, process))
        return process

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.started}

    def stop(self) -> None:
        """Last started first: SIGINT, then SIGTERM twice (a worker ignores one), then SIGKILL."""
        for _, process in reversed(self.started):
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                if process.poll() is not None:
                    break
                _signal_group(process.pid, sig)
                try:
                    process.wait(timeout=STOP_GRACE_S if sig != signal.SIGKILL else None)
                except subprocess.TimeoutExpired:
                    continue
            _signal_group(process.pid, signal.SIGKILL)  # whatever its children left behind


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def wait_healthy(
    api_url: str, process: subprocess.Popen[bytes] | None, timeout: float = HEALTH_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(
                f"the Prefect server exited with status {process.returncode} before it was healthy"
            )
        try:
            if httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServerError(f"{api_url}: the Prefect server was not healthy after {timeout:.0f} s")


def _prefect(env: dict[str, str], *args: str) -> None:
    command = [sys.executable, "-m", "prefect", "--no-prompt", *args]
    done = subprocess.run(command, env=env, cwd=PROJECT_DIR, capture_output=True, text=True)
    if done.returncode != 0:
        raise ServerError(f"`prefect {' '.join(args)}` failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def deploy(config: ServeConfig, env: dict[str, str]) -> Path:
    """Create the pool and prefect.yaml's deployments (with overrides) on the server; returns the file."""
    pool_args = ["work-pool", "create", config.pool, "--type", "process", "--overwrite"]
    _prefect(env, *pool_args)
    if config.concurrency_limit:
        _prefect(env, "work-pool", "set-concurrency-limit", config.pool, str(config.concurrency_limit))
    rendered = prefect_home(config.work_dir) / "deployments.yaml"
    rendered.write_text(yaml.safe_dump(render_deployments(config), sort_keys=False))
    _prefect(env, "deploy", "--all", "--prefect-file", str(rendered))
    return rendered


def check_exposure(config: ServeConfig, environ: Mapping[str, str] | None = None) -> None:
    """A server reachable beyond this machine must ask for credentials: its API runs flows, that is any
    code a deployment names, on the worker. Loopback needs none (the default)."""
    environ = os.environ if environ is None else environ
    if config.api_url is not None or _is_loopback(config.host) or environ.get(SERVER_AUTH):
        return
    raise ConfigError(
        f"--host {config.host} opens the Prefect API, which runs flows on this worker, beyond this machine: "
        f"set {SERVER_AUTH}=user:password (the server then requires it; clients send {CLIENT_AUTH}), "
        "or keep the default 127.0.0.1 and reach it by SSH tunnel"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@contextmanager
def local_server(config: ServeConfig, services: Services, env: dict[str, str]) -> Iterator[None]:
    """The embedded default: ``prefect server start`` on SQLite under the work folder, until exit.

    With ``config.api_url`` set, that server is used and none is started.
    """
    server = None
    if config.api_url is None:
        command = ["server", "start", "--host", config.host, "--port", str(config.port)]
        server = services.start("server", [sys.executable, "-m", "prefect", *command], env)
    wait_healthy(config.url, server)
    yield


def serve(config: ServeConfig, stop: threading.Event | None = None) -> int:
    """Start everything, write ``<work>/prefect/serve.json`` (URL, PIDs), then wait for a stop signal."""
    check_exposure(config)
    home = prefect_home(config.work_dir)
    home.mkdir(parents=True, exist_ok=True)
    env = prefect_environment(config.work_dir, config.url, ray_address=config.ray_address)
    services = Services(home)
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with local_server(config, services, env):
            deploy(config, env)
            if config.worker:
                worker = ["worker", "start", "--pool", config.pool, "--type", "process"]
                worker += ["--name", f"deeplab-{socket.gethostname()}"]
                services.start("worker", [sys.executable, "-m", "prefect", *worker], env)
            state = {"api_url": config.url, "pool": config.pool, "pids": services.pids(), "home": str(home)}
            (home / "serve.json").write_text(json.dumps(state, indent=2))
            print(f"Prefect API: {config.url}  (UI: {config.url.removesuffix('/api')})", flush=True)
            print(f"deployments: segment-scenes/nightly, segment-scenes/on-demand on pool {config.pool!r}")
            print(f"processes: {services.pids()}; logs in {home}")
            print("ready; Ctrl-C stops them", flush=True)
            while not stop.wait(1.0):
                for name, process in services.started:
                    if process.poll() is not None:
                        raise ServerError(
                            f"the Prefect {name} exited with status {process.returncode}; see {home}"
                        )
        return 0
    finally:
        services.stop()
        (home / "serve.json").unlink(missing_ok=True)
