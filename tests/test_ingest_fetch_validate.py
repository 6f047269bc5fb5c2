"""Units of the downloader (retries, Retry-After, politeness, size cap) and the validator (format from bytes,
conversions, orientation, pixel budget)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from loopback_http import start_loopback
from PIL import Image

from pipeline.ingest.fetch import FetchConfig, Fetcher
from pipeline.ingest.validate import ValidateConfig, detect_format, to_rgb, validate_image

LOOP = ("127.0.0.0/8",)


@pytest.fixture
def lb():
    server = start_loopback()
    yield server
    server.stop()


def img_bytes(fmt, mode="RGB", size=(64, 48), color=(10, 200, 30), **kw):
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != "P" else 3).save(buf, fmt, **kw)
    return buf.getvalue()


def test_fetch_retries_429_honouring_retry_after(lb):
    n = {"calls": 0}

    def handler(req, h):
        n["calls"] += 1
        return (429, {"Retry-After": "3"}, b"slow down") if n["calls"] < 3 else (200, {}, b"payload")

    lb.handler = handler
    sleeps = []
    f = Fetcher(FetchConfig(allowed_networks=LOOP, backoff_s=0.01, max_retries=3), sleep=sleeps.append)
    r = f.fetch(lb.url + "/x")
    assert r.ok and r.body == b"payload" and r.attempts == 3 and sleeps == [3.0, 3.0]


def test_fetch_gives_up_on_a_long_retry_after_without_waiting(lb):
    lb.handler = lambda req, h: (503, {"Retry-After": "3600"}, b"")
    sleeps = []
    r = Fetcher(FetchConfig(allowed_networks=LOOP, max_retry_after_s=60), sleep=sleeps.append).fetch(lb.url + "/x")
    assert r.reason == "http_5xx" and sleeps == [] and "exceeds" in r.detail and len(lb.requests) == 1


def test_content_length_over_the_cap_is_refused_before_reading(lb):
    lb.handler = lambda req, h: (200, {}, b"x" * 5000)
    r = Fetcher(FetchConfig(allowed_networks=LOOP, max_bytes=1000)).fetch(lb.url + "/big")
    assert r.reason == "too_large" and "Content-Length" in r.detail


def test_per_host_politeness_and_total_concurrency(lb):
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def handler(req, h):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return 200, {}, b"ok"

    lb.handler = handler
    f = Fetcher(FetchConfig(allowed_networks=LOOP, concurrency=8, per_host=2))
    port = lb.server.server_address[1]
    # Two host names for one server: the limit is per name, and a busy host does not block the other.
    urls = [f"http://127.0.0.1:{port}/{i}" for i in range(10)] + [f"http://localhost:{port}/{i}" for i in range(10)]
    f.resolver = lambda host, p: ["127.0.0.1"]
    got = dict(f.fetch_many(urls))
    assert len(got) == 20 and all(r.ok for r in got.values())
    assert state["peak"] <= 4  # 2 per host x 2 hosts, never the 8 threads


def test_detect_format_uses_bytes_not_names():
    assert detect_format(img_bytes("PNG")) == "png"
    assert detect_format(img_bytes("WEBP")) == "webp"
    assert detect_format(img_bytes("BMP")) == "bmp"
    assert detect_format(img_bytes("GIF", "P")) == "gif"
    assert detect_format(b"<svg xmlns='http://www.w3.org/2000/svg'/>") == "svg"
    assert detect_format(b"\x00\x00\x00\x18ftypheic") == "heif"
    assert detect_format(b"<html><body>") is None and detect_format(b"") is None


def test_palette_with_transparency_and_la_go_to_rgb_over_white():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert np.asarray(to_rgb(p)).min() == 255
    la = Image.new("LA", (4, 4), (0, 0))
    assert np.asarray(to_rgb(la)).min() == 255
    assert to_rgb(Image.new("CMYK", (4, 4))).mode == "RGB"


def test_clean_jpeg_kept_byte_for_byte_and_rotated_jpeg_reencoded():
    clean = img_bytes("JPEG", size=(100, 50))
    v = validate_image(clean, ValidateConfig())
    assert v.ok and v.stored is clean and not v.reencoded and (v.width, v.height) == (100, 50)
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = img_bytes("JPEG", size=(100, 50), exif=exif.tobytes())
    v = validate_image(rotated, ValidateConfig())
    assert v.ok and v.reencoded and (v.width, v.height) == (50, 100)
    assert Image.open(io.BytesIO(v.stored)).getexif().get(0x0112) in (None, 1)  # not rotated twice by viewers


def test_limits_and_formats():
    cfg = ValidateConfig(min_side=32, max_side=1000, max_pixels=500_000, allowed_formats=("jpeg", "png"))
    assert validate_image(img_bytes("PNG", size=(100, 20)), cfg).reason == "too_small"
    assert validate_image(img_bytes("PNG", size=(1200, 300)), cfg).reason == "dims_too_large"
    assert validate_image(img_bytes("PNG", size=(900, 900)), cfg).reason == "bomb"
    assert validate_image(img_bytes("WEBP"), cfg).reason == "unsupported_format"
    truncated_png = img_bytes("PNG", size=(200, 200))[:-40]
    assert validate_image(truncated_png, cfg).reason in ("truncated", "decode_error")
    v = validate_image(img_bytes("PNG", mode="I;16", size=(64, 64), color=40000), ValidateConfig())
    px = np.asarray(Image.open(io.BytesIO(v.stored)))
    assert v.ok and 140 < px.mean() < 170  # 40000/65535 of white, not clipped
    assert set(v.features) >= {"phash"} and all(0 <= x < 2**64 for x in v.features.values())
