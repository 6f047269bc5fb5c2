"""Download candidate URLs safely and fast: bounded concurrency, per-host politeness, timeouts, size cap,
retries with backoff honouring Retry-After, and an SSRF guard on every hop.

Why each piece:
- SSRF: a candidate URL comes from the internet, so it may point (directly, or via a redirect, or via DNS)
  at 127.0.0.1, 10.x, 169.254.169.254 (cloud metadata) and so on. The host is resolved once, *every*
  address is checked, and the connection goes to the checked address (the Host header and TLS SNI keep the
  name), so DNS rebinding between check and connect cannot slip through. Redirects are followed by hand and
  each hop is checked again. An IPv6 address that carries an IPv4 address (IPv4-mapped, 6to4, Teredo, NAT64) is
  judged by the IPv4 address it ends at; the IETF special-purpose ranges that are not globally reachable are
  refused by name (`SPECIAL_PURPOSE`, from the IANA registries; Python's `is_global` misses some).
  `allowed_networks` (e.g. 127.0.0.0/8 in tests) opens holes explicitly.
- Time: connect and read timeouts per socket operation, plus a total deadline per URL checked between
  reads (`read1`, so a server dripping one byte a second cannot keep a worker forever).
- Size: Content-Length above the cap is refused before reading; the body is counted while streaming.
- Politeness: at most `per_host` requests in flight to one host name, `concurrency` in total.
- Retries: 429 and 5xx and connection errors, exponential backoff, Retry-After honoured up to a cap; a
  longer Retry-After settles the URL as http_429 instead of parking a worker.
file:// (under allowed roots only) and s3:// URLs are read directly, for the local_dir / s3_prefix sources.

    >>> check_address("10.1.2.3", FetchConfig())
    'private-use (RFC 1918) address 10.1.2.3'
    >>> check_address("2002:7f00:1::", FetchConfig())
    '6to4 address 2002:7f00:1:: embeds loopback (RFC 1122) address 127.0.0.1'
    >>> check_address("127.0.0.1", FetchConfig(allowed_networks=("127.0.0.0/8",))) is None
    True
"""

from __future__ import annotations

import ipaddress
import queue
import random
import socket
import threading
import time
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from pipeline.sources.base import parse_retry_after

METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
                      ipaddress.ip_address("100.100.100.200")}
RETRY_STATUS = {429, 500, 502, 503, 504}
DNS_TTL_S = 60.0  # answers are re-checked on every use; the cache only saves the lookup
# Reasons that a rerun may try again; every other outcome is settled.
TRANSIENT_REASONS = frozenset({"timeout", "connection_error", "http_429", "http_5xx", "dns_error"})
# Refused by the configuration, not by the URL's content: an ingest run tries these again, so a root, network or
# bucket allowed later takes effect without deleting anything.
CONFIG_REASONS = frozenset({"no_local_root", "outside_local_root", "blocked_scheme", "blocked_address"})


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
    cpu_ns: int = 0  # CPU time of the fetching thread (receive step of the ingest breakdown)
    hops: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reason is None


class _Refused(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# IETF special-purpose ranges (IANA IPv4 / IPv6 Special-Purpose Address Registries) that are not globally reachable,
# with the registry's name as the reason. Python's `is_global` (3.11) misses several of them (192.0.0.0/24 beyond
# .0/29 and .170/31, 3fff::/20, fec0::/10, 100:0:0:1::/64, ...); the table is consulted first, the longest prefix wins,
# and a None reason marks a registry entry that is globally reachable inside a refused block. Addresses that embed
# an IPv4 address (IPv4-mapped, 6to4, Teredo, NAT64 64:ff9b::/96) are judged by the embedded address instead.
SPECIAL_PURPOSE: tuple[tuple[str, str | None], ...] = (
    ("0.0.0.0/8", "'this network' (RFC 791)"),
    ("10.0.0.0/8", "private-use (RFC 1918)"),
    ("100.64.0.0/10", "shared (CGNAT) (RFC 6598)"),
    ("127.0.0.0/8", "loopback (RFC 1122)"),
    ("169.254.0.0/16", "link-local (RFC 3927)"),
    ("172.16.0.0/12", "private-use (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignment (RFC 6890)"),
    ("192.0.0.0/29", "IPv4 service continuity prefix (RFC 7335)"),
    ("192.0.0.8/32", "IPv4 dummy address (RFC 7600)"),
    ("192.0.0.9/32", None),  # Port Control Protocol anycast (RFC 7723): globally reachable
    ("192.0.0.10/32", None),  # TURN anycast (RFC 8155): globally reachable
    ("192.0.0.170/31", "NAT64/DNS64 discovery (RFC 7050)"),
    ("192.0.2.0/24", "documentation TEST-NET-1 (RFC 5737)"),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast (RFC 7526)"),
    ("192.168.0.0/16", "private-use (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking (RFC 2544)"),
    ("198.51.100.0/24", "documentation TEST-NET-2 (RFC 5737)"),
    ("203.0.113.0/24", "documentation TEST-NET-3 (RFC 5737)"),
    ("224.0.0.0/4", "multicast (RFC 5771)"),
    ("240.0.0.0/4", "reserved (RFC 1112)"),
    ("255.255.255.255/32", "limited broadcast (RFC 919)"),
    ("::/128", "unspecified (RFC 4291)"),
    ("::1/128", "loopback (RFC 4291)"),
    ("::/96", "deprecated IPv4-compatible (RFC 4291)"),
    ("::/8", "reserved by the IETF (RFC 4291)"),
    ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation (RFC 8215)"),
    ("100::/64", "discard-only (RFC 6666)"),
    ("100:0:0:1::/64", "dummy IPv6 prefix (RFC 9780)"),
    ("2001::/23", "IETF protocol assignment (RFC 2928)"),
    ("2001:2::/48", "benchmarking (RFC 5180)"),
    ("2001:10::/28", "deprecated ORCHID (RFC 4843)"),
    ("2001:db8::/32", "documentation (RFC 3849)"),
    ("3fff::/20", "documentation (RFC 9637)"),
    ("5f00::/16", "segment routing SIDs (RFC 9602)"),
    ("fc00::/7", "unique-local (RFC 4193)"),
    ("fe80::/10", "link-local (RFC 4291)"),
    ("fec0::/10", "deprecated site-local (RFC 3879)"),
    ("ff00::/8", "multicast (RFC 4291)"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_TEREDO = ipaddress.ip_network("2001::/32")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")


def _special_purpose() -> list[tuple[Any, str | None]]:
    nets = [(ipaddress.ip_network(c), why) for c, why in SPECIAL_PURPOSE]
    return sorted(nets, key=lambda n: -n[0].prefixlen)  # longest prefix first


_SPECIAL = _special_purpose()


def special_purpose(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The registry name of the non-globally-reachable special-purpose range holding `addr`, or None.

    >>> special_purpose(ipaddress.ip_address("192.0.0.8")), special_purpose(ipaddress.ip_address("192.0.0.9"))
    ('IPv4 dummy address (RFC 7600)', None)
    """
    for net, why in _SPECIAL:
        if addr.version == net.version and addr in net:
            return why
    return None


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses an IPv6 address carries, with the mechanism's name: a packet to it ends at those addresses.

    IPv4-mapped (::ffff:a.b.c.d), NAT64 well-known prefix (64:ff9b::a.b.c.d, RFC 6052), 6to4 (2002:AABB:CCDD::,
    RFC 3056) and Teredo (2001:0::/32, RFC 4380: the server and the obfuscated client address).

    >>> embedded_ipv4(ipaddress.ip_address("2002:7f00:1::"))
    [('6to4', IPv4Address('127.0.0.1'))]
    """
    if addr.ipv4_mapped is not None:
        return [("IPv4-mapped", addr.ipv4_mapped)]
    if addr in _NAT64:
        return [("NAT64", ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))]
    if addr in _SIXTOFOUR:
        return [("6to4", addr.sixtofour)]  # type: ignore[list-item]
    if addr in _TEREDO:
        server, client = addr.teredo  # type: ignore[misc]
        return [("Teredo client", client), ("Teredo server", server)]
    return []


def check_address(ip: str, cfg: FetchConfig) -> str | None:
    """None if the fetcher may connect to `ip`, else why not.

    Order: `allowed_networks` (explicit holes) > an embedded IPv4 address (its verdict is the verdict) > cloud
    metadata addresses (refused even with allow_private) > `allow_private` > the special-purpose table > Python's
    address flags and `is_global`.
    """
    return _verdict(ipaddress.ip_address(ip.split("%", 1)[0]), cfg)


def _verdict(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, cfg: FetchConfig) -> str | None:
    for net in _networks(cfg.allowed_networks):
        if addr.version == net.version and addr in net:
            return None
    if isinstance(addr, ipaddress.IPv6Address) and (inner := embedded_ipv4(addr)):
        for label, v4 in inner:
            why = _verdict(v4, cfg)
            if why:
                return f"{label} address {addr} embeds {why}"
        return None
    if addr in METADATA_ADDRESSES:
        return f"cloud metadata address {addr}"
    if cfg.allow_private:
        return None
    if why := special_purpose(addr):
        return f"{why} address {addr}"
    for label, test in (("loopback", addr.is_loopback), ("link-local", addr.is_link_local),
                        ("private", addr.is_private), ("multicast", addr.is_multicast),
                        ("reserved", addr.is_reserved), ("unspecified", addr.is_unspecified)):
        if test:
            return f"{label} address {addr}"
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


# --- a lean HTTP/1.1 client -----------------------------------------------------------------------------------
# One GET per call on a keep-alive socket to an address that was already checked. Written for this one job (the
# per-image cost of urllib3 was ~0.45 ms CPU, about a fifth of an ingest; this path costs ~0.1 ms): every recv has
# a timeout of min(read timeout, what is left of the URL's total deadline) and the deadline is checked between
# recvs (a one-byte drip cannot hold a worker), the header block is capped, the body is capped while it streams
# (decoded size when a server compresses anyway), and a response is never left half-read on a pooled socket.

MAX_HEADER_BYTES = 65536
_ssl_context: Any = None


class _Conn:
    __slots__ = ("sock", "buf")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""  # bytes received past the end of the previous response (must stay empty to reuse)


class _Response:
    __slots__ = ("status", "headers", "conn", "version")

    def __init__(self, status: int, headers: dict[str, str], conn: _Conn, version: str):
        self.status, self.headers, self.conn, self.version = status, headers, conn, version


def _tls_context() -> Any:
    global _ssl_context
    if _ssl_context is None:
        import ssl

        _ssl_context = ssl.create_default_context()  # system CAs, certificate and host name checked
    return _ssl_context


def _recv(conn: _Conn, deadline: float, read_timeout: float, what: str) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Refused("timeout", f"total timeout while {what}")
    conn.sock.settimeout(min(read_timeout, remaining))
    try:
        return conn.sock.recv(262144)
    except TimeoutError:
        raise _Refused("timeout", f"read timeout while {what}") from None
    except OSError as exc:
        raise _Refused("connection_error", f"{exc.__class__.__name__} while {what}: {exc}") from None


def _read_head(conn: _Conn, deadline: float, read_timeout: float) -> tuple[str, int, dict[str, str]]:
    """Status line and headers (names lower-cased); 1xx interim responses are skipped."""
    while True:
        data = conn.buf
        while (end := data.find(b"\r\n\r\n")) < 0:
            if len(data) > MAX_HEADER_BYTES:
                raise _Refused("connection_error", f"response header block over {MAX_HEADER_BYTES} bytes")
            try:
                chunk = _recv(conn, deadline, read_timeout, "reading the response head")
            except _Refused as exc:
                if exc.reason == "connection_error" and not data:
                    exc.detail += " (no byte received)"
                raise
            if not chunk:
                raise _Refused("connection_error", "connection closed before a complete response head"
                               + (" (no byte received)" if not data else ""))
            data += chunk
        head, conn.buf = data[:end].decode("latin-1"), data[end + 4 :]
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (parts[1].isdigit() and len(parts[1]) == 3):
            raise _Refused("connection_error", f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200:
            continue
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _Refused("connection_error", f"malformed header line {line[:80]!r}")
            key, value = name.lower(), value.strip()
            if key in headers and key in ("content-length", "transfer-encoding", "location") and headers[key] != value:
                raise _Refused("connection_error", f"conflicting {name} headers")
            headers[key] = f"{headers[key]}, {value}" if key in headers and headers[key] != value else value
        return parts[0], status, headers


class _Body:
    """Streams a response body: framing (Content-Length, chunked, until close), optional gzip/deflate decoding,
    the size cap and the deadline. `read()` returns the whole body or raises _Refused."""

    def __init__(self, conn: _Conn, headers: dict[str, str], max_bytes: int, deadline: float, read_timeout: float):
        self.conn, self.max_bytes, self.deadline, self.read_timeout = conn, max_bytes, deadline, read_timeout
        te = headers.get("transfer-encoding", "").lower()
        self.chunked = te.endswith("chunked")
        length = headers.get("content-length")
        self.length = int(length) if (length and length.isdigit() and not self.chunked) else None
        if length is not None and self.length is None and not self.chunked:
            raise _Refused("connection_error", f"bad Content-Length {length!r}")
        # We ask for identity; a server that compresses anyway gets gzip/deflate decoded (as urllib3 did), other
        # codings pass through raw and fail validation as not_an_image.
        self.encoding = headers.get("content-encoding", "identity").strip().lower()
        self.decoder: Any = None
        if self.encoding in ("gzip", "x-gzip"):
            self.decoder = zlib.decompressobj(47)  # gzip or zlib header
        elif self.encoding == "deflate":
            self.decoder = zlib.decompressobj(15)  # zlib-wrapped; raw deflate is tried on the first error
        self.total = 0  # body bytes so far (decoded)
        self.complete = False  # the framing says the body ended exactly (the socket may be reused)

    def _more(self, what: str = "reading the body") -> bytes:
        chunk = _recv(self.conn, self.deadline, self.read_timeout, what)
        if chunk:
            return chunk
        raise _Refused("connection_error", "connection closed mid-body")

    def read(self) -> bytes:
        conn = self.conn
        if self.length is not None and self.decoder is None:
            n = self.length
            if n > self.max_bytes:
                raise _Refused("too_large", f"body exceeds max_bytes {self.max_bytes}")
            body = bytearray(conn.buf[:n])
            conn.buf = conn.buf[n:]
            while len(body) < n:
                body += self._more()
            if len(body) > n:
                conn.buf = bytes(body[n:])
                del body[n:]
            self.complete = True
            return bytes(body)
        out: list[bytes] = []
        if self.chunked:
            self._read_chunked(out)
        elif self.length is not None:
            left = self.length
            data, conn.buf = conn.buf[:left], conn.buf[left:]
            while True:
                left -= len(data)
                self._emit(data, out)
                if left <= 0:
                    break
                data = self._more()
                if len(data) > left:
                    data, conn.buf = data[:left], data[left:]
            self.complete = True
        else:  # delimited by the server closing the connection
            data, conn.buf = conn.buf, b""
            while True:
                self._emit(data, out)
                data = _recv(conn, self.deadline, self.read_timeout, "reading the body")
                if not data:
                    break
        if self.decoder is not None:
            self._emit(b"", out, final=True)
        return b"".join(out)

    def _emit(self, data: bytes, out: list[bytes], final: bool = False) -> None:
        if self.decoder is not None:
            try:
                data = self._decode(data, final)
            except zlib.error as exc:
                if self.encoding != "deflate" or self.total or final:
                    raise _Refused("connection_error", f"bad compressed body: {exc}") from None
                self.decoder, self.encoding = zlib.decompressobj(-15), "raw deflate"
                try:
                    data = self._decode(data, final)
                except zlib.error as exc2:
                    raise _Refused("connection_error", f"bad compressed body: {exc2}") from None
            if self.decoder.unconsumed_tail:  # more output was pending than the cap allows
                raise _Refused("too_large", f"body exceeds max_bytes {self.max_bytes}")
        self.total += len(data)
        if self.total > self.max_bytes:
            raise _Refused("too_large", f"body exceeds max_bytes {self.max_bytes}")
        out.append(data)

    def _decode(self, data: bytes, final: bool) -> bytes:
        return self.decoder.flush() if final else self.decoder.decompress(data, self.max_bytes + 1 - self.total)

    def _line(self) -> bytes:
        conn = self.conn
        while (i := conn.buf.find(b"\r\n")) < 0:
            if len(conn.buf) > 4096:
                raise _Refused("connection_error", "chunk header line too long")
            conn.buf += self._more()
        line, conn.buf = conn.buf[:i], conn.buf[i + 2 :]
        return line

    def _read_chunked(self, out: list[bytes]) -> None:
        conn = self.conn
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _Refused("connection_error", f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self._line():  # trailers up to the empty line
                    pass
                self.complete = True
                return
            if self.decoder is None and self.total + size > self.max_bytes:
                raise _Refused("too_large", f"body exceeds max_bytes {self.max_bytes}")
            while len(conn.buf) < size + 2:
                conn.buf += self._more()
            data, crlf, conn.buf = conn.buf[:size], conn.buf[size : size + 2], conn.buf[size + 2 :]
            if crlf != b"\r\n":
                raise _Refused("connection_error", "chunk not followed by CRLF")
            self._emit(data, out)


def _keep_alive(resp: _Response) -> bool:
    conn_hdr = resp.headers.get("connection", "").lower()
    if resp.version == "HTTP/1.0":
        return "keep-alive" in conn_hdr
    return "close" not in conn_hdr


def _close(conn: _Conn) -> None:
    try:
        conn.sock.close()
    except OSError:
        pass


class Fetcher:
    """Thread-safe downloader. `fetch(url)` for one URL, `fetch_many(urls)` for a bounded-concurrency stream."""

    def __init__(self, cfg: FetchConfig, *, resolver: Resolver = system_resolver, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.resolver = resolver
        self.sleep = sleep
        self._pools: dict[tuple[str, str, int, str], list[_Conn]] = {}  # idle keep-alive sockets
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

    def close(self) -> None:
        with self._lock:
            for idle in self._pools.values():
                for conn in idle:
                    _close(conn)
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
        start, cpu0 = time.monotonic(), time.thread_time_ns()
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
        result.cpu_ns = time.thread_time_ns() - cpu0
        return result

    def _read_file(self, url: str) -> bytes:
        given = Path(unquote(urlsplit(url).path))
        path = given.resolve()
        if not self._roots:
            raise _Refused("no_local_root", f"{given}: no local root is configured; file:// candidates are read only "
                           "under collect.local_dir (a collect run with the local_dir source records it)")
        if not any(path.is_relative_to(r) for r in self._roots):
            via = f" (a symlink to {path})" if path != given.absolute() else ""
            raise _Refused("outside_local_root", f"{given}{via} is outside the local root(s) "
                           f"{', '.join(map(str, self._roots))}; only files under collect.local_dir are read")
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
            slot = self._slot(host)
            with slot:
                self.connected_to.add(ip)
                resp = self._request(scheme, ip, port, host, path, deadline)
                conn, reusable = resp.conn, False
                try:
                    status = resp.status
                    result.status = status
                    if status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("location")  # the redirect body is never read
                        if not location:
                            raise _Refused("bad_redirect", f"{current}: HTTP {status} without Location")
                        current = urljoin(current, location)
                        continue
                    if status != 200:
                        retry_after = parse_retry_after(resp.headers.get("retry-after"))
                        reason = "http_429" if status == 429 else "http_5xx" if status >= 500 else f"http_{status}"
                        err = _Refused(reason, f"{current}: HTTP {status}")
                        err.retry_after = retry_after  # type: ignore[attr-defined]
                        raise err
                    result.final_url = current
                    result.content_type = resp.headers.get("content-type")
                    length = resp.headers.get("content-length")
                    if length and length.isdigit() and int(length) > cfg.max_bytes:
                        raise _Refused("too_large", f"Content-Length {length} > max_bytes {cfg.max_bytes}")
                    body = _Body(conn, resp.headers, cfg.max_bytes, deadline, cfg.read_timeout_s)
                    result.body = body.read()
                    reusable = body.complete and not conn.buf and _keep_alive(resp)
                    return
                finally:
                    self._release(scheme, ip, port, host, conn, reusable)
        raise _Refused("too_many_redirects", f"more than {cfg.max_redirects} redirects from {url}")

    def _request(self, scheme: str, ip: str, port: int, host: str, path: str, deadline: float) -> _Response:
        """Send one GET (on an idle pooled socket when there is one) and read the response head."""
        cfg = self.cfg
        hostport = f"[{host}]" if ":" in host else host
        request = (f"GET {path} HTTP/1.1\r\nHost: {hostport if port in (80, 443) else f'{hostport}:{port}'}\r\n"
                   f"User-Agent: {cfg.user_agent}\r\nAccept: image/*,*/*;q=0.5\r\nAccept-Encoding: identity\r\n\r\n"
                   ).encode("latin-1")
        while True:
            conn = self._idle(scheme, ip, port, host)
            reused = conn is not None
            if conn is None:
                conn = self._connect(scheme, ip, port, host, deadline)
            try:
                conn.sock.settimeout(max(0.001, min(cfg.read_timeout_s, deadline - time.monotonic())))
                conn.sock.sendall(request)
                version, status, headers = _read_head(conn, deadline, cfg.read_timeout_s)
                return _Response(status, headers, conn, version)
            except OSError as exc:
                _close(conn)
                if reused:  # the server dropped an idle keep-alive socket: try once more on a fresh one
                    continue
                raise _Refused("connection_error", f"{exc.__class__.__name__}: {exc}") from None
            except _Refused as exc:
                _close(conn)
                if reused and exc.reason == "connection_error" and "no byte received" in exc.detail:
                    continue
                raise

    def _connect(self, scheme: str, ip: str, port: int, host: str, deadline: float) -> _Conn:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refused("timeout", f"total timeout {self.cfg.total_timeout_s:g}s")
        timeout = min(self.cfg.connect_timeout_s, remaining)
        try:
            sock = socket.create_connection((ip, port), timeout=timeout)
        except TimeoutError:
            raise _Refused("timeout", f"connect to {ip}:{port} timed out") from None
        except OSError as exc:
            raise _Refused("connection_error", f"connect to {ip}:{port}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme == "https":
            try:
                sock = _tls_context().wrap_socket(sock, server_hostname=host)  # verifies the chain and the name
            except TimeoutError:
                sock.close()
                raise _Refused("timeout", f"TLS handshake with {host} ({ip}) timed out") from None
            except OSError as exc:
                sock.close()
                raise _Refused("connection_error", f"TLS with {host} ({ip}): {exc}") from None
        return _Conn(sock)

    def _idle(self, scheme: str, ip: str, port: int, host: str) -> _Conn | None:
        with self._lock:
            idle = self._pools.get((scheme, ip, port, host))
            while idle:
                conn = idle.pop()
                if scheme == "https":  # TLS may legitimately have bytes waiting (session tickets): see _request
                    return conn
                try:  # an idle socket with something to read was closed (or is in a state we did not leave it in)
                    conn.sock.settimeout(0.0)  # non-blocking: with a timeout Python would poll() first and wait
                    conn.sock.recv(1, socket.MSG_PEEK)
                except BlockingIOError:
                    return conn
                except OSError:
                    pass
                _close(conn)
        return None

    def _release(self, scheme: str, ip: str, port: int, host: str, conn: _Conn, reusable: bool) -> None:
        if reusable:
            with self._lock:
                idle = self._pools.setdefault((scheme, ip, port, host), [])
                if len(idle) < self.cfg.per_host:
                    idle.append(conn)
                    return
        _close(conn)

    # --- many URLs ----------------------------------------------------------------------------------------------
    def fetch_many(self, urls: Iterable[str], work: Callable[[FetchResult], Any] | None = None) -> Iterator[tuple[str, Any]]:
        """Fetch with at most `concurrency` in flight and `per_host` per host; yield (url, work(result) or result).

        URLs of a busy host wait in a per-host queue while other hosts' URLs go ahead, so one slow site does
        not park every worker. `work` runs in the download thread (validation, hashing, storing), so CPU work
        overlaps the network. Long-lived threads take jobs from one queue and hand results back on another:
        O(1) bookkeeping per URL (a futures `wait()` re-arms every pending future on each completion).
        An exception raised by `work` is re-raised here, after the threads finished what they had started.
        """
        source = iter(urls)
        waiting: dict[str, deque[str]] = defaultdict(deque)
        ready: deque[str] = deque()  # hosts with waiting URLs and a free slot
        busy: Counter[str] = Counter()
        limit, concurrency = self.cfg.per_host, self.cfg.concurrency
        jobs: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        done: queue.SimpleQueue[tuple[str, str, Any, BaseException | None]] = queue.SimpleQueue()
        threads: list[threading.Thread] = []

        def run() -> None:
            while (job := jobs.get()) is not None:
                u, host = job
                try:
                    r = self.fetch(u)
                    done.put((u, host, work(r) if work else r, None))
                except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who re-raises it
                    done.put((u, host, None, exc))

        def pick() -> tuple[str, str] | None:
            while ready:
                host = ready.popleft()
                if waiting[host] and busy[host] < limit:
                    return waiting[host].popleft(), host
            for u in source:
                host = _host_of(u)
                if busy[host] < limit:
                    return u, host
                waiting[host].append(u)
            return None

        in_flight = 0
        try:
            while True:
                while in_flight < concurrency and (job := pick()) is not None:
                    busy[job[1]] += 1
                    in_flight += 1
                    jobs.put(job)
                    if len(threads) < min(in_flight, concurrency):
                        t = threading.Thread(target=run, name=f"fetch-{len(threads)}", daemon=True)
                        t.start()
                        threads.append(t)
                if not in_flight:
                    return
                u, host, out, exc = done.get()
                in_flight -= 1
                busy[host] -= 1
                if waiting[host]:
                    ready.append(host)
                if exc is not None:
                    raise exc
                yield u, out
        finally:
            try:
                while True:  # jobs not started yet are dropped
                    jobs.get_nowait()
            except queue.Empty:
                pass
            for _ in threads:
                jobs.put(None)
            for t in threads:
                t.join()


def _host_of(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""
