"""Units of the downloader (retries, Retry-After, politeness, size cap) and the validator (format from bytes,
conversions, orientation, pixel budget)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from loopback_http import drip, start_loopback
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


# --- the HTTP/1.1 client under the fetcher: framing, compression, keep-alive, slow heads, TLS ----------------


def test_chunked_close_delimited_and_gzip_bodies(lb):
    import gzip

    payload = bytes(range(256)) * 40

    def handler(req, h):
        if req.path == "/chunked":
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for i in range(0, len(payload), 3000):
                part = payload[i : i + 3000]
                h.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
            h.wfile.write(b"0\r\nX-Trailer: yes\r\n\r\n")
            return None
        if req.path == "/close":
            h.send_response(200)
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(payload)
            h.close_connection = True
            return None
        if req.path == "/gzip":
            return 200, {"Content-Encoding": "gzip"}, gzip.compress(payload)
        if req.path == "/gzip-bomb":
            return 200, {"Content-Encoding": "gzip"}, gzip.compress(b"\0" * 2_000_000)
        return 200, {}, payload

    lb.handler = handler
    f = Fetcher(FetchConfig(allowed_networks=LOOP, max_bytes=100_000))
    for path in ("/chunked", "/close", "/gzip", "/plain", "/chunked"):  # a chunked body leaves the socket reusable
        r = f.fetch(lb.url + path)
        assert r.ok and r.body == payload, (path, r.reason, r.detail)
    bomb = f.fetch(lb.url + "/gzip-bomb")  # 2 KB on the wire, 2 MB decoded: the cap applies to what is decoded
    assert bomb.reason == "too_large"


def test_keep_alive_reuses_a_connection_and_recovers_when_the_server_drops_it(lb):
    peers = []

    def handler(req, h):
        peers.append(h.client_address[1])
        if req.path == "/last":
            h.close_connection = True  # the server drops the socket after answering, without saying so
        return 200, {}, b"x" * 1000

    lb.handler = handler
    f = Fetcher(FetchConfig(allowed_networks=LOOP))
    assert all(f.fetch(f"{lb.url}/{i}").ok for i in range(5))
    assert len(set(peers)) == 1  # one TCP connection for five sequential requests
    assert f.fetch(lb.url + "/last").ok
    time.sleep(0.1)
    r = f.fetch(lb.url + "/after")  # the pooled socket is dead now: a fresh one is used, the URL still succeeds
    assert r.ok and r.attempts == 1 and peers[-1] != peers[0]
    f.close()


def test_a_dripped_response_head_hits_the_total_deadline(lb):
    def handler(req, h):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        drip(h, b"X-Slow: 1\r\n")

    lb.handler = handler
    t0 = time.monotonic()
    r = Fetcher(FetchConfig(allowed_networks=LOOP, read_timeout_s=1.0, total_timeout_s=0.8, max_retries=0)).fetch(lb.url + "/x")
    assert r.reason == "timeout" and time.monotonic() - t0 < 3.0


def test_https_certificates_are_verified(tmp_path, monkeypatch):
    import datetime
    import ssl
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"https://localhost:{server.server_address[1]}/x"
        f = Fetcher(FetchConfig(allowed_networks=LOOP, max_retries=0), resolver=lambda host, port: ["127.0.0.1"])
        r = f.fetch(url)  # self-signed: not trusted by the system store
        assert r.reason == "connection_error" and "CERTIFICATE_VERIFY_FAILED" in r.detail
        # Trusted, the same server answers; under another name (SNI and check) it is refused again.
        import pipeline.ingest.fetch as fetch_mod

        monkeypatch.setattr(fetch_mod, "_ssl_context", ssl.create_default_context(cafile=str(tmp_path / "cert.pem")))
        good = Fetcher(FetchConfig(allowed_networks=LOOP), resolver=lambda host, port: ["127.0.0.1"]).fetch(url)
        assert good.ok and good.body == b"ok"
        other = Fetcher(FetchConfig(allowed_networks=LOOP, max_retries=0), resolver=lambda host, port: ["127.0.0.1"])
        wrong = other.fetch(f"https://images.example:{server.server_address[1]}/x")
        assert wrong.reason == "connection_error" and "match" in wrong.detail.lower()
    finally:
        server.shutdown()
        server.server_close()


def _photo_jpeg(w=400, h=300, seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(buf, "JPEG", **{"quality": 90, **save})
    return buf.getvalue()


def _scan_start(data: bytes) -> int:
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


def _pil_full_decode_ok(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()
        return True
    except OSError:
        return False


def test_strict_decode_rejects_damaged_scans_that_a_full_decode_lets_through():
    # libjpeg only warns about these and Pillow's full decode accepts them; the strict decode turns the warning into
    # the verdict. Every file a full decode rejects is rejected too.
    good = _photo_jpeg()
    mid, scan = len(good) // 2, _scan_start(good)
    garbage = np.random.default_rng(7).integers(0, 256, len(good) - scan - 2, dtype=np.uint8).tobytes()
    a0 = 4 + int.from_bytes(good[4:6], "big")  # end of the APP0 segment
    junk_header = good[:a0] + b"\x00\x00\x00" + good[a0:]  # junk between two header segments: harmless
    cases = {
        "good": (good, None),
        "cut, no EOI": (good[: int(len(good) * 0.9)], "truncated"),
        "cut mid-byte": (good[: mid + 7], "truncated"),
        "cut in half + EOI": (good[:mid] + b"\xff\xd9", "corrupt_scan"),
        "garbage scan + EOI": (good[:scan] + garbage + b"\xff\xd9", "corrupt_scan"),
        "garbage scan, byte-stuffed + EOI": (good[:scan] + garbage.replace(b"\xff", b"\xfe") + b"\xff\xd9", "corrupt_scan"),
        "stray restart markers": (good[:mid] + b"\xff\xd0" * 4 + good[mid:], "corrupt_scan"),
        "5000 bytes zeroed": (good[:mid] + b"\x00" * 5000 + good[mid + 5000 :], "corrupt_scan"),
        "3 bytes of padding before EOI": (good[:-2] + b"\x00" * 3 + b"\xff\xd9", None),
        "data after EOI": (good + b"trailer" * 200, None),
        "junk between header segments": (junk_header, None),
        "junk header, cut in half + EOI": (junk_header[:mid] + b"\xff\xd9", "corrupt_scan"),
    }
    for name, (data, reason) in cases.items():
        v = validate_image(data, ValidateConfig())
        assert (v.ok, v.reason) == (reason is None, reason), (name, v.reason, v.detail)
        if not _pil_full_decode_ok(data):
            assert not v.ok, name
    assert _pil_full_decode_ok(cases["cut in half + EOI"][0])  # the case this exists for
    assert _pil_full_decode_ok(cases["garbage scan, byte-stuffed + EOI"][0])
    # The same check guards the paths that re-encode: a rotated JPEG and a CMYK JPEG with a damaged scan.
    exif = Image.Exif()
    exif[0x0112] = 6
    for data in (_photo_jpeg(exif=exif.tobytes()), img_bytes("JPEG", "CMYK", size=(200, 150), color=(0, 90, 200, 10))):
        assert validate_image(data, ValidateConfig()).ok
        cut = data[: len(data) * 2 // 3] + b"\xff\xd9"
        assert validate_image(cut, ValidateConfig()).reason == "corrupt_scan"


def test_unusual_but_valid_jpegs_are_accepted_byte_for_byte():
    import cv2

    rng = np.random.default_rng(1)
    px = np.asarray(Image.fromarray((rng.random((12, 16, 3)) * 255).astype("uint8")).resize((400, 300), Image.BICUBIC))
    img = Image.fromarray(px)

    def pil(**kw):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, **kw)
        return buf.getvalue()

    def opencv(*params):
        ok, enc = cv2.imencode(".jpg", px[:, :, ::-1], list(params))
        assert ok
        return enc.tobytes()

    app = b"\xff\xeb" + (65535).to_bytes(2, "big") + bytes(65533)  # a maximal APP11 segment
    plain = pil()
    files = {
        "progressive": pil(progressive=True),
        "progressive, optimised tables": opencv(cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_OPTIMIZE, 1),
        "restart every 3 MCUs": pil(restart_marker_blocks=3),
        "restart every MCU row": pil(restart_marker_rows=1),
        "restart interval 2 (OpenCV)": opencv(cv2.IMWRITE_JPEG_RST_INTERVAL, 2),
        "4:4:4": pil(subsampling=0),
        "4:2:2": pil(subsampling=1),
        "4:1:1": opencv(cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411),
        "4:4:0": opencv(cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440),
        "200 KB ICC profile (4 APP2 segments)": pil(icc_profile=bytes(rng.integers(0, 256, 200_000, dtype=np.uint8))),
        "60 KB comment": pil(comment=b"c" * 60_000),
        "maximal APP11 segment": plain[:2] + app + plain[2:],
        "grayscale": img_bytes("JPEG", "L", size=(300, 200), color=90),
    }
    for name, data in files.items():
        v = validate_image(data, ValidateConfig())
        assert v.ok and v.stored is data and not v.reencoded, (name, v.reason, v.detail)
        assert (v.width, v.height) == Image.open(io.BytesIO(data)).size and v.features["phash"] is not None
    # A damaged scan in the unusual layouts is still caught.
    for name in ("progressive", "restart every 3 MCUs", "4:1:1"):
        data = files[name]
        assert validate_image(data[: len(data) // 2] + b"\xff\xd9", ValidateConfig()).reason == "corrupt_scan", name


def test_strict_decode_gives_the_pixels_of_pillows_draft_decode():
    # The fingerprint is computed from the strict decode: same DCT scale and pixels as Pillow's draft mode, so
    # fingerprints of images ingested before the decoder changed still match.
    from pipeline.ingest.fingerprint import DRAFT_MIN_SIDE, fingerprint
    from pipeline.ingest.validate import decode_jpeg_strict, draft_scale

    for w, h in ((400, 300), (1100, 700), (2600, 2000), (150, 140), (257, 129)):
        data = _photo_jpeg(w, h, seed=w)
        ref = Image.open(io.BytesIO(data))
        ref.draft("L", (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))
        ref.load()
        got = decode_jpeg_strict(data, "GRAY", w, h, draft_scale(w, h))[:, :, 0]
        assert got.shape == (ref.height, ref.width) and np.array_equal(got, np.asarray(ref)), (w, h)
        assert validate_image(data, ValidateConfig(min_side=16)).features == fingerprint(ref)


def test_fetch_many_reraises_a_work_error_and_leaves_no_thread_behind(lb):
    lb.handler = lambda req, h: (200, {}, b"ok")

    def work(r):
        if r.url.endswith("/7"):
            raise ValueError("boom on 7")
        return r.body

    f = Fetcher(FetchConfig(allowed_networks=LOOP, concurrency=4, per_host=4))
    with pytest.raises(ValueError, match="boom on 7"):
        for _ in f.fetch_many([f"{lb.url}/{i}" for i in range(40)], work):
            pass
    assert not [t for t in threading.enumerate() if t.name.startswith("fetch-")]
    assert sorted(dict(f.fetch_many([f"{lb.url}/{i}" for i in range(6)], lambda r: r.body)).values()) == [b"ok"] * 6
