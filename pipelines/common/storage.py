"""Object storage access: one way to reach s3://bucket/prefix (AWS or any S3-compatible server) or a local
path, used by every job. The S3 endpoint comes from AWS_ENDPOINT_URL (every job's `--s3_endpoint` flag sets
it); credentials from the usual AWS variables (or an instance profile on a cluster).

Writes are atomic: a reader never sees half a file. On S3 one PUT (or a completed multipart upload) is
atomic by itself; a local file is written beside its destination and renamed over it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import fsspec


@dataclass(frozen=True)
class Storage:
    """Where the bytes live. Jobs build `Storage()`: AWS itself, or the server of AWS_ENDPOINT_URL; an explicit
    `s3_endpoint` is for a client of one particular server (a test's)."""

    s3_endpoint: str | None = None

    @property
    def endpoint(self) -> str | None:
        return self.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None

    def fs(self, uri: str) -> fsspec.AbstractFileSystem:
        if is_s3(uri):
            import s3fs

            kwargs = {}
            if self.endpoint:
                kwargs["endpoint_url"] = self.endpoint
            key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if key and secret:
                kwargs.update(key=key, secret=secret)
            # one client per process and settings (a new one costs 0.4-2 s); fsspec drops its instance cache
            # in forked children. No listings cache: other processes write the same buckets.
            return s3fs.S3FileSystem(use_listings_cache=False, **kwargs)
        return fsspec.filesystem("file")

    def pyarrow_fs(self, uri: str):
        """A pyarrow filesystem and the path to pass with it (for pyarrow / Ray Data parquet I/O)."""
        import pyarrow.fs as pafs

        if is_s3(uri):
            kwargs = {}
            if self.endpoint:
                scheme, _, host = self.endpoint.partition("://")
                kwargs.update(endpoint_override=host, scheme=scheme)
            key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if key and secret:
                kwargs.update(access_key=key, secret_key=secret)
            region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            if region:
                kwargs["region"] = region
            return pafs.S3FileSystem(**kwargs), strip_scheme(uri)
        return pafs.LocalFileSystem(), os.path.abspath(uri)

    def exists(self, uri: str) -> bool:
        return self.fs(uri).exists(uri)

    def read_bytes(self, uri: str) -> bytes:
        with self.fs(uri).open(uri, "rb") as fh:
            return fh.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Writes the whole file at once: readers see the old file or the new one, never a part."""
        with self.open_atomic(uri) as fh:
            fh.write(data)

    @contextlib.contextmanager
    def open_atomic(self, uri: str) -> Iterator[BinaryIO]:
        """A binary file handle for streaming a big file to `uri`; the file appears when the block ends
        without an error, and an error leaves neither the file nor a temporary one behind."""
        if is_s3(uri):
            with _s3_atomic(self.fs(uri), uri) as fh:
                yield fh
        else:
            with _local_atomic(os.path.abspath(uri)) as fh:
                yield fh

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode()

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode())

    def makedirs(self, uri: str) -> None:
        if is_s3(uri):
            fs = self.fs(uri)
            bucket = strip_scheme(uri).split("/")[0]
            if not fs.exists(bucket):
                fs.mkdir(bucket)
        else:
            os.makedirs(uri, exist_ok=True)


@contextlib.contextmanager
def _s3_atomic(fs, uri: str) -> Iterator[BinaryIO]:
    fh = fs.open(uri, "wb")
    try:
        yield fh
    except BaseException:
        fh.discard()  # aborts a multipart upload; a small file was only buffered
        fh.closed = True  # so that no later close() uploads what was buffered
        raise
    fh.close()  # the PUT (or the multipart upload's completion) makes the object appear at once


@contextlib.contextmanager
def _local_atomic(path: str) -> Iterator[BinaryIO]:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    # beside the destination (same filesystem: the rename is atomic), hidden, with the usual permissions
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def strip_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out
