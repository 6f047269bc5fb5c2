"""Cheap per-image fingerprints for the images table, computed once at ingest from a decoded image.

Columns produced (all uint64, see schemas/images.json):
- ``phash``: 64-bit DCT perceptual hash of the whole image (32x32 luminance, 8x8 lowest frequencies, median
  threshold; bit 63 is the (0, 0) coefficient, row-major).
- ``phash_in94``, ``phash_in88``, ``phash_in70``: the same hash of the centred region keeping 94 %, 88 % and 70 %
  of each side. A border crop of a few percent lines up with one of the inner hashes of the original, and a
  caption band or corner watermark leaves the 70 % hash untouched.
- ``phash_se94``, ``phash_sw94``: the 94 % region moved 2 % of each side towards the bottom right and towards
  the bottom left. A crop with independent margins (0-5 % on each side) moves the picture's centre by up to 2.5 %
  in any direction, which no centred region follows; one of these windows, on whichever of the two images it
  lines up with, does (the copy's window covers the opposite directions). All six are keys of the candidate
  search in :mod:`pipeline.ingest.neardup` (``HASH_COLUMNS``; ``HASH_WINDOWS`` gives each one's region).
- ``thumb_0`` .. ``thumb_3``: an 8x8 luminance thumbnail, z-normalised and quantised to 4 bits per pixel
  (16 pixels per word, row-major, first pixel in the high nibble), used to verify candidate pairs.

Everything is computed from a small luminance image, so a JPEG can be decoded in draft mode (DCT scaling,
1/2 .. 1/8) first; see :func:`decode_for_fingerprint`.

>>> from PIL import Image
>>> fp = fingerprint(Image.new("RGB", (64, 48), (200, 30, 30)))
>>> sorted(fp)
['phash', 'phash_in70', 'phash_in88', 'phash_in94', 'phash_se94', 'phash_sw94', 'thumb_0', 'thumb_1', 'thumb_2', 'thumb_3']
"""

from __future__ import annotations

import io
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# Region of each hash as (left, top, right, bottom) fractions of the image.
HASH_WINDOWS: dict[str, tuple[float, float, float, float]] = {
    "phash": (0.0, 0.0, 1.0, 1.0),
    "phash_in94": (0.03, 0.03, 0.97, 0.97),
    "phash_in88": (0.06, 0.06, 0.94, 0.94),
    "phash_in70": (0.15, 0.15, 0.85, 0.85),
    "phash_se94": (0.05, 0.05, 0.99, 0.99),
    "phash_sw94": (0.01, 0.05, 0.95, 0.99),
}
HASH_COLUMNS: tuple[str, ...] = tuple(HASH_WINDOWS)
THUMB_COLUMNS: tuple[str, ...] = ("thumb_0", "thumb_1", "thumb_2", "thumb_3")
FINGERPRINT_COLUMNS: tuple[str, ...] = HASH_COLUMNS + THUMB_COLUMNS
# Which (hash of one image, hash of the other) pairs verification compares: every pair of centred windows, and a
# shifted window with a centred one. Two shifted windows never line up a crop that the centred ones miss, and
# comparing them only adds chances for two distinct photos of one scene to match.
SHIFTED_HASH_COLUMNS: tuple[str, ...] = ("phash_se94", "phash_sw94")
HASH_PAIRS: tuple[tuple[bool, ...], ...] = tuple(
    tuple(not (a in SHIFTED_HASH_COLUMNS and b in SHIFTED_HASH_COLUMNS) for b in HASH_WINDOWS) for a in HASH_WINDOWS)
# Hash columns newer than images schema version 2: rows written before lack them and use the whole-image phash
# in their place (see fill_added_hashes).
ADDED_HASH_COLUMNS: tuple[str, ...] = ("phash_se94", "phash_sw94")
THUMB_SIDE = 8
THUMB_LEVELS = 16
# Decoding at >= 4x the 32 px pHash grid keeps the area-averaged resize close to a full decode.
DRAFT_MIN_SIDE = 128

_BITS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)
_NIBBLE_SHIFTS = np.arange(15, -1, -1, dtype=np.uint64) * np.uint64(4)


@cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (rows = frequencies); no scipy needed."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


def _pack_bits(bits: np.ndarray) -> int:
    """64 booleans (row-major) -> int, first element is the most significant bit."""
    return int(np.bitwise_or.reduce(_BITS[bits.ravel()])) if bits.any() else 0


def _luminance(img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grey: rescale, don't clip at 255
        a = np.asarray(img.convert("F"), dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        return Image.fromarray(((a - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)).astype(np.uint8), "L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img.convert("L")


def _resize(gray: Image.Image, size: tuple[int, int], margin: float = 0.0) -> np.ndarray:
    # BOX = exact area averaging over the (inner) region: stable under re-compression and downscaling.
    w, h = gray.size
    box = (w * margin, h * margin, w * (1 - margin), h * (1 - margin))
    return np.asarray(gray.resize(size, Image.Resampling.BOX, box=box), dtype=np.float64)


def phash_from_gray32(g32: np.ndarray) -> int:
    d = _dct_matrix(32)
    coef = (d @ g32 @ d.T)[:8, :8]
    return _pack_bits(coef > np.median(coef))


def thumb_words(gray: Image.Image) -> list[int]:
    """8x8 thumbnail -> z-normalised -> 4-bit levels (clip at +-2 sigma) -> 4 packed 64-bit words."""
    t = _resize(gray, (THUMB_SIDE, THUMB_SIDE)).ravel()
    std = t.std()
    z = (t - t.mean()) / std if std > 1e-6 else np.zeros_like(t)
    q = np.clip(np.floor((z + 2.0) / 4.0 * THUMB_LEVELS), 0, THUMB_LEVELS - 1).astype(np.uint8)
    packed = ((q[0::2] << 4) | q[1::2]).tobytes()  # two pixels per byte, first pixel in the high nibble
    return [int.from_bytes(packed[w * 8 : (w + 1) * 8], "big") for w in range(4)]


def unpack_thumbs(words: np.ndarray) -> np.ndarray:
    """(n, 4) uint64 thumb words -> (n, 64) float32 z-scores (level centres), the inverse of :func:`thumb_words`."""
    words = np.asarray(words, dtype=np.uint64).reshape(-1, 4)
    q = (words[:, :, None] >> _NIBBLE_SHIFTS[None, None, :]) & np.uint64(15)
    return ((q.reshape(-1, 64).astype(np.float32) + 0.5) * (4.0 / THUMB_LEVELS) - 2.0).astype(np.float32)


def fingerprint(img: Image.Image) -> dict[str, int]:
    """Fingerprint columns for one decoded image (any mode; RGB or L expected, others are converted).

    Pass the image as it will be stored (EXIF orientation applied). Values are Python ints in [0, 2**64).
    Same values as :func:`phash_from_gray32` per window and :func:`thumb_words`, with the medians and bit packing
    of all hashes done together (this runs once per ingested image).
    """
    gray = _luminance(img)
    w, h = gray.size
    d = _dct_matrix(32)
    coefs = np.empty((len(HASH_WINDOWS), 64))
    for i, (x0, y0, x1, y1) in enumerate(HASH_WINDOWS.values()):
        g32 = np.asarray(gray.resize((32, 32), Image.Resampling.BOX, box=(w * x0, h * y0, w * x1, h * y1)),
                         dtype=np.float64)
        coefs[i] = (d @ g32 @ d.T)[:8, :8].ravel()  # the same products as phash_from_gray32
    s = np.sort(coefs, axis=1)
    median = (s[:, 31] + s[:, 32]) / 2  # what np.median computes for 64 values
    packed = np.packbits(coefs > median[:, None], axis=1)  # row-major, first coefficient in the top bit
    out = {col: int.from_bytes(packed[i].tobytes(), "big") for i, col in enumerate(HASH_COLUMNS)}
    for col, word in zip(THUMB_COLUMNS, thumb_words(gray), strict=True):
        out[col] = word
    return out


def fill_added_hashes(images: Any) -> Any:
    """Rows of the images table (pandas or Arrow) with every ADDED_HASH_COLUMNS value present: where a row lacks
    one (the column is missing, or null: rows written before it existed), the whole-image phash stands in, which
    finds what those rows found before."""
    if hasattr(images, "column_names"):  # Arrow
        import pyarrow.compute as pc

        if "phash" not in images.column_names:
            return images
        for col in ADDED_HASH_COLUMNS:
            if col not in images.column_names:
                images = images.append_column(col, images.column("phash"))
            elif images.column(col).null_count:
                i = images.column_names.index(col)
                images = images.set_column(i, col, pc.coalesce(images.column(col), images.column("phash")))
        return images
    if "phash" not in getattr(images, "columns", ()):
        return images
    missing = [c for c in ADDED_HASH_COLUMNS if c not in images.columns or images[c].isna().any()]
    if missing:
        images = images.copy()
        for col in missing:
            images[col] = images["phash"] if col not in images.columns else images[col].fillna(images["phash"])
    return images


def decode_for_fingerprint(data: bytes) -> Image.Image:
    """Decode image bytes cheaply for :func:`fingerprint`: JPEG draft mode (luminance, >= 128 px), EXIF applied.

    Raises PIL.UnidentifiedImageError / OSError on undecodable bytes (validation happens in the ingest stage).

    >>> buf = io.BytesIO(); Image.new("RGB", (1024, 768), "white").save(buf, "JPEG")
    >>> decode_for_fingerprint(buf.getvalue()).size
    (256, 192)
    """
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("L", (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))
    img = ImageOps.exif_transpose(img)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    return _luminance(img)
