"""One writer per output prefix in a bucket: a lock object with a lease.

A run creates ``<prefix>/.lock.json`` with a conditional write (If-None-Match), so of two runs only one
creates it. The holder renews the lease (If-Match on its own last version) well before it expires; a run
that finds the lock expired takes it over, again conditionally on the version it read, so of two
successors only one wins. A killed run therefore holds the prefix for at most one lease. A holder whose
renewal fails (a successor took over after it stalled past its lease) learns it at its next write and
stops, rather than write beside its successor.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from deeplab_common.errors import OutputBusy, OutputFolderError, UnreachableObject
from pipeline.io import objects

LOCK_OBJECT = ".lock.json"
LEASE_ENV = "DEEPLAB_LEASE_S"
LEASE_S = 60.0  # a dead run's lock is taken over this long after its last renewal (DEEPLAB_LEASE_S)
RENEWALS_PER_LEASE = 4
POLL_S = 1.0  # how often a waiting run looks again


class LeaseLost(OutputFolderError):
    """This run's lease on the output prefix was taken over: it stops before writing beside another run."""


class PrefixLease:
    """The lease on one prefix; ``hold`` it for the run, and ``check`` before each upload."""

    def __init__(self, prefix: str, lease_s: float | None = None) -> None:
        self.prefix = prefix.rstrip("/")
        self.url = f"{self.prefix}/{LOCK_OBJECT}"
        self.lease_s = lease_s or float(os.environ.get(LEASE_ENV, LEASE_S))
        self.owner = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "renewed": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
                "expires_unix": now + self.lease_s,
            }
        ).encode()

    def _try_take(self) -> str | None:
        """Take the lock if it is free or expired; otherwise the holder's description."""
        self._etag = objects.put_if(self.url, self._record(), None)
        if self._etag is not None:
            return None
        try:
            info = objects.head(self.url)
            held = json.loads(objects.get_bytes(self.url))
        except (UnreachableObject, ValueError):
            return "another run (its lock just changed)"  # released or renewed between our calls: look again
        if float(held.get("expires_unix", 0)) < time.time():
            self._etag = objects.put_if(self.url, self._record(), info.etag)  # a dead run's: take it over
            if self._etag is not None:
                return None
        return f"{held.get('owner', 'another run')}, renewed {held.get('renewed', '?')}"

    @contextmanager
    def hold(self, wait: bool, on_wait: Callable[[str], None] | None = None) -> Iterator[PrefixLease]:
        said = False
        while (holder := self._try_take()) is not None:
            if not wait:
                raise OutputBusy(
                    f"{self.prefix}: another run is writing here ({holder}); refused (--no-wait)"
                )
            if on_wait is not None and not said:
                on_wait(f"{self.prefix}: another run is writing here ({holder}); waiting for it")
                said = True
            time.sleep(POLL_S)
        renewer = threading.Thread(target=self._renew, name="deeplab-lease", daemon=True)
        renewer.start()
        try:
            yield self
        finally:
            self._stop.set()
            renewer.join()
            if self._lost is None:
                self._release()

    def check(self) -> None:
        """Raise if the lease was lost: no write may follow."""
        if self._lost is not None:
            raise LeaseLost(f"{self.prefix}: {self._lost}; this run stopped before writing beside it")

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / RENEWALS_PER_LEASE):
            try:
                etag = objects.put_if(self.url, self._record(), self._etag)
            except UnreachableObject:
                continue  # the store did not answer: try again before the lease runs out
            if etag is None:
                self._lost = "another run took over this run's lock (it was not renewed in time)"
                return
            self._etag = etag

    def _release(self) -> None:
        try:
            if objects.head(self.url).etag == self._etag:
                objects.delete(self.url)
        except UnreachableObject:
            pass  # gone already, or the store is away: the lease expires by itself
