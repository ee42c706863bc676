"""Files under a root that is either a local folder or an ``s3://bucket/prefix``.

Every stage reads and writes through :class:`Storage`, so the same code runs on a laptop
(folders) and in the cluster (S3). Both implementations are picklable because they are sent
to worker processes, and every failure is a :class:`StorageError` whose message names the
location, the problem and the fix, without ever including a secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from drseg import atomic
from drseg.config import StorageSettings
from drseg.errors import UserError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}
_CREDENTIAL_FIX = (
    "storage.access_key_id / storage.secret_access_key "
    "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
)


_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"<>]+@")
_URL_SECRET_QUERY = re.compile(
    r"([?&;][\w.-]*(?:password|token|secret|signature|credential|key|sig)[\w.-]*=)[^&#\s'\"]+",
    re.IGNORECASE,
)


def _redact(text: str) -> str:
    """Credentials inside URLs (``http://KEY:SECRET@host``, ``?X-Amz-Signature=...``) as ***.

    Local stand-in until drseg.secrets (the shared redaction) is on main: then call its
    `redact` here instead.
    """
    return _URL_SECRET_QUERY.sub(r"\1***", _URL_USERINFO.sub(r"\1***@", text))


class StorageError(UserError, RuntimeError):
    """Message names the URL, the problem and the fix; credentials in URLs are masked."""

    def __init__(self, message: str) -> None:
        super().__init__(_redact(message))


class Storage(Protocol):
    """A root (``url``) holding files; keys are relative POSIX paths under it."""

    url: str

    def list_files(self) -> list[str]: ...
    def stamps(self) -> dict[str, str]:
        """Key -> a stamp that changes whenever the file's content does."""
        ...

    def read_bytes(self, key: str) -> bytes: ...
    def size(self, key: str) -> int: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def describe(self, key: str) -> str: ...


class LocalStorage:
    """A local folder; keys are POSIX paths relative to it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def describe(self, key: str) -> str:
        return str(self._path(key))

    def list_files(self) -> list[str]:
        return sorted(self.stamps())

    def stamps(self) -> dict[str, str]:
        """Size and modification time: any write changes them (atomic writes included)."""
        if not self.root.is_dir():
            raise StorageError(f"{self.root}: no such folder; check the path or create it")
        stamps = {}
        for path in self.root.rglob("*"):
            if path.is_file():
                stat = path.stat()
                key = path.relative_to(self.root).as_posix()
                stamps[key] = f"{stat.st_size}:{stat.st_mtime_ns}"
        return stamps

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with _local_errors(path):
            return path.read_bytes()

    def size(self, key: str) -> int:
        path = self._path(key)
        with _local_errors(path):
            return path.stat().st_size

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with _local_errors(path):
            atomic.write_bytes(path, data)  # temp file next to the target, then os.replace

    def _path(self, key: str) -> Path:
        # Keys may come from a remote listing: never let one escape the root.
        parts = PurePosixPath(key).parts
        if not parts or parts[0] == "/" or ".." in parts:
            raise StorageError(f"{key!r}: not a relative key inside {self.root}")
        return self.root.joinpath(*parts)


@contextmanager
def _local_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise StorageError(f"{path}: no such file; check the path") from exc
    except OSError as exc:
        raise StorageError(f"{path}: {exc.strerror or exc}") from exc


class S3Storage:
    """An ``s3://bucket/prefix``; the boto3 client is made lazily in each process."""

    def __init__(self, url: str, settings: StorageSettings | None = None) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"{url}: no bucket in the URL; use s3://bucket[/prefix]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.settings = settings or StorageSettings()
        self._client: S3Client | None = None

    def __getstate__(self) -> dict[str, Any]:
        # boto3 clients hold sockets and locks: each process makes its own.
        return {**self.__dict__, "_client": None}

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def list_files(self) -> list[str]:
        return sorted(self.stamps())

    def stamps(self) -> dict[str, str]:
        """The ETag and size from the listing itself: no request per object."""
        start = f"{self.prefix}/" if self.prefix else ""
        stamps = {}
        with self._errors():
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            )
            for page in pages:
                for entry in page.get("Contents", []):
                    key = entry["Key"][len(start) :]
                    if key and not key.endswith("/"):
                        stamps[key] = f"{entry['Size']}:{entry['ETag']}"
        return stamps

    def read_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def size(self, key: str) -> int:
        with self._errors(key):
            try:
                return self._s3.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "404":
                    raise
                # A HEAD reply has no body, so no error code: ask whether the bucket exists.
                with self._errors():
                    self._s3.head_bucket(Bucket=self.bucket)
                raise StorageError(f"{self.describe(key)}: no such object") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def _s3(self) -> S3Client:
        if self._client is None:
            s = self.settings
            config = Config(
                connect_timeout=5,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"} if s.endpoint_url else None,
            )
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=s.endpoint_url,
                region_name=s.region,
                aws_access_key_id=s.access_key_id.get_secret_value() if s.access_key_id else None,
                aws_secret_access_key=(
                    s.secret_access_key.get_secret_value() if s.secret_access_key else None
                ),
                config=config,
            )
        return self._client

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Turn boto3's exceptions into a StorageError that says what to fix. The boto3
        exception is kept as the cause only when it shows no credentials (its text often
        holds the endpoint URL, user information included)."""
        try:
            with self._translated(key):
                yield
        except StorageError as exc:
            cause = exc.__cause__
            if cause is not None and _redact(str(cause)) != str(cause):
                raise StorageError(str(exc)) from None
            raise

    @contextmanager
    def _translated(self, key: str | None) -> Iterator[None]:
        where = self.url if key is None else self.describe(key)
        endpoint = self.settings.endpoint_url or "the default AWS endpoint"
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StorageError(f"{where}: no S3 credentials found: set {_CREDENTIAL_FIX}") from exc
        except BotoConnectionError as exc:
            raise StorageError(
                f"{where}: cannot reach S3 endpoint {endpoint}: "
                "is the server running / storage.endpoint_url right?"
            ) from exc
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _CREDENTIAL_CODES:
                message = (
                    f"S3 rejected the credentials for {where} ({code}): check {_CREDENTIAL_FIX}"
                )
            elif code == "NoSuchBucket" or (code == "404" and key is None):
                message = (
                    f"bucket '{self.bucket}' does not exist at {endpoint}: create it or fix the URL"
                )
            elif code == "NoSuchKey":
                message = f"{where}: no such object"
            else:
                message = f"{where}: S3 error {code}: {exc.response['Error'].get('Message', '')}"
            raise StorageError(message) from exc
        except BotoCoreError as exc:
            raise StorageError(f"{where}: S3 request failed: {exc}") from exc


def is_remote(url: str | Path) -> bool:
    return isinstance(url, str) and url.startswith("s3://")


def open_storage(url: str | Path, settings: StorageSettings | None = None) -> Storage:
    """``s3://bucket[/prefix]`` opens S3; anything else is a local folder."""
    if is_remote(url):
        return S3Storage(str(url), settings)
    if isinstance(url, str) and "://" in url:
        raise StorageError(f"{url}: unsupported URL; use a local path or s3://bucket[/prefix]")
    return LocalStorage(url)


def _copy(source: Storage, target: Storage) -> int:
    keys = source.list_files()
    for key in keys:
        target.write_bytes(key, source.read_bytes(key))
    return len(keys)


def upload_tree(local_dir: Path, url: str, settings: StorageSettings | None = None) -> int:
    """Copy every file under ``local_dir`` to ``url``; returns the number of files."""
    return _copy(LocalStorage(local_dir), open_storage(url, settings))


def download_tree(url: str, local_dir: Path, settings: StorageSettings | None = None) -> int:
    """Copy every file under ``url`` into ``local_dir`` (each file atomically)."""
    return _copy(open_storage(url, settings), LocalStorage(local_dir))
