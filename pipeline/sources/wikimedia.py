"""Wikimedia Commons search through the MediaWiki Action API (no key).

GET {api}?action=query&format=json&formatversion=2&generator=search&gsrsearch=Q&gsrnamespace=6&gsrlimit=N
&prop=imageinfo&iiprop=url|mime|extmetadata&continue= ; see https://www.mediawiki.org/wiki/API:Search and
https://www.mediawiki.org/wiki/API:Imageinfo. Pages come back as ``query.pages`` (a list with
formatversion=2, a dict keyed by page id otherwise) each with ``index`` (search rank), ``title``
("File:...") and ``imageinfo[0]`` = {url, descriptionurl, mime, extmetadata: {LicenseShortName, LicenseUrl,
Artist, ObjectName: {"value": ...}}}. Pagination: send every key of the ``continue`` object back.
Errors arrive as HTTP 200 with ``{"error": {"code", "info"}}``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.sources.base import ApiClient, Source, SourceError, normalize_license

_TAG = re.compile(r"<[^>]+>")


def _meta(ext: Mapping[str, Any], key: str) -> str | None:
    value = (ext.get(key) or {}).get("value") if isinstance(ext.get(key), dict) else None
    if value is None:
        return None
    text = html.unescape(_TAG.sub("", str(value))).strip()
    return text or None


class WikimediaSource(Source):
    name = "wikimedia"

    def __init__(self, client: ApiClient, api_url: str, *, page_size: int = 50):
        self.client = client
        self.api_url = api_url
        self.page_size = min(page_size, 50)  # gsrlimit max for anonymous clients with imageinfo

    def search(self, synset: Mapping[str, Any], query: str | None, budget: int) -> Iterator[dict[str, Any]]:
        cont: dict[str, Any] = {"continue": ""}
        sent = 0
        while sent < budget:
            params = {
                "action": "query", "format": "json", "formatversion": "2", "generator": "search",
                "gsrsearch": query, "gsrnamespace": 6, "gsrlimit": self.page_size,
                "prop": "imageinfo", "iiprop": "url|mime|extmetadata", **cont,
            }
            doc = self.client.get_json(self.api_url, params)
            if not isinstance(doc, dict):
                raise SourceError(f"wikimedia: response for {query!r} is not a JSON object")
            if "error" in doc:
                err = doc["error"] if isinstance(doc["error"], dict) else {}
                raise SourceError(f"wikimedia: API error {err.get('code')!r}: {err.get('info')!r} for {query!r}")
            pages = (doc.get("query") or {}).get("pages") or []
            if isinstance(pages, dict):
                pages = list(pages.values())
            pages = sorted((p for p in pages if isinstance(p, dict)), key=lambda p: p.get("index", 1 << 30))
            for page in pages:
                info = (page.get("imageinfo") or [None])[0]
                if not isinstance(info, dict) or not info.get("url"):
                    continue
                if info.get("mime") and not str(info["mime"]).startswith("image/"):
                    continue  # audio/video/pdf files live in the File: namespace too
                ext = info.get("extmetadata") or {}
                title = _meta(ext, "ObjectName") or str(page.get("title", "")).removeprefix("File:") or None
                lic_url = _meta(ext, "LicenseUrl")
                yield {
                    "url": info["url"],
                    "page_url": info.get("descriptionurl"),
                    "title": title,
                    "license": normalize_license(_meta(ext, "LicenseShortName") or _meta(ext, "License"), lic_url),
                    "license_url": lic_url,
                    "creator": _meta(ext, "Artist"),
                }
                sent += 1
                if sent >= budget:
                    return
            nxt = doc.get("continue")
            if not isinstance(nxt, dict) or not pages:
                return
            cont = nxt
