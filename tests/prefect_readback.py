"""What the Prefect server holds, read back through the Prefect client; prints JSON.

Run in a subprocess with the server's environment (``PREFECT_API_URL``, ``PREFECT_HOME``), so that the
test process itself never configures Prefect: ``python tests/prefect_readback.py [FLOW_RUN_ID ...]``.
"""

from __future__ import annotations

import json
import sys
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)

DEPLOYMENTS = ("segment-scenes/nightly", "segment-scenes/on-demand")


def main(run_ids: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"deployments": {}, "runs": {}}
    with get_client(sync_client=True) as client:
        for name in DEPLOYMENTS:
            deployment = client.read_deployment_by_name(name)
            result["deployments"][name] = {
                "work_pool": deployment.work_pool_name,
                "parameters": deployment.parameters,
                "schedules": [
                    {
                        "cron": getattr(s.schedule, "cron", None),
                        "timezone": getattr(s.schedule, "timezone", None),
                        "active": s.active,
                    }
                    for s in deployment.schedules
                ],
            }
        for run_id in run_ids:
            run = client.read_flow_run(UUID(run_id))
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]))
            )
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)])))
            result["runs"][run_id] = {
                "logs": [log.message for log in logs],
                "state": run.state.type.value if run.state else None,
                "message": run.state.message if run.state else None,
                "artifacts": [{"key": a.key, "type": a.type, "data": a.data} for a in artifacts],
            }
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), default=str))
