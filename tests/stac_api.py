"""A real STAC API for the tests: stac-fastapi-pgstac over pgstac, on Debian's PostgreSQL with PostGIS, each
started by the test on loopback (a throwaway cluster in a temporary folder, its own free ports)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.s3_server import free_port, wait_until_answers

POSTGIS_HINT = "apt-get install postgresql postgresql-postgis (.ci/run does)"


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL binaries, when PostgreSQL and PostGIS are installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found or not glob.glob("/usr/share/postgresql/*/extension/postgis.control"):
        return None
    return Path(found[-1]).parent


def _as_postgres(command: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: as root, run them as Debian's ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass(frozen=True)
class StacApi:
    url: str
    dsn: str

    def load(self, collection: dict[str, Any], items: list[dict[str, Any]]) -> None:
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        with PgstacDB(dsn=self.dsn) as db:
            loader = Loader(db=db)
            loader.load_collections(iter([collection]), Methods.upsert)
            loader.load_items(iter(items), Methods.upsert)


@contextmanager
def stac_api(log_folder: Path) -> Iterator[StacApi]:
    """PostgreSQL (with pgstac migrated in) and stac-fastapi-pgstac, until the block ends."""
    binaries = postgres_bin()
    if binaries is None:
        raise RuntimeError(f"PostgreSQL with PostGIS is not installed: {POSTGIS_HINT}")
    data = Path(tempfile.mkdtemp(prefix="deeplab-pgstac-"))  # owned by postgres when run as root
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
    port, api_port = free_port(), free_port()
    server: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            _as_postgres(
                [str(binaries / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust"]
            ),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            _as_postgres(
                [
                    str(binaries / "pg_ctl"),
                    "-D",
                    str(data / "db"),
                    "-l",
                    str(data / "postgres.log"),
                    "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        from pypgstac.db import PgstacDB
        from pypgstac.migrate import Migrate

        with PgstacDB(dsn=dsn) as db:
            Migrate(db).run_migration()
        environment = os.environ | {
            "PGUSER": "postgres",
            "PGPASSWORD": "unused",  # trust authentication on loopback
            "PGHOST": "127.0.0.1",
            "PGPORT": str(port),
            "PGDATABASE": "postgres",
        }
        with open(log_folder / "stac-fastapi.log", "wb") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "stac_fastapi.pgstac.app:create_app",
                    "--factory",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(api_port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )
        url = f"http://127.0.0.1:{api_port}"
        wait_until_answers(f"{url}/_mgmt/ping", server, log_folder / "stac-fastapi.log")
        yield StacApi(url, dsn)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=20)
        subprocess.run(
            _as_postgres([str(binaries / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(data, ignore_errors=True)
