"""The Source interface, license and URL normalisation, and a small JSON-over-HTTP client for search APIs.

A source answers one question: for this synset row and this query, which candidate images do you know of,
best first? It yields dicts with the candidate columns it knows (url, page_url, title, license,
license_url, creator); the collector adds wnid, source, query, rank and found_at, normalises and
de-duplicates the URLs and stops pulling when the synset's budget is full. Sources page lazily, so a
budget of 100 never asks an API for page 50.

    >>> normalize_url("HTTP://Example.COM:80/a b.jpg#frag")
    'http://example.com/a%20b.jpg'
    >>> normalize_license("CC BY-SA 4.0")
    'cc-by-sa-4.0'
    >>> license_family("cc-by-sa-4.0")
    'cc-by-sa'
"""

from __future__ import annotations

import email.utils
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pipeline.errors import UserError

CANDIDATE_FIELDS = ("url", "page_url", "title", "license", "license_url", "creator")


class SourceError(RuntimeError):
    """A source could not answer (bad configuration, malformed response, retries exhausted)."""


class SourceConfigError(SourceError, UserError):
    """The configuration names a source that cannot work as set (missing key, folder or file): retrying won't help."""


class Source(ABC):
    """One candidate source. `per_query` sources are asked once per expanded query; others once per synset."""

    name: str = "source"
    per_query: bool = True

    @abstractmethod
    def search(self, synset: Mapping[str, Any], query: str | None, budget: int) -> Iterator[dict[str, Any]]:
        """Yield up to `budget` candidate dicts (keys from CANDIDATE_FIELDS; url required), best first."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


# --- normalisation -------------------------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_url(url: str) -> str | None:
    """Canonical form used for de-duplication, or None when `url` is not an absolute http(s)/file/s3 URL.

    Lower-cases scheme and host, drops the default port and the fragment, percent-encodes unsafe characters
    (without double-encoding), keeps the query string as is (it often selects the image).
    """
    if not isinstance(url, str):
        return None
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "file", "s3"):
        return None
    if scheme != "file" and not parts.hostname:
        return None
    host = (parts.hostname or "").lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host
    if parts.username or parts.password:
        return None  # credentials in candidate URLs are never fetched
    if port is not None and _DEFAULT_PORTS.get(scheme) != port:
        netloc = f"{host}:{port}"
    path = quote(parts.path or ("/" if scheme in _DEFAULT_PORTS else ""), safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="=&%:@!$'()*+,;/?-._~")
    return urlunsplit((scheme, netloc, path, query, ""))


_CC_RE = re.compile(r"\b(by(?:-nc)?(?:-nd|-sa)?)\b(?:[ /-]*(\d\.\d))?")


def normalize_license(text: str | None, url: str | None = None) -> str | None:
    """Map the many spellings of a license ("CC BY-SA 4.0", "by-sa", a creativecommons.org URL, "Public
    domain", "CC0") to one id: cc0, pdm, cc-by[-nc][-nd|-sa][-<version>], or the lower-cased text."""
    raw = " ".join(x for x in (text, url) if x)
    if not raw.strip():
        return None
    t = raw.lower().replace("_", "-")
    if "publicdomain/zero" in t or re.search(r"\bcc[ -]?0\b", t) or t.strip() == "cc0":
        return "cc0"
    if "publicdomain/mark" in t or t.strip() in ("pdm", "public domain", "public domain mark") or "public domain" in t:
        return "pdm"
    t2 = t.replace("cc by", "by").replace("cc-by", "by").replace("licenses/", " ")
    m = _CC_RE.search(t2)
    if m:
        family = "cc-" + m.group(1)
        return f"{family}-{m.group(2)}" if m.group(2) else family
    return (text or url or "").strip().lower() or None


def license_family(license_id: str | None) -> str | None:
    """'cc-by-sa-4.0' -> 'cc-by-sa'; 'cc0' -> 'cc0'."""
    if license_id is None:
        return None
    return re.sub(r"-\d+(\.\d+)*$", "", license_id)


def license_allowed(license_id: str | None, allowed: list[str] | None) -> bool:
    """True when `allowed` is None, or the license's family is listed (families or exact ids)."""
    if allowed is None:
        return True
    if license_id is None:
        return False
    wanted = {normalize_license(a) or a.lower() for a in allowed}
    return license_id in wanted or license_family(license_id) in {license_family(w) for w in wanted}


# --- HTTP -------------------------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ApiClient:
    """GET JSON with timeouts, retries with exponential backoff on 429/5xx/timeouts, and Retry-After honoured.

    A Retry-After longer than `max_retry_after_s` raises at once instead of blocking a worker for an hour.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout_s: float = 20.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_retry_after_s: float = 120.0,
        user_agent: str = "synsetforge",
        sleep: Any = time.sleep,
    ):
        import requests

        self.name = name
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.sleep = sleep
        self.session = requests.Session()
        self.session.headers["User-Agent"] = user_agent
        self.calls = 0

    def get_json(self, url: str, params: Mapping[str, Any]) -> Any:
        import requests

        last = ""
        for attempt in range(self.max_retries + 1):
            wait = self.backoff_s * (2**attempt)
            self.calls += 1
            try:
                resp = self.session.get(url, params=params, timeout=self.timeout_s)
            except requests.Timeout:
                last = f"timed out after {self.timeout_s:g}s"
            except requests.RequestException as exc:
                last = f"connection failed: {exc.__class__.__name__}"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        snippet = resp.text[:80].replace("\n", " ")
                        raise SourceError(f"{self.name}: malformed JSON from {resp.url} ({snippet!r})") from None
                last = f"HTTP {resp.status_code}"
                if resp.status_code != 429 and resp.status_code < 500:
                    raise SourceError(f"{self.name}: {resp.url} answered HTTP {resp.status_code}: {resp.text[:200]!r}")
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                if retry_after is not None:
                    if retry_after > self.max_retry_after_s:
                        raise SourceError(
                            f"{self.name}: rate limited, Retry-After {retry_after:.0f}s exceeds "
                            f"max_retry_after_s={self.max_retry_after_s:g}; rerun later"
                        )
                    wait = max(wait, retry_after)
            if attempt < self.max_retries:
                self.sleep(wait)
        raise SourceError(f"{self.name}: {url} failed after {self.max_retries + 1} attempts: {last}")

    def close(self) -> None:
        self.session.close()
