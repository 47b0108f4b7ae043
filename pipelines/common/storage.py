"""Object storage access: one way to reach s3://bucket/prefix (AWS or any S3-compatible server) or a local
path, used by every job. The S3 endpoint comes from the job's `s3_endpoint` setting or from
AWS_ENDPOINT_URL; credentials from the usual AWS variables (or an instance profile on a cluster)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec


@dataclass(frozen=True)
class Storage:
    """Where the bytes live: `s3_endpoint` None means AWS itself (or AWS_ENDPOINT_URL if set)."""

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
        fs = self.fs(uri)
        if not is_s3(uri):
            os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        with fs.open(uri, "wb") as fh:
            fh.write(data)

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


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def strip_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out
