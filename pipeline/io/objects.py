"""Object storage: which store a URL's object lies in (obstore), its HEAD, listings, its bytes, and the same
credentials handed to GDAL under GDAL's names.

One library serves every scheme: obstore (Rust's ``object_store``) speaks S3, GCS, Azure and plain HTTP
with one API, reads each cloud's standard variables itself, and has the conditional writes (If-None-Match,
If-Match) that an output lock needs. It also serves fsspec (``obstore.fsspec``), which is how tiffslide
reads a remote slide. GDAL reads the rasters themselves, with range requests, through its ``/vsis3/``-style
paths.

URLs are written as users write them: ``s3://bucket/key``, ``gs://bucket/key``, ``az://container/key``
(the account from ``AZURE_STORAGE_ACCOUNT_NAME``/``AZURE_STORAGE_ACCOUNT``), ``https://host/path``; GDAL's
own paths (``/vsis3/bucket/key``, ``/vsicurl/https://...``) are accepted and mean the same objects.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import obstore
from obstore import exceptions as store_errors
from obstore.store import AzureStore, GCSStore, HTTPStore, ObjectStore, S3Store

from deeplab_common.errors import ConfigError, UnreachableObject

if TYPE_CHECKING:  # obstore's config types exist for type checkers only
    from obstore.store import ClientConfig, RetryConfig, S3Config

# a remote failure is retried a bounded number of times: a nightly run must fail in minutes, not hang
MAX_RETRIES = 3
RETRY_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 10

_VSI_SCHEMES = {"/vsis3/": "s3", "/vsigs/": "gs", "/vsiaz/": "az"}
_SCHEME_VSI = {scheme: prefix for prefix, scheme in _VSI_SCHEMES.items()}
_AZURE_SCHEMES = frozenset({"az", "azure", "abfs", "abfss"})
OBJECT_SCHEMES = frozenset({"s3", "gs", "http", "https"}) | _AZURE_SCHEMES
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class ObjectUrl:
    """Where an object lies: the scheme, the bucket (container, or ``host`` for HTTP) and the key in it."""

    scheme: str
    bucket: str
    key: str

    @classmethod
    def parse(cls, text: str) -> ObjectUrl:
        """``s3://b/k``, ``/vsis3/b/k``, ``https://h/p`` or ``/vsicurl/https://h/p``; nothing else."""
        for prefix, scheme in _VSI_SCHEMES.items():
            if text.startswith(prefix):
                bucket, _, key = text[len(prefix) :].partition("/")
                return cls(scheme, bucket, key)
        if text.startswith("/vsicurl/"):
            text = text[len("/vsicurl/") :]
        parsed = urlparse(text)
        scheme = parsed.scheme.lower()
        if scheme not in OBJECT_SCHEMES or not parsed.netloc:
            raise ConfigError(
                f"{text}: not an object URL this project reads (s3://, gs://, az://, http(s)://, or GDAL's "
                "/vsis3/, /vsigs/, /vsiaz/, /vsicurl/)"
            )
        if scheme in _AZURE_SCHEMES:
            scheme = "az"
        return cls(scheme, parsed.netloc, parsed.path.lstrip("/"))

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    @property
    def base(self) -> str:
        """The store's root: the bucket (or the HTTP host)."""
        return f"{self.scheme}://{self.bucket}"

    @property
    def gdal_path(self) -> str:
        """The same object as GDAL names it."""
        if self.scheme in {"http", "https"}:
            return f"/vsicurl/{self.url}"
        return f"{_SCHEME_VSI[self.scheme]}{self.bucket}/{self.key}"

    def child(self, key: str) -> ObjectUrl:
        return ObjectUrl(self.scheme, self.bucket, key)


def object_url(text: object) -> ObjectUrl | None:
    """The object ``text`` names; None for a local path, or a GDAL path such as ``/vsizip/``."""
    if not isinstance(text, str):
        return None
    try:
        return ObjectUrl.parse(text)
    except ConfigError:
        return None


def is_object_url(text: object) -> bool:
    return object_url(text) is not None


@dataclass(frozen=True, kw_only=True)
class ObjectInfo:
    """One HEAD's answer: enough to tell a changed object from an unchanged one without reading it."""

    url: str
    size: int
    etag: str | None
    version: str | None
    last_modified: str

    @property
    def identity(self) -> str:
        """The object's identity in a result key: a new upload has a new ETag (or version id), so a replaced
        object is never taken for the old one; a server with neither gives its last-modified time."""
        if self.version:
            return f"version:{self.version};size:{self.size}"
        if self.etag:
            return f"etag:{self.etag.strip(chr(34))};size:{self.size}"
        return f"modified:{self.last_modified};size:{self.size}"


def _anonymous() -> bool:
    return os.environ.get("AWS_NO_SIGN_REQUEST", "").upper() in {"YES", "TRUE", "1"}


def _env(*names: str) -> str | None:
    return next((os.environ[name] for name in names if os.environ.get(name)), None)


def _client_options(url: ObjectUrl) -> ClientConfig:
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if url.scheme == "s3" else None
    plain_http = url.scheme == "http" or (endpoint or "").startswith("http://")
    return {
        "allow_http": plain_http,
        "timeout": timedelta(seconds=REQUEST_TIMEOUT_S),
        "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT_S),
    }


def _retry() -> RetryConfig:
    return {
        "max_retries": MAX_RETRIES,
        "retry_timeout": timedelta(seconds=RETRY_TIMEOUT_S),
        "backoff": {
            "init_backoff": timedelta(milliseconds=200),
            "max_backoff": timedelta(seconds=5),
            "base": 2,
        },
    }


@cache
def _store(scheme: str, bucket: str, environment: tuple[tuple[str, str], ...]) -> ObjectStore:
    """One client per bucket and environment (each reads the cloud's own variables when built)."""
    url = ObjectUrl(scheme, bucket, "")
    options, retry = _client_options(url), _retry()
    if scheme == "s3":
        config: S3Config = {}
        if _anonymous():
            config["skip_signature"] = True  # GDAL's name for an anonymous bucket, in obstore's words
        provider = _aws_profile_provider()
        return S3Store(
            bucket, config=config, client_options=options, retry_config=retry, credential_provider=provider
        )
    if scheme == "gs":
        return GCSStore(bucket, client_options=options, retry_config=retry)
    if scheme == "az":
        account = _env("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT")
        if account is None:
            raise ConfigError(f"az://{bucket}: set AZURE_STORAGE_ACCOUNT_NAME to the storage account's name")
        return AzureStore(bucket, account_name=account, client_options=options, retry_config=retry)
    return HTTPStore.from_url(url.base, client_options=options, retry_config=retry)


def _aws_profile_provider() -> Any:
    """A named profile (``AWS_PROFILE``) through boto3, which reads ``~/.aws`` as the AWS CLI does; without
    one obstore takes the credentials from ``AWS_*`` variables, web identity or the instance's role."""
    if not os.environ.get("AWS_PROFILE") or os.environ.get("AWS_ACCESS_KEY_ID"):
        return None
    try:
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise ConfigError(
            "AWS_PROFILE is set: reading a named profile needs boto3 (pip install boto3)"
        ) from None
    return Boto3CredentialProvider()


_CLOUD_VARIABLES = re.compile(r"^(AWS|GOOGLE|AZURE)_")


def store_for(url: ObjectUrl) -> ObjectStore:
    environment = tuple(sorted((k, v) for k, v in os.environ.items() if _CLOUD_VARIABLES.match(k)))
    return _store(url.scheme, url.bucket, environment)


def describe_failure(url: str, error: Exception) -> str:
    """What went wrong remotely, said plainly (the store's own text follows in brackets)."""
    detail = str(error).splitlines()[0][:200]
    if isinstance(error, store_errors.NotFoundError):
        return f"{url}: no such object"
    if isinstance(error, store_errors.PermissionDeniedError):
        if _anonymous():
            return f"{url}: access denied to an anonymous request (AWS_NO_SIGN_REQUEST is set) [{detail}]"
        return f"{url}: access denied (no credentials accepted for it, or they may not read it) [{detail}]"
    if isinstance(error, store_errors.UnauthenticatedError):
        return f"{url}: the store refused the credentials (none found, or wrong) [{detail}]"
    text = str(error)
    if "403" in text or "AccessDenied" in text or "SignatureDoesNotMatch" in text:
        return f"{url}: access denied or credentials refused (HTTP 403) [{detail}]"
    if "404" in text:
        return f"{url}: no such object"
    if "timed out" in text.lower() or "timeout" in text.lower() or "connect" in text.lower():
        return f"{url}: the store did not answer ({MAX_RETRIES} retries) [{detail}]"
    return f"{url}: cannot be read [{detail}]"


def _unreachable(url: str, error: Exception) -> UnreachableObject:
    return UnreachableObject(describe_failure(url, error))


def head(text: str) -> ObjectInfo:
    """One HEAD request: the object's size and ETag/version."""
    url = ObjectUrl.parse(text)
    try:
        meta = obstore.head(store_for(url), url.key)
    except Exception as error:
        raise _unreachable(text, error) from None
    return _info(text, meta)


def _info(url: str, meta: Any) -> ObjectInfo:
    """A HEAD's or a listing's metadata of the object at ``url``."""
    return ObjectInfo(
        url=url,
        size=int(meta["size"]),
        etag=meta.get("e_tag"),
        version=meta.get("version"),
        last_modified=meta["last_modified"].isoformat(),
    )


def sha256(text: str) -> str:
    """The sha256 of the object's whole content, streamed (``--verify-inputs`` only: it reads every byte)."""
    url = ObjectUrl.parse(text)
    digest = hashlib.sha256()
    try:
        for chunk in obstore.get(store_for(url), url.key).stream(min_chunk_size=1 << 20):
            digest.update(chunk)
    except Exception as error:
        raise _unreachable(text, error) from None
    return digest.hexdigest()


def is_listing(text: str) -> bool:
    """A prefix (``s3://b/incoming/``) or a glob (``s3://b/**/*.tif``): listed, not read as one object."""
    path = ObjectUrl.parse(text).key
    return path.endswith("/") or path == "" or bool(_GLOB_CHARS & set(path))


def list_objects(text: str) -> Iterator[str]:
    """The objects directly under a prefix (as a folder's files), or matching a glob (``*`` within a folder,
    ``**`` across folders), as URLs in the form the listing was given in."""
    url = ObjectUrl.parse(text)
    pattern = url.key if _GLOB_CHARS & set(url.key) else f"{url.key}*"
    literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    prefix = literal if pattern == literal else literal[: literal.rfind("/") + 1]
    matches = _glob_regex(pattern) if pattern != literal else None
    try:
        for batch in obstore.list(store_for(url), prefix=prefix or None):
            for meta in batch:
                key = meta["path"]
                if matches is None or matches.fullmatch(key):
                    yield _as_given(text, url.child(key))
    except UnreachableObject:
        raise
    except Exception as error:
        raise _unreachable(text, error) from None


def _as_given(given: str, url: ObjectUrl) -> str:
    """A listed object named as the listing was (a ``/vsis3/`` listing gives ``/vsis3/`` paths)."""
    return url.gdal_path if given.startswith("/vsi") else url.url


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``**/`` spans any folders (none included), ``*`` and ``?`` stay within one, ``[...]`` as in fnmatch."""
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
    out = []
    for part in parts:
        if part == "**/":
            out.append(r"(?:[^/]+/)*")
        elif part == "**":
            out.append(r".*")
        elif part == "*":
            out.append(r"[^/]*")
        elif part == "?":
            out.append(r"[^/]")
        else:
            out.append(fnmatch.translate(part).removeprefix("(?s:").removesuffix(r")\Z"))
    return re.compile("".join(out))


def gdal_options() -> dict[str, str]:
    """GDAL's configuration for remote reads: each cloud's standard variables under GDAL's names where they
    differ (the rest GDAL reads itself), bounded retries and timeouts."""
    options = {
        "GDAL_HTTP_MAX_RETRY": str(MAX_RETRIES),
        "GDAL_HTTP_RETRY_DELAY": "1",
        "GDAL_HTTP_TIMEOUT": str(REQUEST_TIMEOUT_S),
        "GDAL_HTTP_CONNECTTIMEOUT": str(CONNECT_TIMEOUT_S),
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MULTIPLEX": "YES",
    }
    if endpoint := _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        parsed = urlparse(endpoint)
        options |= {
            "AWS_S3_ENDPOINT": parsed.netloc + parsed.path.rstrip("/"),
            "AWS_HTTPS": "NO" if parsed.scheme == "http" else "YES",
            "AWS_VIRTUAL_HOSTING": "FALSE",  # an S3-API server at an address is addressed by path
        }
    if account := _env("AZURE_STORAGE_ACCOUNT_NAME"):
        options["AZURE_STORAGE_ACCOUNT"] = account
    if key := _env("AZURE_STORAGE_ACCOUNT_KEY"):
        options["AZURE_STORAGE_ACCESS_KEY"] = key
    return options


def fsspec_url(text: str) -> tuple[str, dict[str, Any]]:
    """The URL and storage options with which fsspec (through obstore) opens the object: for tiffslide."""
    from obstore.fsspec import register

    url = ObjectUrl.parse(text)
    register(url.scheme)
    return url.url, {"client_options": _client_options(url), "retry_config": _retry()}


def list_tree(text: str) -> dict[str, ObjectInfo]:
    """Every object under a prefix, at any depth, by its key relative to the prefix (paged listings: one
    request per thousand objects)."""
    url = ObjectUrl.parse(text)
    prefix = url.key.rstrip("/") + "/" if url.key.strip("/") else ""
    found: dict[str, ObjectInfo] = {}
    try:
        for batch in obstore.list(store_for(url), prefix=prefix or None):
            for meta in batch:
                found[meta["path"][len(prefix) :]] = _info(url.child(meta["path"]).url, meta)
    except Exception as error:
        raise _unreachable(text, error) from None
    return found


def get_bytes(text: str) -> bytes:
    url = ObjectUrl.parse(text)
    try:
        return bytes(obstore.get(store_for(url), url.key).bytes())
    except Exception as error:
        raise _unreachable(text, error) from None


def put_file(text: str, path: Path) -> str | None:
    """Upload a local file (multipart when large: obstore splits it); its new ETag."""
    url = ObjectUrl.parse(text)
    try:
        with open(path, "rb") as handle:
            result = obstore.put(store_for(url), url.key, handle)
    except Exception as error:
        raise _unreachable(text, error) from None
    return result.get("e_tag")


def delete(text: str) -> None:
    url = ObjectUrl.parse(text)
    try:
        obstore.delete(store_for(url), url.key)
    except Exception as error:
        raise _unreachable(text, error) from None


def put_if(text: str, data: bytes, etag: str | None) -> str | None:
    """A conditional write: create the object only if it does not exist (``etag`` None: If-None-Match), or
    replace it only if it is still the version with ``etag`` (If-Match). The new ETag, or None when the
    condition failed (someone else wrote first)."""
    url = ObjectUrl.parse(text)
    mode: Any = "create" if etag is None else {"e_tag": etag}
    try:
        result = obstore.put(store_for(url), url.key, data, mode=mode)
    except (store_errors.AlreadyExistsError, store_errors.PreconditionError):
        return None
    except Exception as error:
        raise _unreachable(text, error) from None
    return str(result["e_tag"])
