"""Flickr photo search: flickr.photos.search over the REST endpoint with format=json&nojsoncallback=1.

Response (https://www.flickr.com/services/api/flickr.photos.search.html):
``{"photos": {"page": 1, "pages": 10, "perpage": 100, "total": 1000, "photo": [{"id", "owner", "secret",
"server", "title", "license", "ownername", "url_l", ...}]}, "stat": "ok"}``; failures are
``{"stat": "fail", "code": 100, "message": "Invalid API Key"}``. License ids from
flickr.photos.licenses.getInfo. The key comes from settings.collect.flickr_api_key (env
SYNSETFORGE__COLLECT__FLICKR_API_KEY) or an Airflow Connection the DAG passes in; it is never logged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.sources.base import ApiClient, Source, SourceConfigError, SourceError, license_family, normalize_license

# flickr.photos.licenses.getInfo: id -> (our id, url)
FLICKR_LICENSES: dict[str, tuple[str, str | None]] = {
    "0": ("all-rights-reserved", None),
    "1": ("cc-by-nc-sa-2.0", "https://creativecommons.org/licenses/by-nc-sa/2.0/"),
    "2": ("cc-by-nc-2.0", "https://creativecommons.org/licenses/by-nc/2.0/"),
    "3": ("cc-by-nc-nd-2.0", "https://creativecommons.org/licenses/by-nc-nd/2.0/"),
    "4": ("cc-by-2.0", "https://creativecommons.org/licenses/by/2.0/"),
    "5": ("cc-by-sa-2.0", "https://creativecommons.org/licenses/by-sa/2.0/"),
    "6": ("cc-by-nd-2.0", "https://creativecommons.org/licenses/by-nd/2.0/"),
    "7": ("no-known-copyright-restrictions", "https://www.flickr.com/commons/usage/"),
    "8": ("us-government-work", "http://www.usa.gov/copyright.shtml"),
    "9": ("cc0", "https://creativecommons.org/publicdomain/zero/1.0/"),
    "10": ("pdm", "https://creativecommons.org/publicdomain/mark/1.0/"),
    "11": ("cc-by-4.0", "https://creativecommons.org/licenses/by/4.0/"),
    "12": ("cc-by-sa-4.0", "https://creativecommons.org/licenses/by-sa/4.0/"),
    "13": ("cc-by-nd-4.0", "https://creativecommons.org/licenses/by-nd/4.0/"),
    "14": ("cc-by-nc-4.0", "https://creativecommons.org/licenses/by-nc/4.0/"),
    "15": ("cc-by-nc-sa-4.0", "https://creativecommons.org/licenses/by-nc-sa/4.0/"),
    "16": ("cc-by-nc-nd-4.0", "https://creativecommons.org/licenses/by-nc-nd/4.0/"),
}
_SIZES = ("url_l", "url_c", "url_z", "url_o")


class FlickrSource(Source):
    name = "flickr"

    def __init__(self, client: ApiClient, endpoint: str, api_key: str | None, *, page_size: int = 100,
                 allowed_licenses: list[str] | None = None):
        if not api_key:
            raise SourceConfigError(
                "flickr: no API key; set SYNSETFORGE__COLLECT__FLICKR_API_KEY (or the Airflow Connection "
                "synsetforge_flickr) or drop flickr from collect.sources"
            )
        self.client = client
        self.endpoint = endpoint
        self._key = api_key
        self.page_size = min(page_size, 500)
        self.license_param = None
        if allowed_licenses:
            wanted = {license_family(normalize_license(a)) for a in allowed_licenses}
            ids = [k for k, (lid, _u) in FLICKR_LICENSES.items() if license_family(lid) in wanted]
            self.license_param = ",".join(ids) if ids else "-1"

    def search(self, synset: Mapping[str, Any], query: str | None, budget: int) -> Iterator[dict[str, Any]]:
        page, sent = 1, 0
        while sent < budget:
            params: dict[str, Any] = {
                "method": "flickr.photos.search", "api_key": self._key, "text": query, "format": "json",
                "nojsoncallback": 1, "per_page": self.page_size, "page": page, "sort": "relevance",
                "content_type": 1, "media": "photos", "extras": "license,owner_name," + ",".join(_SIZES),
            }
            if self.license_param:
                params["license"] = self.license_param
            doc = self.client.get_json(self.endpoint, params)
            if not isinstance(doc, dict):
                raise SourceError(f"flickr: response for {query!r} is not a JSON object")
            if doc.get("stat") != "ok":
                raise SourceError(f"flickr: API error {doc.get('code')!r}: {doc.get('message')!r} for {query!r}")
            photos = doc.get("photos") or {}
            items = photos.get("photo") or []
            for p in items:
                if not isinstance(p, dict) or not p.get("id"):
                    continue
                url = next((p[k] for k in _SIZES if p.get(k)), None)
                if url is None and p.get("server") and p.get("secret"):
                    url = f"https://live.staticflickr.com/{p['server']}/{p['id']}_{p['secret']}_b.jpg"
                if url is None:
                    continue
                lic, lic_url = FLICKR_LICENSES.get(str(p.get("license")), (None, None))
                yield {
                    "url": url,
                    "page_url": f"https://www.flickr.com/photos/{p.get('owner')}/{p['id']}",
                    "title": p.get("title") or None,
                    "license": lic,
                    "license_url": lic_url,
                    "creator": p.get("ownername") or p.get("owner"),
                }
                sent += 1
                if sent >= budget:
                    return
            if not items or page >= int(photos.get("pages") or 0):
                return
            page += 1
