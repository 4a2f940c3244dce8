"""What every benchmark's report shares: the machine it ran on, and the JSON and markdown files it writes."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from deeplab_common.atomic import write_text_atomically

REPORTS = Path(__file__).resolve().parent / "reports"


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}


def write_report(name: str, result: dict[str, Any], lines: list[str]) -> None:
    """``bench/reports/<name>.json`` (``result``) and ``<name>.md`` (``lines``), each written atomically."""
    REPORTS.mkdir(parents=True, exist_ok=True)
    write_text_atomically(REPORTS / f"{name}.json", json.dumps(result, indent=2))
    write_text_atomically(REPORTS / f"{name}.md", "\n".join(lines) + "\n")
