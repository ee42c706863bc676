"""S3Storage against a real SeaweedFS server on 127.0.0.1 (signatures are checked)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import SecretStr

from drseg.config import StorageSettings
from drseg.data.storage import S3Storage, StorageError, download_tree, open_storage, upload_tree
from tests.integration.s3_server import S3Server

pytestmark = pytest.mark.integration

SPACED_KEY = "A. Segmentation/1. Original Images/x.jpg"


def _read_in_worker(storage: S3Storage, key: str) -> bytes:
    return storage.read_bytes(key)


def test_round_trip_bytes_size_and_list(s3_server: S3Server, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/run 1/", s3_server.settings())
    big = os.urandom(5 * 1024 * 1024 + 123)
    objects = {SPACED_KEY: b"\xff\xd8 jpeg", "big.bin": big, "a/b/c.txt": b"", "z.txt": b"z"}
    for key, data in objects.items():
        storage.write_bytes(key, data)

    assert storage.url == f"s3://{s3_bucket}/run 1"
    assert storage.list_files() == sorted(objects)
    for key, data in objects.items():
        assert storage.read_bytes(key) == data
        assert storage.size(key) == len(data)
    # Written where describe() says, as seen by a plain client.
    body = s3_server.client().get_object(Bucket=s3_bucket, Key=f"run 1/{SPACED_KEY}")["Body"]
    assert body.read() == objects[SPACED_KEY]
    assert storage.describe(SPACED_KEY) == f"s3://{s3_bucket}/run 1/{SPACED_KEY}"


def test_stamps_change_when_an_object_is_rewritten(s3_server: S3Server, s3_bucket: str) -> None:
    """Same size, new bytes: the ETag from the listing changes (ingest's cache key)."""
    storage = open_storage(f"s3://{s3_bucket}/stamps", s3_server.settings())
    storage.write_bytes("a.jpg", b"first")
    storage.write_bytes("b.jpg", b"other")
    before = storage.stamps()
    storage.write_bytes("a.jpg", b"again")
    after = storage.stamps()
    assert set(before) == set(after) == {"a.jpg", "b.jpg"}
    assert before["a.jpg"] != after["a.jpg"]
    assert before["b.jpg"] == after["b.jpg"]


def test_list_stays_inside_the_prefix(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    for key in ["data/x.jpg", "data/sub/y.jpg", "data", "data2/z.jpg", "other.jpg", "data/dir/"]:
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"1")

    assert open_storage(f"s3://{s3_bucket}/data", s3_server.settings()).list_files() == [
        "sub/y.jpg",
        "x.jpg",
    ]
    assert open_storage(f"s3://{s3_bucket}", s3_server.settings()).list_files() == [
        "data",
        "data/sub/y.jpg",
        "data/x.jpg",
        "data2/z.jpg",
        "other.jpg",
    ]


def test_list_pages_past_one_thousand_keys(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    keys = [f"p/{i:05d}.txt" for i in range(1100)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_bucket, Key=k, Body=b"."), keys))
    # One reply holds at most 1000 keys, so getting all 1100 proves the pages were followed.
    assert len(client.list_objects_v2(Bucket=s3_bucket)["Contents"]) == 1000

    listed = open_storage(f"s3://{s3_bucket}/p", s3_server.settings()).list_files()

    assert listed == [k.removeprefix("p/") for k in keys]


def test_upload_then_download_tree_gives_identical_files(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    files = {SPACED_KEY: os.urandom(3000), "masks/HE/IDRiD_01_HE.tif": b"tif", "top.csv": b"a,b\n"}
    for key, data in files.items():
        (tmp_path / "src" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / key).write_bytes(data)
    url = f"s3://{s3_bucket}/tree"

    assert upload_tree(tmp_path / "src", url, s3_server.settings()) == len(files)
    assert download_tree(url, tmp_path / "dst", s3_server.settings()) == len(files)

    downloaded = sorted(
        p.relative_to(tmp_path / "dst").as_posix()
        for p in (tmp_path / "dst").rglob("*")
        if p.is_file()
    )
    assert downloaded == sorted(files)
    for key, data in files.items():
        assert (tmp_path / "dst" / key).read_bytes() == data


def test_used_storage_pickles_into_a_worker_process(s3_server: S3Server, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/w", s3_server.settings())
    assert isinstance(storage, S3Storage)
    storage.write_bytes("k.bin", b"from the parent")  # the parent now holds a live client

    clone = pickle.loads(pickle.dumps(storage))
    assert clone._client is None
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        assert pool.submit(_read_in_worker, storage, "k.bin").result() == b"from the parent"


def test_wrong_secret_is_a_credentials_error_without_the_secret(
    s3_server: S3Server, s3_bucket: str
) -> None:
    wrong = "wrong-" + s3_server.secret_key
    settings = s3_server.settings().model_copy(update={"secret_access_key": SecretStr(wrong)})
    storage = open_storage(f"s3://{s3_bucket}/p", settings)

    for attempt in (storage.list_files, lambda: storage.read_bytes("k"), lambda: storage.size("k")):
        with pytest.raises(StorageError, match="rejected the credentials") as caught:
            attempt()
        message = str(caught.value)
        assert f"s3://{s3_bucket}/p" in message
        assert "AWS_SECRET_ACCESS_KEY" in message
        assert wrong not in message and s3_server.secret_key not in message


def test_unknown_access_key_is_a_credentials_error(s3_server: S3Server, s3_bucket: str) -> None:
    settings = s3_server.settings().model_copy(update={"access_key_id": SecretStr("nobody")})
    with pytest.raises(StorageError, match="InvalidAccessKeyId"):
        open_storage(f"s3://{s3_bucket}", settings).write_bytes("k", b"x")


@pytest.mark.parametrize("operation", ["list_files", "read_bytes", "size", "write_bytes"])
def test_missing_bucket_is_named(s3_server: S3Server, operation: str) -> None:
    storage = open_storage("s3://no-such-bucket-drseg/p", s3_server.settings())
    calls = {
        "list_files": storage.list_files,
        "read_bytes": lambda: storage.read_bytes("k"),
        "size": lambda: storage.size("k"),
        "write_bytes": lambda: storage.write_bytes("k", b"x"),
    }
    with pytest.raises(StorageError) as caught:
        calls[operation]()
    assert "bucket 'no-such-bucket-drseg' does not exist" in str(caught.value)
    assert s3_server.endpoint_url in str(caught.value)


@pytest.mark.parametrize("operation", ["read_bytes", "size"])
def test_missing_key_is_named(s3_server: S3Server, s3_bucket: str, operation: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/p", s3_server.settings())
    with pytest.raises(StorageError) as caught:
        getattr(storage, operation)("missing/x.jpg")
    assert str(caught.value) == f"s3://{s3_bucket}/p/missing/x.jpg: no such object"


def test_unreachable_endpoint_fails_quickly() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = StorageSettings(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key_id=SecretStr("key"),
        secret_access_key=SecretStr("secret"),
    )
    storage = open_storage("s3://bkt/p", settings)

    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach S3 endpoint") as caught:
        storage.list_files()
    assert time.monotonic() - start < 10
    assert f"http://127.0.0.1:{port}" in str(caught.value)
    assert "storage.endpoint_url" in str(caught.value)
