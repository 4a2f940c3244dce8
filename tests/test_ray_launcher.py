"""`ray up` / `ray submit` / `ray down` with the committed local-provider config (infra/ray/local.yaml), for
real: the launcher reaches the "head" (this machine) over SSH — an sshd in inetd mode behind the config's
ProxyCommand, with its own keys and a throw-away HOME —, syncs the project with rsync, starts Ray with token
authentication, runs the segment-scenes flow through infra/ray/segment_flow.py, and tears the cluster down."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import yaml

from pipeline.ray.local_cluster import free_port, is_live, process_name, processes_mentioning

ROOT = Path(__file__).resolve().parents[1]
SSHD = Path("/usr/sbin/sshd")


def _missing_tools() -> list[str]:
    missing = [tool for tool in ("ssh", "ssh-keygen", "rsync") if shutil.which(tool) is None]
    return missing + ([str(SSHD)] if not SSHD.exists() else [])


def _ray_running(wait_s: float = 30.0) -> list[int]:
    """Live raylets and GCS servers on this machine, after waiting a little for a cluster just stopped
    (an earlier test's) to be gone; zombies, which hold nothing, do not count."""
    deadline = time.monotonic() + wait_s
    while True:
        running = [
            int(p.name)
            for p in Path("/proc").iterdir()
            if p.name.isdigit()
            and process_name(int(p.name)) in ("raylet", "gcs_server")
            and is_live(int(p.name))
        ]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(1)


@pytest.fixture
def head_over_ssh() -> Iterator[Path]:
    """A short base folder: sshd config (inetd mode), keys, the head's HOME with the project installed."""
    missing = _missing_tools()
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        # the Debian packages, as the test setup asks (CI runs as root with the package registries)
        apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=apt, capture_output=True, timeout=600)
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server", "rsync"]
        subprocess.run(install, env=apt, capture_output=True, timeout=600)
        missing = _missing_tools()
    if missing:
        pytest.skip(f"the local-provider test needs openssh-server and rsync (missing: {', '.join(missing)})")
    if _ray_running():
        pytest.skip(
            f"another Ray cluster runs on this machine (PIDs {_ray_running(0)}): `ray down` runs `ray stop`, "
            "which would kill it"
        )
    base = Path(tempfile.mkdtemp(prefix="dlr-"))  # short: Ray's socket paths live under it
    home, client = base / "h", base / "c"
    for folder in (home / ".ray", client / ".ray", base / "t", base / "tmp"):
        folder.mkdir(parents=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / key)], check=True)
    shutil.copy(base / "client.pub", base / "authorized_keys")
    (base / "sshd_config").write_text(
        f"HostKey {base / 'host'}\nAuthorizedKeysFile {base / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n"
        f"SetEnv HOME={home} RAY_TMPDIR={base / 't'}\n"
    )
    # The head already has the project installed: its venv's parts link to this one's, and its own stamp,
    # newer than any synced pyproject.toml, lets `make install` there find it up to date (never reinstall
    # into this checkout's venv through the links).
    venv, head_venv = Path(sys.executable).parent.parent, home / "deeplab-pipeline" / ".venv"
    head_venv.mkdir(parents=True)
    for part in ("bin", "lib", "include", "pyvenv.cfg"):
        if (venv / part).exists():
            (head_venv / part).symlink_to(venv / part)
    (head_venv / ".installed").touch()
    (client / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    try:
        yield base
    finally:
        for pid in processes_mentioning(str(base)):  # the launcher's SSH control masters and their sshd
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def _render(base: Path) -> tuple[Path, str]:
    """infra/ray/local.yaml with this test's keys, ProxyCommand, token and free ports."""
    config = yaml.safe_load((ROOT / "infra" / "ray" / "local.yaml").read_text())
    name = f"deeplab-test-{secrets.token_hex(3)}"
    config["cluster_name"] = name
    config["auth"]["ssh_private_key"] = str(base / "client")
    config["auth"]["ssh_proxy_command"] = f"{SSHD} -i -f {base / 'sshd_config'}"
    mounts = config["file_mounts"]
    assert mounts.pop("~/.ray/auth_token") == "~/.ray/auth_token"
    config["file_mounts"] = {target: str(ROOT / source) for target, source in mounts.items()}
    config["file_mounts"]["~/.ray/auth_token"] = str(base / "c" / ".ray" / "auth_token")
    ports = (
        f"--port={free_port()} --dashboard-port={free_port()} --ray-client-server-port={free_port()} "
        "--num-cpus=2 "
    )
    config["head_start_ray_commands"] = [
        command.replace("--port=6379 ", ports) for command in config["head_start_ray_commands"]
    ]
    assert ports in config["head_start_ray_commands"][0], "the committed config starts the head on 6379"
    path = base / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, name


def _ssh_control_dir(cluster_name: str) -> Path:
    """Where the launcher keeps this cluster's SSH control sockets (ray.autoscaler's command runner)."""
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    return Path("/tmp") / f"ray_ssh_{user}" / hashlib.sha256(cluster_name.encode()).hexdigest()[:10]


@pytest.mark.slow
def test_ray_up_submit_down_with_the_local_provider(
    head_over_ssh: Path, landsat: Path, landcover_model: Path
) -> None:
    base = head_over_ssh
    config, name = _render(base)
    control = _ssh_control_dir(name)
    control_parent_existed = control.parent.exists()
    ray = str(Path(sys.executable).parent / "ray")
    env = dict(os.environ)
    env.update(
        HOME=str(base / "c"),
        RAY_TMPDIR=str(base / "t"),
        TMPDIR=str(base / "tmp"),
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.pop("RAY_ADDRESS", None)

    def launcher(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=timeout)

    up = launcher("up", "-y", "--no-config-cache", str(config))
    cluster_pids: list[int] = []
    try:
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        cluster_pids = [
            pid for pid in processes_mentioning(str(base / "t")) if process_name(pid) not in ("ssh", "sshd")
        ]
        started = sorted(process_name(pid) for pid in cluster_pids)
        assert "gcs_server" in started and "raylet" in started, f"ray up started a head: {started}"
        out = base / "out"
        submit = launcher(
            "submit",
            str(config),
            str(ROOT / "infra" / "ray" / "segment_flow.py"),
            "--",
            str(landsat),
            "--model",
            str(landcover_model),
            "--out",
            str(out),
            "--work-dir",
            str(base / "work"),
            "--tile",
            "256",
            "--no-crf",
        )
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        report = json.loads((out / "RGB.byte" / "report.json").read_text())
        assert report["tiles"]["computed"] > 0
        assert report["cluster"]["nodes"], "the flow ran on the launched cluster's actors"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["runs"][-1]["outcome"] == "completed", manifest["runs"][-1]
    finally:
        down = launcher("down", "-y", str(config))
        shutil.rmtree(control, ignore_errors=True)
        if not control_parent_existed:
            with suppress(OSError):
                control.parent.rmdir()
    assert down.returncode == 0, down.stdout[-4000:] + down.stderr[-4000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and [pid for pid in cluster_pids if Path(f"/proc/{pid}").exists()]:
        time.sleep(0.5)
    left = {pid: process_name(pid) for pid in cluster_pids if Path(f"/proc/{pid}").exists()}
    assert not left, f"ray down stopped every process of the cluster: {left}"
