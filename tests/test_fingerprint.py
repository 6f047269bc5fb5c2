"""Fingerprints: draft-mode decode agrees with a full decode, orientation and odd modes handled, thumbs round-trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.ingest.fingerprint import (
    FINGERPRINT_COLUMNS,
    decode_for_fingerprint,
    fingerprint,
    thumb_words,
    unpack_thumbs,
)
from pipeline.schemas import arrow_schema
from tests.test_neardup import _photo


def _ham(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def test_columns_are_in_images_schema_and_fit_uint64() -> None:
    fp = fingerprint(_photo(1))
    assert tuple(fp) == FINGERPRINT_COLUMNS
    names = arrow_schema("images").names
    assert all(c in names and 0 <= fp[c] < 2**64 for c in fp)


def test_draft_decode_close_to_full_decode() -> None:
    img = _photo(4, size=1200)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    small = decode_for_fingerprint(buf.getvalue())
    assert max(small.size) < 1200 and min(small.size) >= 128  # draft mode really reduced the decode
    full, cheap = fingerprint(Image.open(io.BytesIO(buf.getvalue()))), fingerprint(small)
    assert _ham(full["phash"], cheap["phash"]) <= 4


def test_exif_orientation_applied() -> None:
    img = _photo(5, size=200).crop((0, 0, 200, 120))
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
    shown = decode_for_fingerprint(buf.getvalue())
    assert shown.size == (200, 120)
    assert _ham(fingerprint(shown)["phash"], fingerprint(img)["phash"]) <= 6


def test_16bit_grey_is_rescaled_not_clipped() -> None:
    a = (np.asarray(_photo(6).convert("L"), dtype=np.uint16) * 200).astype(np.uint16)
    img16 = Image.fromarray(a)  # mode I;16
    assert _ham(fingerprint(img16)["phash"], fingerprint(_photo(6).convert("L"))["phash"]) <= 4
    assert fingerprint(img16)["phash"] not in (0, 2**64 - 1)


def test_flat_image_is_deterministic_and_thumbs_round_trip() -> None:
    assert fingerprint(Image.new("L", (1, 1), 7)) == fingerprint(Image.new("RGB", (50, 30), (7, 7, 7)))
    gray = _photo(7).convert("L")
    z = unpack_thumbs(np.array([thumb_words(gray)], dtype=np.uint64))[0]
    t = np.asarray(gray.resize((8, 8), Image.Resampling.BOX), dtype=np.float64).ravel()
    ref = np.clip((t - t.mean()) / t.std(), -2, 2)
    assert np.abs(z - ref).max() <= 0.25 + 1e-6  # within one 4-bit level


def test_undecodable_bytes_raise() -> None:
    with pytest.raises(OSError):
        decode_for_fingerprint(b"<html>not an image</html>")


def _reference_fingerprint(img: Image.Image) -> dict[str, int]:
    """The one-hash-at-a-time definition (np.median per hash, bits OR-ed one by one) the batched code must equal."""
    from pipeline.ingest.fingerprint import (
        _NIBBLE_SHIFTS,
        HASH_WINDOWS,
        THUMB_COLUMNS,
        _luminance,
        _resize,
        phash_from_gray32,
    )

    gray = _luminance(img)
    w, h = gray.size
    out = {c: phash_from_gray32(np.asarray(gray.resize((32, 32), Image.Resampling.BOX, box=(w * x0, h * y0, w * x1, h * y1)),
                                           dtype=np.float64))
           for c, (x0, y0, x1, y1) in HASH_WINDOWS.items()}
    t = _resize(gray, (8, 8)).ravel()
    z = (t - t.mean()) / t.std() if t.std() > 1e-6 else np.zeros_like(t)
    q = np.clip(np.floor((z + 2.0) / 4.0 * 16), 0, 15).astype(np.uint64)
    for w, c in enumerate(THUMB_COLUMNS):
        out[c] = int(np.bitwise_or.reduce(q[w * 16 : (w + 1) * 16] << _NIBBLE_SHIFTS))
    return out


def test_batched_fingerprint_equals_the_per_hash_definition() -> None:
    # Stored fingerprints must not change with the faster code: photos, flat images (whose hash bits come from
    # rounding noise, the most fragile case), gradients, odd sizes and modes.
    rng = np.random.default_rng(3)
    imgs = [_photo(i) for i in range(6)]
    imgs += [Image.new("L", (int(rng.integers(1, 90)), int(rng.integers(1, 90))), int(v)) for v in rng.integers(0, 256, 8)]
    imgs += [Image.new("RGB", (40, 30), (9, 200, 31)), Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (17, 1)))]
    imgs += [Image.fromarray(rng.integers(0, 65535, (33, 47)).astype(np.uint16)),
             Image.fromarray(rng.integers(0, 256, (70, 90, 4)).astype(np.uint8), "RGBA")]
    for img in imgs:
        assert fingerprint(img) == _reference_fingerprint(img), (img.mode, img.size)
