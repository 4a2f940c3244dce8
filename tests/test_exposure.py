"""The engine's local Ray cluster is closed by default: every port on loopback, token auth enforced."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from pipeline.engine.outdir import RAY_OWNER
from pipeline.ray.session import ray_session


def _pid() -> int:
    return os.getpid()


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _listening(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket of these processes."""
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for connection in process.net_connections(kind="inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.append((pid, process.name(), connection.laddr.ip, connection.laddr.port))
        except psutil.Error:
            continue  # a worker that exited meanwhile
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def _client(address: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A separate driver that tries to join the cluster and run one task."""
    script = textwrap.dedent(
        f"""
        import ray
        ray.init(address={address!r}, log_to_driver=False)
        def one():
            return 1
        print("joined", ray.get(ray.remote(one).remote()))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_engine_cluster_listens_on_loopback_only_and_refuses_clients_without_its_token(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a user's RAY_AUTH_MODE=disabled is overridden, loudly: the cluster keeps its token
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    work = tmp_path_factory.mktemp("ex")
    already = (
        _children()
    )  # processes this test did not start (another fixture's cluster, say) are not its own
    with pytest.warns(UserWarning, match="RAY_AUTH_MODE=disabled is ignored"):
        session = ray_session(work / ".work", num_cpus=2)
        ray = session.__enter__()
    try:
        assert ray.get([ray.remote(_pid).remote() for _ in range(4)])  # workers up, listening
        temp_dir = Path(ray._private.worker._global_node.get_temp_dir_path())
        # the run's own Ray temp dir: under its work folder, or (a path too long for Ray's sockets) in the
        # system's temp dir, with its owner recorded for a later run's clean-up
        owner = temp_dir / RAY_OWNER
        assert temp_dir.is_relative_to(work) or owner.read_text().startswith(f"{work}\n{os.getpid()}")
        started = (_children() - already) | {os.getpid()}
        sockets = _listening(started)
        assert len(sockets) >= 5, sockets  # GCS, raylet, object manager, agents, workers
        exposed = [entry for entry in sockets if not _is_loopback(entry[2])]
        assert not exposed, f"Ray processes listening beyond loopback: {exposed}"

        address = ray.get_runtime_context().gcs_address
        # clients on this machine, reaching the cluster on loopback (as the engine's driver does)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        token = env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp_dir / "auth_token")}
        assert "joined 1" in _client(address, token).stdout, "the run's own token joins"
        refused = _client(address, env | {"RAY_AUTH_MODE": "disabled"})  # a client without the token
        assert refused.returncode != 0 and "joined" not in refused.stdout
        assert "InvalidAuthToken" in refused.stderr, refused.stderr[-2000:]
    finally:
        session.__exit__(None, None, None)
    assert not temp_dir.exists(), "the run's Ray temp dir is removed with its session"
