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
