"""A scene's failure: the one line a run prints, and the full traceback in the scene's log under ``--out``.

Ray hands a remote exception back wrapped (``RayTaskError``), its message the whole remote traceback with
terminal colour codes; the line is built from the exception the task raised, the log keeps everything.
"""

from __future__ import annotations

import re
import traceback
from datetime import UTC, datetime
from pathlib import Path

from deeplab_common.errors import DataError, DeepLabError
from pipeline.engine.outdir import inside
from pipeline.io.sources import Source, scene_id_problem, source_id

LOG_FOLDER = ".logs"  # under --out: one append-only log per scene id
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def root_cause(error: BaseException) -> BaseException:
    """The exception a Ray task or actor method raised, unwrapped from Ray's ``RayTaskError`` (nested when
    one task's failure passed through another); any other exception as it is."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if not (_is_ray_task_error(error) and isinstance(cause, BaseException)):
            break
        error = cause
    return error


def _is_ray_task_error(error: BaseException) -> bool:
    return any(kind.__name__ == "RayTaskError" for kind in type(error).__mro__)


def plain(text: str) -> str:
    """Without terminal colour codes."""
    return _ANSI.sub("", text)


def failure_line(source: Source, stage: str, error: BaseException) -> str:
    """What a failed scene prints instead of a traceback: the project's errors name the file and each
    problem already; any other exception (a library's, a lost node's) becomes one line naming the scene, the
    stage it broke in and the exception's first line."""
    error = root_cause(error)
    text = plain(str(error)).strip()
    if isinstance(error, DeepLabError) and str(source) in text:
        return text  # a preflight that finds several problems gives a line each, each naming the file
    first = text.splitlines()[0] if text else "(no message)"
    cause = first if isinstance(error, DeepLabError) else f"{type(error).__name__}: {first}"
    return f"{source}: {stage} failed: {cause}"


def log_path(out_dir: Path, source: Source) -> Path | None:
    """The scene's log file, None for a scene whose id cannot name a file (it is refused before any work)."""
    if scene_id_problem(source) is not None:
        return None
    return Path(out_dir) / LOG_FOLDER / f"{source_id(source)}.log"


def log_failure(out_dir: Path, source: Source, stage: str, error: BaseException) -> Path | None:
    """Append the failure (when, stage, line, the full traceback, remote part included) to the scene's log;
    returns the log's path, or None where it could not be written (the line alone must still reach the
    user: a full disk is one of the failures this records)."""
    path = log_path(out_dir, source)
    if path is None:
        return None  # no id to name a log by: the line alone
    try:
        inside(out_dir, path)  # a .logs link pointing out of --out gets no write either
    except DataError:
        return None
    when = datetime.now(UTC).isoformat(timespec="seconds")
    details = "".join(traceback.format_exception(error))
    entry = f"== {when} {stage} failed\n{failure_line(source, stage, error)}\n{plain(details)}\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as log:
            log.write(entry)
    except OSError:
        return None
    return path
