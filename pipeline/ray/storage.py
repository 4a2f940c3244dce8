"""Check at start that every node of a cluster sees the storage a run needs.

Actors load the checkpoint from its path, and a driver resubmitted after a loss may run on another node and
must find the work folder (staged zarr, ledger) and the outputs there: both must be on storage every node
mounts. Each live node runs a zero-CPU task pinned to it that reads a probe file the driver wrote and
hashes the checkpoint; any node that cannot is named with what it could not see.
"""

from __future__ import annotations

import hashlib
import secrets
from contextlib import suppress
from pathlib import Path
from typing import Any

from deeplab_common.errors import ClusterError
from pipeline.ray.actor_pools import NodeInfo, live_nodes, lost_work_errors

_PROBE = ".deeplab-storage-probe"


def sees(probe: str, token: str, checkpoint: str, checkpoint_sha256: str) -> list[str]:
    """On one node: what it cannot see (empty when it sees everything as the driver does)."""
    problems = []
    try:
        if Path(probe).read_text() != token:
            problems.append(f"{Path(probe).parent} holds another probe (a different folder by that path)")
    except OSError as exc:
        problems.append(f"cannot read {Path(probe).parent}: {exc.strerror or exc}")
    try:
        digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
        if digest != checkpoint_sha256:
            problems.append(f"{checkpoint} differs from the driver's (sha256 {digest[:12]}...)")
    except OSError as exc:
        problems.append(f"cannot read {checkpoint}: {exc.strerror or exc}")
    return problems


class StorageCheck:
    """Started before the actors, so that it runs while they load their models; ``result()`` raises naming
    each node that cannot see ``folder`` or ``checkpoint``. A one-node cluster passes at once."""

    def __init__(
        self, ray: Any, folder: Path, checkpoint: Path, checkpoint_sha256: str, timeout_s: float = 120.0
    ) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.timeout_s = ray, timeout_s
        self.refs: dict[Any, NodeInfo] = {}
        self.probe: Path | None = None
        nodes = live_nodes(ray)
        if len(nodes) < 2:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.probe = folder / f"{_PROBE}-{secrets.token_hex(4)}"
        token = secrets.token_hex(16)
        self.probe.write_text(token)
        task = ray.remote(num_cpus=0, max_retries=0)(sees)
        for node in nodes:
            pinned = task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
            )
            ref = pinned.remote(
                str(self.probe.resolve()), token, str(checkpoint.resolve()), checkpoint_sha256
            )
            self.refs[ref] = node

    def result(self) -> None:
        if self.probe is None:
            return
        try:
            ready, late = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=self.timeout_s)
            problems = []
            for ref in ready:
                with suppress(*lost_work_errors(self.ray)):  # a node that died meanwhile: no storage fault
                    problems += [f"node {self.refs[ref].label}: {p}" for p in self.ray.get(ref)]
            problems += [
                f"node {self.refs[ref].label}: no answer within {self.timeout_s:.0f} s" for ref in late
            ]
        finally:
            self.probe.unlink(missing_ok=True)
            self.probe = None
        if problems:
            raise ClusterError(
                "every Ray node must see the work folder and the checkpoint at the driver's paths "
                "(put them on storage all nodes mount: NFS, EFS, Filestore, a shared volume): "
                + "; ".join(problems)
            )
