"""Prefect's environment for this project: telemetry off, PREFECT_HOME under the work folder, one server.

``telemetry_off()`` runs before Prefect is imported anywhere in ``flows`` (see ``flows/__init__``), so a
plain ``python -m flows...`` or a worker's flow-run process sends nothing unless the user opted in by
setting the variables themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# setdefault semantics: a user who sets these explicitly keeps their choice.
TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the server's usage analytics
    "DO_NOT_TRACK": "1",  # the client SDK's telemetry
    "PREFECT_CLIENT_METRICS_ENABLED": "false",  # the client's Prometheus endpoint
    "RAY_USAGE_STATS_ENABLED": "0",
}
PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_WORK_DIR = PROJECT_DIR / "work"


def telemetry_off(environ: dict[str, str] | None = None) -> None:
    target = os.environ if environ is None else environ
    for name, value in TELEMETRY_OFF.items():
        target.setdefault(name, value)


def prefect_home(work_dir: Path) -> Path:
    return Path(work_dir).resolve() / "prefect"


# Prefect 3's basic auth: the server requires SERVER_AUTH ("user:password"); its clients send CLIENT_AUTH
SERVER_AUTH, CLIENT_AUTH = "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"


def prefect_environment(
    work_dir: Path, api_url: str, base: Mapping[str, str] | None = None, ray_address: str | None = None
) -> dict[str, str]:
    """The environment for every Prefect process this project starts (server, CLI, worker, flow runs).

    ``PREFECT_API_URL`` is the real server: flow-run processes and the Ray workers they start inherit it
    and never start a temporary server of their own.
    """
    env = dict(os.environ if base is None else base)
    telemetry_off(env)
    home = prefect_home(work_dir)
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_API_URL"] = api_url
    env["DEEPLAB_PROJECT_DIR"] = str(PROJECT_DIR)  # prefect.yaml's pull step: where the flows live
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    if env.get(SERVER_AUTH) and not env.get(CLIENT_AUTH):
        env[CLIENT_AUTH] = env[SERVER_AUTH]  # the worker, the CLI and flow runs answer the server's challenge
    return env


def worker_environment() -> dict[str, str]:
    """What a flow run passes on to its Ray workers: the Prefect server (with its credentials, when it asks
    for them) and the telemetry choices."""
    names = ("PREFECT_API_URL", CLIENT_AUTH, *TELEMETRY_OFF)
    return {name: os.environ[name] for name in names if name in os.environ}
