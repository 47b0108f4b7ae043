"""`pipelines.storage.Storage` with one S3 client per process.

`Storage.fs` makes a fresh s3fs client on every call; building one costs 0.4-2 s on a loaded 2-core machine
(botocore loads its models), which made every small read / write of the tile workers seconds long. Here the
client is built once per (endpoint, process) and reused, with s3fs's listing cache off so that files written
by other processes (Ray workers) are seen at once."""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec

from pipelines.storage import Storage, is_s3

_CLIENTS: dict = {}


@dataclass(frozen=True)
class CachedStorage(Storage):
    def fs(self, uri: str) -> fsspec.AbstractFileSystem:
        if not is_s3(uri):
            return super().fs(uri)
        key = (self.endpoint, os.getpid())
        if key not in _CLIENTS:
            import s3fs

            kwargs = {"endpoint_url": self.endpoint} if self.endpoint else {}
            k, s = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
            if k and s:
                kwargs.update(key=k, secret=s)
            _CLIENTS[key] = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **kwargs)
        return _CLIENTS[key]


def cached(storage: Storage | None = None, s3_endpoint: str | None = None) -> CachedStorage:
    return CachedStorage(storage.s3_endpoint if storage is not None else s3_endpoint)
