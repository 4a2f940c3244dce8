"""A real S3-API server for the tests: moto's server (``moto_server``) in its own process on a free loopback
port, with the variables a user's run reads (``AWS_ENDPOINT_URL``, keys, region) to reach it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import obstore
from obstore.store import S3Store

KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]
    bucket: str = ""  # the current test's bucket (tests/conftest.py: s3)

    @property
    def environment(self) -> dict[str, str]:
        """What a client needs to reach this server, as a user sets it for their own endpoint."""
        return KEYS | {"AWS_ENDPOINT_URL": self.endpoint}

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()  # moto accepts an unsigned CreateBucket
        return f"s3://{name}"

    def store(self, bucket: str) -> S3Store:
        return S3Store(
            bucket,
            config={
                "endpoint": self.endpoint,
                "access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
                "secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
                "region": KEYS["AWS_REGION"],
            },
            client_options={"allow_http": True},
        )

    def upload(self, bucket: str, key: str, path: Path) -> str:
        obstore.put(self.store(bucket), key, path.read_bytes())
        return f"s3://{bucket}/{key}"


@contextmanager
def s3_server(log: Path, unauthenticated_actions: int | None = None) -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port until the block ends. With ``unauthenticated_actions``,
    the server checks credentials after that many requests (moto's IAM knows no key: every signed request
    is then refused with 403, as is an anonymous one)."""
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    port = free_port()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=os.environ
            | {"MOTO_ALLOW_NONEXISTENT_REGION": "true"}
            | (
                {"INITIAL_NO_AUTH_ACTION_COUNT": str(unauthenticated_actions)}
                if unauthenticated_actions is not None
                else {}
            ),
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{endpoint}/moto-api/", process, log)
        yield S3Server(endpoint, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_answers(url: str, process: subprocess.Popen[bytes], log: Path, seconds: float = 60) -> None:
    """Until a server this test started answers ``url``; its log's end if it exits or stays silent."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s: {log.read_text()[-2000:]}")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    ranged: bool  # a GET with a Range header (a part of an object), not the whole of it
    status: int
    body_bytes: int  # response body bytes sent to the client


class CountingProxy:
    """A loopback HTTP proxy in front of the S3 server that records every request and the bytes it answered
    with: what a client costs the store, counted on the server's side of the wire."""

    def __init__(self, target: str, die_when: Callable[[str, str], bool] | None = None) -> None:
        """``die_when(method, path)``: the proxy stops listening at the first request it holds true for, and
        drops that request unanswered, as a store that dies mid-run does (the tests' "server dies" case)."""
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        self.requests: list[Request] = []
        self._lock = threading.Lock()
        upstream = urlparse(target)
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                if die_when is not None and die_when(self.command, self.path):
                    self.close_connection = True
                    threading.Thread(target=proxy.close, daemon=True).start()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                connection = http.client.HTTPConnection(
                    upstream.hostname or "127.0.0.1", upstream.port, timeout=60
                )
                connection.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = connection.getresponse()
                data = b"" if self.command == "HEAD" else answer.read()
                self.send_response(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                length_header = answer.getheader("Content-Length")
                self.send_header(
                    "Content-Length",
                    length_header if self.command == "HEAD" and length_header else str(len(data)),
                )
                self.end_headers()
                if data:
                    self.wfile.write(data)
                connection.close()
                with proxy._lock:
                    proxy.requests.append(
                        Request(self.command, self.path, "Range" in self.headers, answer.status, len(data))
                    )

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, format: str, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> list[Request]:
        with self._lock:
            taken, self.requests = self.requests, []
        return taken

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
