"""pystac's reads and writes of a static catalog through the project's Storage (any S3 server, with the
endpoint override), gathering the GETs of a catalog's item and child links."""

from __future__ import annotations

import json

from pipelines.common.storage import Storage, is_s3

PREFETCH = 256  # catalog JSONs fetched in one gathered request while walking a static catalog on S3


def storage_stac_io(storage: Storage):
    """A pystac StacIO that reads s3:// through `storage` (any S3 server), local and http(s) as pystac does.
    Walking a static catalog on S3, pystac reads its items and children one GET at a time: when a catalog or
    collection is read, the JSONs its item and child links name are fetched together (s3fs gathers the GETs)
    and handed to pystac's reads that follow."""
    from pystac.stac_io import DefaultStacIO
    from pystac.utils import make_absolute_href

    class StorageStacIO(DefaultStacIO):
        def __init__(self):
            super().__init__()
            self.fetched: dict[str, str] = {}  # href -> text fetched ahead, given out once

        def read_text_from_href(self, href: str) -> str:
            if not is_s3(href):
                return super().read_text_from_href(href)
            text = self.fetched.pop(href, None)
            if text is None:
                text = storage.fs(href).cat_file(href).decode()  # one GET (no HEAD first)
            self._fetch_links(href, text)
            return text

        def write_text_to_href(self, href: str, txt: str) -> None:
            if is_s3(href):
                storage.write_text(href, txt)
            else:
                super().write_text_to_href(href, txt)

        def _fetch_links(self, href: str, text: str) -> None:
            if '"links"' not in text:
                return
            try:
                d = json.loads(text)
            except ValueError:
                return  # pystac reports what it cannot parse
            if not isinstance(d, dict) or d.get("type") not in ("Catalog", "Collection"):
                return
            targets = [make_absolute_href(link["href"], href) for link in d.get("links", [])
                       if isinstance(link, dict) and link.get("rel") in ("item", "child") and link.get("href")]  # fmt: skip
            targets = list(dict.fromkeys(t for t in targets if is_s3(t) and t not in self.fetched))
            if len(targets) < 2:
                return
            fs = storage.fs(targets[0])
            for i in range(0, len(targets), PREFETCH):
                chunk = targets[i : i + PREFETCH]
                got = fs.cat(chunk, on_error="omit")  # a missing one is read (and reported) by pystac's own read
                for t in chunk:
                    data = got.get(t[len("s3://") :])
                    if data is not None:
                        self.fetched[t] = data.decode()

    return StorageStacIO()
