"""Run the segment-scenes Prefect flow on the Ray cluster this script runs on (the head, via `ray submit`).

    ray submit infra/ray/local.yaml infra/ray/segment_flow.py -- SCENES... --model M --out DIR [options]

The same arguments as `deeplab run-flow`; the flow joins this cluster (``RAY_ADDRESS``, else ``auto``: the
cluster started on this machine) and reports to ``PREFECT_API_URL`` if set, else to a Prefect server it
starts on the head for the run (SQLite under ``--work-dir``).
"""

from __future__ import annotations

import os
import sys

from flows.cli import main


def flow_arguments(argv: list[str]) -> list[str]:
    if "--ray-address" not in argv:
        argv = [*argv, "--ray-address", os.environ.get("RAY_ADDRESS", "auto")]
    return ["run-flow", *argv]


if __name__ == "__main__":
    sys.exit(main(flow_arguments(sys.argv[1:])))
