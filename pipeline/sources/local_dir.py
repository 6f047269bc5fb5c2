"""A local folder with one sub-folder of images per wnid (root/n02084071/*.jpg): the offline default.

Candidates are file:// URLs; the ingest stage reads them from disk (only under configured roots).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.sources.base import Source, SourceConfigError


class LocalDirSource(Source):
    name = "local_dir"
    per_query = False

    def __init__(self, root: str | Path | None):
        if not root:
            raise SourceConfigError("local_dir: collect.local_dir is not set; point it at a folder with one sub-folder per wnid")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise SourceConfigError(f"local_dir: {self.root} is not a folder; create it with one sub-folder per wnid")

    def search(self, synset: Mapping[str, Any], query: str | None, budget: int) -> Iterator[dict[str, Any]]:
        folder = self.root / str(synset["wnid"])
        if not folder.is_dir():
            return
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        for p in files[:budget]:
            yield {"url": p.as_uri(), "page_url": None, "title": p.stem, "license": None, "license_url": None,
                   "creator": None}
