"""Check at start that every node of a cluster has what a run needs of it.

Actors get the checkpoint through Ray's object store (shipped once per node), and the driver alone reads
the staged windows and writes the ledger, so a node needs no shared filesystem. Each live node runs a
zero-CPU task pinned to it that receives the shipped checkpoint and hashes it. With a local ``--out``, a
driver resubmitted after a loss may run on another node and must find the work folder (staged zarr,
ledger) and the outputs there: then the task also reads a probe file the driver wrote in the work folder.
(A bucket ``--out`` keeps its work in the driver's own scratch folder and needs no such folder.) Any node
that cannot is named with what it could not see or get.
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


def sees(probe: str | None, token: str, checkpoint: bytes, checkpoint_sha256: str) -> list[str]:
    """On one node: what it cannot see or got changed (empty when it has everything the driver has)."""
    problems = []
    if probe is not None:
        try:
            if Path(probe).read_text() != token:
                problems.append(f"{Path(probe).parent} holds another probe (a different folder by that path)")
        except OSError as exc:
            problems.append(f"cannot read {Path(probe).parent}: {exc.strerror or exc}")
    digest = hashlib.sha256(checkpoint).hexdigest()
    if digest != checkpoint_sha256:
        problems.append(f"the shipped checkpoint arrived changed (sha256 {digest[:12]}...)")
    return problems


class StorageCheck:
    """Started before the actors, so that it runs while they load their models; ``result()`` raises naming
    each node that cannot see ``folder`` (None: no node needs it) or get the ``shipped`` checkpoint. A
    one-node cluster passes at once."""

    def __init__(
        self, ray: Any, folder: Path | None, shipped: Any, checkpoint_sha256: str, timeout_s: float = 120.0
    ) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.timeout_s = ray, timeout_s
        self.refs: dict[Any, NodeInfo] = {}
        self.probe: Path | None = None
        self.started = False
        nodes = live_nodes(ray)
        if len(nodes) < 2:
            return
        token = secrets.token_hex(16)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.probe = folder / f"{_PROBE}-{secrets.token_hex(4)}"
            self.probe.write_text(token)
        task = ray.remote(num_cpus=0, max_retries=0)(sees)
        probe = str(self.probe.resolve()) if self.probe is not None else None
        for node in nodes:
            pinned = task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
            )
            self.refs[pinned.remote(probe, token, shipped, checkpoint_sha256)] = node
        self.started = True

    def result(self) -> None:
        if not self.started:
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
            if self.probe is not None:
                self.probe.unlink(missing_ok=True)
            self.probe, self.started = None, False
        if problems:
            raise ClusterError(
                "every Ray node must get the checkpoint, and with a local --out see the work folder at the "
                "driver's path (put it on storage all nodes mount: NFS, EFS, Filestore, a shared volume; or "
                "write to a bucket, --out s3://...): " + "; ".join(problems)
            )
