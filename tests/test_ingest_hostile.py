"""Ingest against a hostile corpus the test generates and serves on loopback: every URL ends accepted-and-normalised
or rejected with the right reason, nothing crashes, nothing is lost; SSRF guard; resume after a crash."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from loopback_http import drip, start_loopback
from PIL import Image

from pipeline.config import load_settings
from pipeline.ingest.fetch import FetchConfig, Fetcher, check_address
from pipeline.ingest.stage import run_ingest
from pipeline.store import LocalStore


def jpeg(w=120, h=90, seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, "JPEG", **{"quality": 85, **save})
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def scan_start(data: bytes) -> int:
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


def corpus() -> dict[str, bytes]:
    rot = Image.fromarray(np.tile(np.linspace(0, 255, 80, dtype=np.uint8), (40, 1)), "L").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    anim = io.BytesIO()
    frames[0].save(anim, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    gray16 = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    good = jpeg(seed=1)
    photo = jpeg(400, 300, seed=4, quality=92)
    scan = scan_start(photo)
    # Random scan bytes without 0xFF (so no stray marker betrays them): every block decodes, nothing is right.
    garbage = np.random.default_rng(5).integers(0, 255, len(photo) - scan - 2, dtype=np.uint8).tobytes()
    big_app = b"\xff\xec" + (65535).to_bytes(2, "big") + bytes(65533)  # APP12 at its largest, twice
    return {
        # libjpeg only warns about these two (Pillow accepts them): garbage scan data closed with EOI, a cut + EOI.
        "/garbage-scan.jpg": photo[:scan] + garbage + b"\xff\xd9",
        "/half-eoi.jpg": photo[: len(photo) // 2] + b"\xff\xd9",
        # Unusual, not broken: kept byte for byte.
        "/progressive.jpg": jpeg(300, 200, seed=6, progressive=True),
        "/restart.jpg": jpeg(300, 200, seed=7, restart_marker_blocks=2),
        "/sampling-444.jpg": jpeg(300, 200, seed=8, subsampling=0),
        "/big-app.jpg": photo[:2] + big_app * 2 + photo[2:],
        "/ok.jpg": good,
        "/zero.jpg": b"",
        "/truncated.jpg": good[: len(good) // 2],
        "/page.jpg": b"<!DOCTYPE html><html><body>Not found</body></html>",
        "/bomb.png": png_claiming(100_000, 100_000),
        "/logo.svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "/anim.gif": anim.getvalue(),
        "/cmyk.jpg": encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG"),
        "/gray16.png": encode(gray16, "PNG"),
        "/rotated.jpg": encode(rot, "JPEG", exif=exif.tobytes()),
        "/tiny.png": encode(Image.new("RGB", (1, 1)), "PNG"),
        "/alpha.png": encode(rgba, "PNG"),
        "/huge.jpg": jpeg(900, 900, seed=2, quality=100) + b"\x00" * 300_000,
    }


EXPECTED = {
    "/garbage-scan.jpg": ("rejected", "corrupt_scan"), "/half-eoi.jpg": ("rejected", "corrupt_scan"),
    "/progressive.jpg": ("accepted", None), "/restart.jpg": ("accepted", None), "/sampling-444.jpg": ("accepted", None),
    "/big-app.jpg": ("accepted", None),
    "/ok.jpg": ("accepted", None), "/zero.jpg": ("rejected", "empty"), "/truncated.jpg": ("rejected", "truncated"),
    "/page.jpg": ("rejected", "not_an_image"), "/bomb.png": ("rejected", "bomb"),
    "/logo.svg": ("rejected", "unsupported_format"), "/anim.gif": ("rejected", "animated"),
    "/cmyk.jpg": ("accepted", None), "/gray16.png": ("accepted", None), "/rotated.jpg": ("accepted", None),
    "/tiny.png": ("rejected", "too_small"), "/alpha.png": ("accepted", None), "/huge.jpg": ("rejected", "too_large"),
    "/huge-nolength.jpg": ("rejected", "too_large"), "/drip.jpg": ("rejected", "timeout"),
    "/to-private": ("rejected", "blocked_address"), "/to-metadata": ("rejected", "blocked_address"),
    "/missing.jpg": ("rejected", "http_404"), "/flaky.jpg": ("accepted", None), "/loop": ("rejected", "too_many_redirects"),
}


@pytest.fixture
def hostile_server():
    files = corpus()
    lb = start_loopback()
    flaky = {"n": 0}

    def handler(req, h):
        p = req.path
        if p in files:
            return 200, {"Content-Type": "image/jpeg"}, files[p]
        if p == "/huge-nolength.jpg":
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Connection", "close")
            h.end_headers()
            try:
                for _ in range(40):
                    h.wfile.write(b"\xff" * 10_000)
            except (BrokenPipeError, ConnectionResetError):
                pass
            h.close_connection = True
            return None
        if p == "/drip.jpg":
            h.send_response(200)
            h.send_header("Content-Length", "100000")
            h.end_headers()
            drip(h, b"\xff")  # one byte per 0.1 s: every read is quick, the whole is not
            return None
        if p == "/to-private":
            return 302, {"Location": "http://10.0.0.1/secret.jpg"}, b""
        if p == "/to-metadata":
            return 301, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""
        if p == "/loop":
            return 302, {"Location": "/loop"}, b""
        if p == "/flaky.jpg":
            flaky["n"] += 1
            if flaky["n"] == 1:
                return 503, {"Retry-After": "0"}, b"busy"
            return 200, {}, jpeg(seed=3)
        return 404, {}, b"not here"

    lb.handler = handler
    lb.files = files
    yield lb
    lb.stop()


@pytest.fixture
def no_traffic_off_loopback(monkeypatch):
    """Safety net: even a broken guard cannot open a socket to anything but 127.0.0.1 in these tests."""
    import socket

    real = socket.create_connection  # the fetcher's only way to open a connection

    def guarded(address, *a, **kw):
        assert address[0] == "127.0.0.1", f"test tried to connect to {address}"
        return real(address, *a, **kw)

    monkeypatch.setattr(socket, "create_connection", guarded)


def settings_for(tmp_path, **ingest):
    base = {"allowed_networks": ["127.0.0.0/8"], "max_bytes": 250_000, "total_timeout_s": 1.5, "read_timeout_s": 1.0,
            "backoff_s": 0.01, "max_retries": 2, "concurrency": 8, "per_host": 4, "flush_every": 3}
    base.update(ingest)
    return load_settings(env={}, overrides={"ingest": base, "store": {"url": str(tmp_path / "store")}})


def write_candidates(store, urls, wnid="n00000001"):
    now = datetime.now(UTC)
    store.write_table("candidates", pd.DataFrame({
        "wnid": wnid, "source": "url_list", "query": None, "url": urls, "page_url": None, "title": None,
        "license": None, "license_url": None, "creator": None, "rank": np.arange(len(urls), dtype="int32"), "found_at": now,
    }))


def test_hostile_corpus_every_item_settles_with_the_right_reason(hostile_server, tmp_path, no_traffic_off_loopback):
    store = LocalStore(tmp_path / "store")
    urls = [hostile_server.url + p for p in EXPECTED]
    write_candidates(store, urls)
    summary = run_ingest(store, settings_for(tmp_path))
    images = store.read_table("images").to_pandas().set_index("first_url")
    assert len(images) == len(EXPECTED)  # nothing lost, nothing doubled
    got = {u.removeprefix(hostile_server.url): (r.status, None if pd.isna(r.reject_reason) else r.reject_reason) for u, r in images.iterrows()}
    assert got == EXPECTED
    assert summary["rejected"]["blocked_address"] == 2
    # Clean JPEG stored byte for byte; everything else normalised to RGB JPEG once.
    for path in ("/ok.jpg", "/progressive.jpg", "/restart.jpg", "/sampling-444.jpg", "/big-app.jpg"):
        ok = images.loc[hostile_server.url + path]
        assert ok.image_id == hashlib.sha256(hostile_server.files[path]).hexdigest()
        assert store.get(ok.storage_key) == hostile_server.files[path]
    for path, size in (("/cmyk.jpg", (64, 48)), ("/gray16.png", (64, 64)), ("/rotated.jpg", (40, 80)), ("/alpha.png", (64, 64))):
        row = images.loc[hostile_server.url + path]
        data = store.get(row.storage_key)
        assert hashlib.sha256(data).hexdigest() == row.image_id
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", size), path
        assert (row.width, row.height) == size
    px = np.asarray(Image.open(io.BytesIO(store.get(images.loc[hostile_server.url + "/cmyk.jpg"].storage_key))))
    assert px[..., 0].mean() > 200 and px[..., 1].mean() < 60  # CMYK (0,255,255,0) is red, not inverted
    g16 = np.asarray(Image.open(io.BytesIO(store.get(images.loc[hostile_server.url + "/gray16.png"].storage_key))))
    assert 30 < g16.mean() < 200  # scaled from 16 bits, not clipped to white
    alpha = np.asarray(Image.open(io.BytesIO(store.get(images.loc[hostile_server.url + "/alpha.png"].storage_key))))
    assert alpha.min() > 240  # transparent pixels composited over white
    rot = np.asarray(Image.open(io.BytesIO(store.get(images.loc[hostile_server.url + "/rotated.jpg"].storage_key))).convert("L"))
    assert rot[0].mean() < rot[-1].mean()  # the left-to-right ramp now runs top to bottom
    assert images["phash"].notna().sum() == 10 and images.loc[images.status == "accepted", "phash"].notna().all()
    # The private and metadata hops were refused before any connection.
    assert not any(r.path == "/secret.jpg" for r in hostile_server.requests)


def test_default_configuration_refuses_loopback_and_private(hostile_server, no_traffic_off_loopback):
    fetcher = Fetcher(FetchConfig())
    result = fetcher.fetch(hostile_server.url + "/ok.jpg")
    assert result.reason == "blocked_address" and "loopback" in result.detail
    assert hostile_server.requests == [] and fetcher.connected_to == set()
    for ip in ("10.1.1.1", "172.16.0.5", "192.168.1.1", "169.254.169.254", "100.64.0.1", "::1", "fe80::1",
               "::ffff:127.0.0.1", "0.0.0.0", "fd00:ec2::254"):
        assert check_address(ip, FetchConfig()) is not None, ip
    assert check_address("93.184.216.34", FetchConfig()) is None
    # The metadata address stays refused even when private addresses are allowed, unless listed explicitly.
    assert check_address("169.254.169.254", FetchConfig(allow_private=True)) is not None


def test_dns_answers_are_checked_and_pinned(hostile_server, no_traffic_off_loopback):
    cfg = FetchConfig(allowed_networks=("127.0.0.0/8",))
    rebinding = Fetcher(cfg, resolver=lambda host, port: ["127.0.0.1", "10.0.0.7"])
    assert rebinding.fetch(f"http://images.example:{hostile_server.server.server_address[1]}/ok.jpg").reason == "blocked_address"
    pinned = Fetcher(cfg, resolver=lambda host, port: ["127.0.0.1"])
    r = pinned.fetch(f"http://images.example:{hostile_server.server.server_address[1]}/ok.jpg")
    assert r.ok and r.body == hostile_server.files["/ok.jpg"]
    assert hostile_server.requests[-1].headers["Host"].startswith("images.example")


def test_file_urls_outside_the_local_roots_are_refused(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg())
    (tmp_path / "root").mkdir()
    r = Fetcher(FetchConfig(file_roots=(str(tmp_path / "root"),))).fetch(secret.as_uri())
    assert r.reason == "outside_local_root" and "outside the local root" in r.detail
    assert Fetcher(FetchConfig(file_roots=(str(tmp_path),))).fetch(secret.as_uri()).ok
    # A symlink inside the root that leaves it is judged by its target, and says so.
    (tmp_path / "root" / "link.jpg").symlink_to(secret)
    r = Fetcher(FetchConfig(file_roots=(str(tmp_path / "root"),))).fetch((tmp_path / "root" / "link.jpg").as_uri())
    assert r.reason == "outside_local_root" and "symlink" in r.detail
    # No root at all: its own reason, naming the setting.
    r = Fetcher(FetchConfig()).fetch(secret.as_uri())
    assert r.reason == "no_local_root" and "collect.local_dir" in r.detail


class Crash(Exception):
    pass


def test_resume_after_a_crash_skips_settled_urls_and_never_duplicates(hostile_server, tmp_path):
    store = LocalStore(tmp_path / "store")
    for i in range(12):
        hostile_server.files[f"/img{i}.jpg"] = jpeg(64, 64, seed=100 + i)
    urls = [hostile_server.url + f"/img{i}.jpg" for i in range(12)] + [hostile_server.url + "/missing.jpg"]
    write_candidates(store, urls)
    settings = settings_for(tmp_path, concurrency=1, flush_every=3)
    seen = {"n": 0}

    def crash_after_7(row):
        seen["n"] += 1
        if seen["n"] == 7:
            raise Crash

    with pytest.raises(Crash):
        run_ingest(store, settings, on_result=crash_after_7)
    assert not store.has_table("images")
    assert len(store.list("ingest/parts/")) >= 2  # checkpoints survived the crash
    before = len(hostile_server.requests)
    summary = run_ingest(store, settings)
    refetched = {r.path for r in hostile_server.requests[before:]}
    assert summary["skipped_settled"] == 7 and summary["fetched"] == len(urls) - 7 == len(refetched)
    images = store.read_table("images").to_pandas()
    assert len(images) == len(urls) and images["first_url"].is_unique
    assert (images.status == "accepted").sum() == 12 and store.list("ingest/parts/") == []
    # A third run fetches nothing and changes nothing.
    again = run_ingest(store, settings)
    assert again["fetched"] == 0
    assert store.read_table("images").equals(store.read_table("images"))
    links = store.read_table("image_links").to_pandas()
    assert len(links) == 12 and links["image_id"].is_unique


def test_transient_failures_are_retried_on_the_next_run(hostile_server, tmp_path):
    store = LocalStore(tmp_path / "store")
    state = {"down": True}
    base = hostile_server.handler

    def handler(req, h):
        if req.path == "/sometimes.jpg":
            return (503, {}, b"down") if state["down"] else (200, {}, hostile_server.files["/ok.jpg"])
        return base(req, h)

    hostile_server.handler = handler
    write_candidates(store, [hostile_server.url + "/sometimes.jpg", hostile_server.url + "/missing.jpg"])
    settings = settings_for(tmp_path, max_retries=1)
    first = run_ingest(store, settings)
    assert first["rejected"] == {"http_5xx": 1, "http_404": 1}
    state["down"] = False
    second = run_ingest(store, settings)
    assert second["fetched"] == 1  # the 404 is settled, the 503 is not
    images = store.read_table("images").to_pandas()
    assert len(images) == 2 and sorted(images.status) == ["accepted", "rejected"]


def test_two_worker_processes_give_the_same_tables_as_one(hostile_server, tmp_path):
    paths = ["/ok.jpg", "/cmyk.jpg", "/page.jpg", "/missing.jpg", "/alpha.png", "/tiny.png"]
    urls = [hostile_server.url + p + q for p in paths for q in ("", "?copy=1")]
    tables = []
    for processes, reuse in ((1, False), (2, True)):
        store = LocalStore(tmp_path / f"store{processes}")
        write_candidates(store, urls)
        run_ingest(store, settings_for(tmp_path, processes=processes, reuse_validation=reuse))
        tables.append(store.read_table("images").to_pandas().drop(columns=["storage_key", "fetched_at"]))
    one, two = tables
    assert len(one) == len(urls) and one.equals(two)
    assert sorted(one.status.value_counts().items()) == [("accepted", 3), ("duplicate", 3), ("rejected", 6)]
