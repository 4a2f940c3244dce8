"""A Ray client in its own process (so that the cluster's token never enters the test process): it places
the engine's actor pools on the cluster, and on each line read from stdin refreshes them, waits until every
actor answers, and prints the nodes its actors live on and the nodes it saw lost, as one JSON line.

    python -m tests.pools_probe ADDRESS CHECKPOINT
"""

from __future__ import annotations

import json
import sys

import ray

from models.metadata import CRFParams
from pipeline.engine.workers import WindowSpec
from pipeline.ray.actor_pools import ActorPools

MARK = "pools: "  # the start of the probe's own lines


def main(address: str, checkpoint: str) -> None:
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    pools = ActorPools(ray, checkpoint, WindowSpec(crf=CRFParams(), input_max=255.0))
    try:
        for _ in sys.stdin:
            pools.refresh()
            ray.get([m.handle.peak_rss_mb.remote() for m in pools.members], timeout=300)
            nodes = sorted({m.node.node_id for m in pools.members})
            # marked: Ray prints its own lines (a lost node's heartbeats) on this process's stdout too
            print(MARK + json.dumps({"nodes": nodes, "lost": pools.stats.nodes_lost}), flush=True)
    finally:
        pools.close()
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
