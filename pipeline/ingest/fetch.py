"""Download candidate URLs safely and fast: bounded concurrency, per-host politeness, timeouts, size cap,
retries with backoff honouring Retry-After, and an SSRF guard on every hop.

Why each piece:
- SSRF: a candidate URL comes from the internet, so it may point (directly, or via a redirect, or via DNS)
  at 127.0.0.1, 10.x, 169.254.169.254 (cloud metadata) and so on. The host is resolved once, *every*
  address is checked, and the connection goes to the checked address (the Host header and TLS SNI keep the
  name), so DNS rebinding between check and connect cannot slip through. Redirects are followed by hand and
  each hop is checked again. `allowed_networks` (e.g. 127.0.0.0/8 in tests) opens holes explicitly.
- Time: connect and read timeouts per socket operation, plus a total deadline per URL checked between
  reads (`read1`, so a server dripping one byte a second cannot keep a worker forever).
- Size: Content-Length above the cap is refused before reading; the body is counted while streaming.
- Politeness: at most `per_host` requests in flight to one host name, `concurrency` in total.
- Retries: 429 and 5xx and connection errors, exponential backoff, Retry-After honoured up to a cap; a
  longer Retry-After settles the URL as http_429 instead of parking a worker.
file:// (under allowed roots only) and s3:// URLs are read directly, for the local_dir / s3_prefix sources.

    >>> check_address("10.1.2.3", FetchConfig())
    'private address 10.1.2.3'
    >>> check_address("127.0.0.1", FetchConfig(allowed_networks=("127.0.0.0/8",))) is None
    True
"""

from __future__ import annotations

import ipaddress
import random
import socket
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import urllib3

from pipeline.sources.base import parse_retry_after

METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
                      ipaddress.ip_address("100.100.100.200")}
RETRY_STATUS = {429, 500, 502, 503, 504}
DNS_TTL_S = 60.0  # answers are re-checked on every use; the cache only saves the lookup
# Reasons that a rerun may try again; every other outcome is settled.
TRANSIENT_REASONS = frozenset({"timeout", "connection_error", "http_429", "http_5xx", "dns_error"})


@dataclass(frozen=True)
class FetchConfig:
    concurrency: int = 32
    per_host: int = 4
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 20.0
    total_timeout_s: float = 60.0
    max_bytes: int = 20_000_000
    max_retries: int = 3
    backoff_s: float = 1.0
    max_retry_after_s: float = 60.0
    max_redirects: int = 5
    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()
    file_roots: tuple[str, ...] = ()
    s3_buckets: tuple[str, ...] = ()
    s3_endpoint_url: str | None = None
    user_agent: str = "synsetforge/0.1 (dataset builder)"

    @classmethod
    def from_settings(cls, settings: Any, **extra: Any) -> FetchConfig:
        i = settings.ingest
        roots = tuple(r for r in (settings.collect.local_dir,) if r)
        buckets = ()
        if settings.collect.s3_prefix:
            buckets = (urlsplit(settings.collect.s3_prefix).netloc,)
        kw = dict(
            concurrency=i.concurrency, per_host=i.per_host, connect_timeout_s=i.connect_timeout_s,
            read_timeout_s=i.read_timeout_s, total_timeout_s=i.total_timeout_s, max_bytes=i.max_bytes,
            max_retries=i.max_retries, backoff_s=i.backoff_s, max_retry_after_s=i.max_retry_after_s,
            max_redirects=i.max_redirects, allow_private=i.allow_private_addresses,
            allowed_networks=tuple(i.allowed_networks), file_roots=roots, s3_buckets=buckets,
            s3_endpoint_url=settings.store.s3_endpoint_url, user_agent=i.user_agent,
        )
        kw.update(extra)
        return cls(**kw)


@dataclass
class FetchResult:
    url: str
    body: bytes | None = None
    reason: str | None = None  # None = success
    detail: str = ""
    status: int | None = None
    final_url: str | None = None
    content_type: str | None = None
    attempts: int = 0
    elapsed_s: float = 0.0
    hops: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reason is None


class _Refused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def check_address(ip: str, cfg: FetchConfig) -> str | None:
    """None if the fetcher may connect to `ip`, else why not."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    for net in _networks(cfg.allowed_networks):
        if addr in net:
            return None
    if addr in METADATA_ADDRESSES:
        return f"cloud metadata address {addr}"
    if cfg.allow_private:
        return None
    for label, test in (("loopback", addr.is_loopback), ("link-local", addr.is_link_local),
                        ("private", addr.is_private), ("multicast", addr.is_multicast),
                        ("reserved", addr.is_reserved), ("unspecified", addr.is_unspecified)):
        if test:
            return f"{label} address {addr}"
    if isinstance(addr, ipaddress.IPv4Address) and addr in ipaddress.ip_network("100.64.0.0/10"):
        return f"shared (CGNAT) address {addr}"
    if not addr.is_global:
        return f"non-global address {addr}"
    return None


@lru_cache(maxsize=64)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class Fetcher:
    """Thread-safe downloader. `fetch(url)` for one URL, `fetch_many(urls)` for a bounded-concurrency stream."""

    def __init__(self, cfg: FetchConfig, *, resolver: Resolver = system_resolver, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.resolver = resolver
        self.sleep = sleep
        self._pools: dict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = {}
        self._host_slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._s3 = None
        self._roots = tuple(Path(r).expanduser().resolve() for r in cfg.file_roots)
        self.connected_to: set[str] = set()  # every address a request went to (tests audit this)
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}  # crawls hit a few CDN hosts many times

    # --- plumbing -------------------------------------------------------------------------------------------
    def _slot(self, host: str) -> threading.BoundedSemaphore:
        with self._lock:
            sem = self._host_slots.get(host)
            if sem is None:
                sem = self._host_slots[host] = threading.BoundedSemaphore(self.cfg.per_host)
            return sem

    def _pool(self, scheme: str, ip: str, port: int, host: str) -> urllib3.HTTPConnectionPool:
        key = (scheme, ip, port, host)
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                kw: dict[str, Any] = dict(maxsize=self.cfg.per_host, block=False, retries=False,
                                          headers={"Host": host if port in (80, 443) else f"{host}:{port}",
                                                   "User-Agent": self.cfg.user_agent, "Accept": "image/*,*/*;q=0.5"})
                if scheme == "https":
                    pool = urllib3.HTTPSConnectionPool(ip, port, server_hostname=host, assert_hostname=host, **kw)
                else:
                    pool = urllib3.HTTPConnectionPool(ip, port, **kw)
                self._pools[key] = pool
            return pool

    def close(self) -> None:
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()

    def _resolve_checked(self, host: str, port: int) -> str:
        try:
            ipaddress.ip_address(host)
            ips = [host]
        except ValueError:
            cached = self._dns.get((host, port))
            if cached and cached[0] > time.monotonic():
                ips = cached[1]
            else:
                try:
                    ips = self.resolver(host, port)
                except (OSError, UnicodeError) as exc:
                    raise _Refused("dns_error", f"cannot resolve {host}: {exc}") from None
                self._dns[(host, port)] = (time.monotonic() + DNS_TTL_S, ips)
        if not ips:
            raise _Refused("dns_error", f"{host} resolved to no address")
        for ip in ips:  # every address must pass: a resolver may hand out any of them later
            why = check_address(ip, self.cfg)
            if why:
                raise _Refused("blocked_address", f"{host} -> {why}")
        return ips[0]

    # --- one URL ----------------------------------------------------------------------------------------------
    def fetch(self, url: str) -> FetchResult:
        start = time.monotonic()
        result = FetchResult(url=url)
        scheme = urlsplit(url).scheme.lower()
        try:
            if scheme == "file":
                result.body = self._read_file(url)
            elif scheme == "s3":
                result.body = self._read_s3(url)
            elif scheme in ("http", "https"):
                self._fetch_http(url, result, start)
            else:
                raise _Refused("blocked_scheme", f"scheme {scheme!r} is not fetched")
        except _Refused as exc:
            result.reason, result.detail, result.body = exc.reason, exc.detail, None
        result.elapsed_s = time.monotonic() - start
        return result

    def _read_file(self, url: str) -> bytes:
        path = Path(unquote(urlsplit(url).path)).resolve()
        if not any(path.is_relative_to(r) for r in self._roots):
            raise _Refused("blocked_scheme", f"{path} is outside the allowed local roots")
        try:
            size = path.stat().st_size
            if size > self.cfg.max_bytes:
                raise _Refused("too_large", f"{size} bytes > max_bytes {self.cfg.max_bytes}")
            return path.read_bytes()
        except FileNotFoundError:
            raise _Refused("not_found", f"{path} does not exist") from None
        except OSError as exc:
            raise _Refused("read_error", f"{path}: {exc}") from None

    def _read_s3(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.netloc not in self.cfg.s3_buckets:
            raise _Refused("blocked_scheme", f"bucket {parts.netloc!r} is not the configured s3_prefix bucket")
        from botocore.exceptions import BotoCoreError, ClientError

        with self._lock:
            if self._s3 is None:
                import boto3

                self._s3 = boto3.client("s3", endpoint_url=self.cfg.s3_endpoint_url)
        try:
            obj = self._s3.get_object(Bucket=parts.netloc, Key=unquote(parts.path.lstrip("/")))
            if obj.get("ContentLength", 0) > self.cfg.max_bytes:
                raise _Refused("too_large", f"{obj['ContentLength']} bytes > max_bytes {self.cfg.max_bytes}")
            return obj["Body"].read(self.cfg.max_bytes + 1)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise _Refused("not_found" if code in ("NoSuchKey", "404") else "s3_error", f"{url}: {code}") from None
        except BotoCoreError as exc:
            raise _Refused("connection_error", f"{url}: {exc}") from None

    def _fetch_http(self, url: str, result: FetchResult, start: float) -> None:
        cfg = self.cfg
        deadline = start + cfg.total_timeout_s
        attempt = 0
        while True:
            attempt += 1
            result.attempts = attempt
            try:
                self._follow(url, result, deadline)
                return
            except _Refused as exc:
                retry_after = getattr(exc, "retry_after", None)
                if exc.reason not in ("http_429", "http_5xx", "connection_error") or attempt > cfg.max_retries:
                    raise
                wait_s = cfg.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                if retry_after is not None:
                    if retry_after > cfg.max_retry_after_s:
                        exc.detail += f"; Retry-After {retry_after:.0f}s exceeds max_retry_after_s"
                        raise
                    wait_s = max(wait_s, retry_after)
                if time.monotonic() + wait_s > deadline:
                    raise
                self.sleep(wait_s)

    def _follow(self, url: str, result: FetchResult, deadline: float) -> None:
        cfg = self.cfg
        current = url
        result.hops = []
        for _hop in range(cfg.max_redirects + 1):
            parts = urlsplit(current)
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                raise _Refused("blocked_scheme", f"redirect to scheme {scheme!r} ({current})")
            host = parts.hostname
            if not host:
                raise _Refused("bad_url", f"no host in {current!r}")
            try:
                port = parts.port or (443 if scheme == "https" else 80)
            except ValueError:
                raise _Refused("bad_url", f"bad port in {current!r}") from None
            ip = self._resolve_checked(host, port)
            result.hops.append(current)
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Refused("timeout", f"total timeout {cfg.total_timeout_s:g}s")
            timeout = urllib3.Timeout(connect=min(cfg.connect_timeout_s, remaining), read=min(cfg.read_timeout_s, remaining))
            slot = self._slot(host)
            with slot:
                pool = self._pool(scheme, ip, port, host)
                self.connected_to.add(ip)
                try:
                    resp = pool.urlopen("GET", path, redirect=False, retries=False, timeout=timeout,
                                        preload_content=False, decode_content=True, release_conn=False)
                except urllib3.exceptions.TimeoutError as exc:
                    raise _Refused("timeout", f"{current}: {exc.__class__.__name__}") from None
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    raise _Refused("connection_error", f"{current}: {exc.__class__.__name__}: {exc}") from None
                try:
                    status = resp.status
                    result.status = status
                    if status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location")
                        resp.close()  # never read a redirect body: it may be huge or slow
                        if not location:
                            raise _Refused("bad_redirect", f"{current}: HTTP {status} without Location")
                        current = urljoin(current, location)
                        continue
                    if status != 200:
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                        resp.close()  # an unread error body must not poison a pooled connection
                        reason = "http_429" if status == 429 else "http_5xx" if status >= 500 else f"http_{status}"
                        err = _Refused(reason, f"{current}: HTTP {status}")
                        err.retry_after = retry_after  # type: ignore[attr-defined]
                        raise err
                    result.final_url = current
                    result.content_type = resp.headers.get("Content-Type")
                    length = resp.headers.get("Content-Length")
                    if length and length.isdigit() and int(length) > cfg.max_bytes:
                        raise _Refused("too_large", f"Content-Length {length} > max_bytes {cfg.max_bytes}")
                    result.body = self._read_body(resp, deadline)
                    return
                finally:
                    resp.release_conn()
        raise _Refused("too_many_redirects", f"more than {cfg.max_redirects} redirects from {url}")

    def _read_body(self, resp: Any, deadline: float) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                if time.monotonic() > deadline:
                    resp.close()
                    raise _Refused("timeout", f"total timeout {self.cfg.total_timeout_s:g}s while reading the body")
                chunk = resp.read1(262144)
                if not chunk:
                    break
                total += len(chunk)
                if total > self.cfg.max_bytes:
                    resp.close()
                    raise _Refused("too_large", f"body exceeds max_bytes {self.cfg.max_bytes}")
                chunks.append(chunk)
        except urllib3.exceptions.TimeoutError as exc:
            resp.close()
            raise _Refused("timeout", f"read timeout: {exc.__class__.__name__}") from None
        except urllib3.exceptions.ProtocolError as exc:
            resp.close()  # the server hung up mid-body: transient, retried (a short *file* is caught by validation)
            raise _Refused("connection_error", f"connection closed mid-body: {exc}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            resp.close()
            raise _Refused("connection_error", f"{exc.__class__.__name__}: {exc}") from None
        return b"".join(chunks)

    # --- many URLs ----------------------------------------------------------------------------------------------
    def fetch_many(self, urls: Iterable[str], work: Callable[[FetchResult], Any] | None = None) -> Iterator[tuple[str, Any]]:
        """Fetch with at most `concurrency` in flight and `per_host` per host; yield (url, work(result) or result).

        URLs of a busy host wait in a per-host queue while other hosts' URLs go ahead, so one slow site does
        not park every worker. `work` runs in the download thread (validation, hashing, storing), so CPU work
        overlaps the network.
        """
        def task(u: str) -> Any:
            r = self.fetch(u)
            return work(r) if work else r

        source = iter(urls)
        waiting: dict[str, deque[str]] = defaultdict(deque)
        ready: deque[str] = deque()  # hosts with waiting URLs and a free slot
        busy: Counter[str] = Counter()
        limit = self.cfg.per_host

        def pick() -> str | None:
            while ready:
                host = ready.popleft()
                if waiting[host] and busy[host] < limit:
                    return waiting[host].popleft()
            for u in source:
                host = _host_of(u)
                if busy[host] < limit:
                    return u
                waiting[host].append(u)
            return None

        with ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="fetch") as pool:
            pending: dict[Future, str] = {}

            def fill() -> None:
                while len(pending) < self.cfg.concurrency:
                    u = pick()
                    if u is None:
                        return
                    busy[_host_of(u)] += 1
                    pending[pool.submit(task, u)] = u

            fill()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    u = pending.pop(fut)
                    host = _host_of(u)
                    busy[host] -= 1
                    if waiting[host]:
                        ready.append(host)
                    yield u, fut.result()
                fill()


def _host_of(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""
