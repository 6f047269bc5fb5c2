"""Openverse image search (no key): GET {base}/v1/images/?q=...&page=N&page_size=M.

Response (https://api.openverse.org/v1/#tag/images/operation/images_search):
``{"result_count": int, "page_count": int, "page_size": int, "page": int, "results": [{"id", "title",
"foreign_landing_url", "url", "creator", "license", "license_version", "license_url", "provider", ...}]}``.
Anonymous clients get at most 20 per page; `license=cc0,by,by-sa` filters server-side.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.sources.base import ApiClient, Source, SourceError, license_family, normalize_license

ANON_MAX_PAGE_SIZE = 20
# Our license families -> Openverse's license codes, for the server-side filter.
_OV_CODES = {"cc0": "cc0", "pdm": "pdm", "cc-by": "by", "cc-by-sa": "by-sa", "cc-by-nc": "by-nc",
             "cc-by-nd": "by-nd", "cc-by-nc-sa": "by-nc-sa", "cc-by-nc-nd": "by-nc-nd"}


class OpenverseSource(Source):
    name = "openverse"

    def __init__(self, client: ApiClient, base_url: str, *, page_size: int = 20, allowed_licenses: list[str] | None = None):
        self.client = client
        self.endpoint = base_url.rstrip("/") + "/v1/images/"
        self.page_size = min(page_size, ANON_MAX_PAGE_SIZE)
        codes = sorted({_OV_CODES[f] for f in (license_family(normalize_license(a)) for a in allowed_licenses or [])
                        if f in _OV_CODES})
        self.license_param = ",".join(codes) if allowed_licenses else None

    def search(self, synset: Mapping[str, Any], query: str | None, budget: int) -> Iterator[dict[str, Any]]:
        page, sent = 1, 0
        while sent < budget:
            params: dict[str, Any] = {"q": query, "page": page, "page_size": self.page_size}
            if self.license_param:
                params["license"] = self.license_param
            doc = self.client.get_json(self.endpoint, params)
            if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
                raise SourceError(f"openverse: response for q={query!r} page {page} has no 'results' list")
            for item in doc["results"]:
                if not isinstance(item, dict) or not item.get("url"):
                    continue
                version = item.get("license_version")
                lic = item.get("license")
                yield {
                    "url": item["url"],
                    "page_url": item.get("foreign_landing_url"),
                    "title": item.get("title"),
                    "license": normalize_license(f"cc {lic} {version}" if lic and version and lic not in ("cc0", "pdm")
                                                 else lic, item.get("license_url")),
                    "license_url": item.get("license_url"),
                    "creator": item.get("creator"),
                }
                sent += 1
                if sent >= budget:
                    return
            page_count = doc.get("page_count") or 0
            if not doc["results"] or page >= page_count:
                return
            page += 1
