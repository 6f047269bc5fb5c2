"""Validate downloaded bytes and turn them into the one stored form.

Rules (issue 10): the format comes from the bytes (magic numbers), never from a Content-Type header; the
header's claimed size is checked against the pixel budget *before* decoding (Pillow's decompression-bomb
guard plus our own limit), so a PNG that claims 100000x100000 costs microseconds; the image must decode
to the end (truncation is caught); min/max side; allowed formats; animated images are rejected unless
allowed. A *clean* JPEG (RGB or grayscale, no EXIF rotation) is stored byte for byte, validated with a
draft-mode (DCT-scaled, luminance only) decode that still entropy-decodes every scan; everything else is
decoded fully, converted to RGB once (CMYK, palette, alpha over white, 16-bit scaled to 8-bit), EXIF
orientation applied, and re-encoded as JPEG once.

    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (64, 48), "red").save(buf, "PNG")
    >>> r = validate_image(buf.getvalue(), ValidateConfig())
    >>> (r.ok, r.format, r.width, r.height, r.stored[:3] == b"\\xff\\xd8\\xff")
    (True, 'png', 64, 48, True)
    >>> validate_image(b"<html>nope</html>", ValidateConfig()).reason
    'not_an_image'
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.ingest.fingerprint import DRAFT_MIN_SIDE, fingerprint

# We enforce our own pixel budget before decoding; Pillow's warning would only add noise.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}
ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ValidateConfig:
    min_side: int = 32
    max_side: int = 20_000
    max_pixels: int = 89_478_485
    allowed_formats: tuple[str, ...] = ("jpeg", "png", "gif", "webp", "bmp", "tiff")
    allow_animated: bool = False
    jpeg_quality: int = 90

    @classmethod
    def from_settings(cls, ingest: Any) -> ValidateConfig:
        return cls(min_side=ingest.min_side, max_side=ingest.max_side, max_pixels=ingest.max_pixels,
                   allowed_formats=tuple(f.lower() for f in ingest.allowed_formats),
                   allow_animated=ingest.allow_animated, jpeg_quality=ingest.jpeg_quality)


@dataclass
class Validated:
    ok: bool
    reason: str | None = None
    detail: str = ""
    format: str | None = None  # detected source format
    width: int | None = None  # of the stored image (after EXIF rotation)
    height: int | None = None
    stored: bytes | None = None  # bytes to store (the original for a clean JPEG)
    reencoded: bool = False
    features: dict[str, int] = field(default_factory=dict)

    @property
    def image_id(self) -> str | None:
        return hashlib.sha256(self.stored).hexdigest() if self.stored is not None else None


def detect_format(data: bytes) -> str | None:
    """Format from magic bytes: jpeg, png, gif, webp, bmp, tiff, svg, heif, avif, ico, or None (not an image)."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(data) > 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "avif" if brand in (b"avif", b"avis") else "heif"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ico"
    text = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if (text.startswith(b"<?xml") or text.startswith(b"<svg") or text.startswith(b"<!doctype svg")) and b"<svg" in text:
        return "svg"
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited over white, 16/32-bit scaled to 8-bit, CMYK/palette converted."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _decode_failure(exc: BaseException) -> tuple[str, str]:
    msg = str(exc)
    low = msg.lower()
    if "truncat" in low or "broken data stream" in low or "premature" in low or isinstance(exc, EOFError):
        return "truncated", msg
    return "decode_error", f"{exc.__class__.__name__}: {msg}"


def validate_image(data: bytes, cfg: ValidateConfig) -> Validated:
    """Check and normalise one downloaded body; never raises for bad input (the reason says what was wrong)."""
    if not data:
        return Validated(False, "empty", "zero bytes")
    fmt = detect_format(data)
    if fmt is None:
        return Validated(False, "not_an_image", f"no image signature in the first bytes ({data[:16]!r})")
    if fmt not in cfg.allowed_formats or fmt not in _PIL_FORMATS:
        return Validated(False, "unsupported_format", f"{fmt} is not in allowed_formats", format=fmt)
    try:
        img = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
    except Image.DecompressionBombError as exc:
        return Validated(False, "bomb", str(exc), format=fmt)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason, detail = _decode_failure(exc)
        return Validated(False, reason if reason == "truncated" else "decode_error", detail, format=fmt)
    with img:
        w, h = img.size
        base = dict(format=fmt, width=w, height=h)
        if w * h > cfg.max_pixels:
            return Validated(False, "bomb", f"{w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}", **base)
        if max(w, h) > cfg.max_side:
            return Validated(False, "dims_too_large", f"{w}x{h}: a side exceeds max_side {cfg.max_side}", **base)
        if min(w, h) < cfg.min_side:
            return Validated(False, "too_small", f"{w}x{h}: a side is below min_side {cfg.min_side}", **base)
        if getattr(img, "n_frames", 1) > 1 and not cfg.allow_animated:
            return Validated(False, "animated", f"{img.n_frames} frames; set allow_animated to keep frame 0", **base)
        try:
            orientation = img.getexif().get(ORIENTATION_TAG, 1) if fmt in ("jpeg", "tiff", "webp", "png") else 1
        except Exception:  # noqa: BLE001 - a broken EXIF block is not a reason to drop the pixels
            orientation = 1
        clean = fmt == "jpeg" and img.mode in ("RGB", "L") and orientation in (1, None, 0)
        try:
            if clean:
                # DCT-scaled luminance decode: every scan is still entropy-decoded, so truncation shows.
                img.draft("L", (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))
                img.load()
                return Validated(True, format=fmt, width=w, height=h, stored=data, features=fingerprint(img))
            img.load()
            rgb = ImageOps.exif_transpose(to_rgb(img)) if orientation not in (1, None, 0) else to_rgb(img)
        except Image.DecompressionBombError as exc:
            return Validated(False, "bomb", str(exc), **base)
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
            reason, detail = _decode_failure(exc)
            return Validated(False, reason, detail, **base)
    if orientation not in (1, None, 0) and rgb.getexif():
        rgb.info.pop("exif", None)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=cfg.jpeg_quality, optimize=False)
    return Validated(True, format=fmt, width=rgb.width, height=rgb.height, stored=out.getvalue(), reencoded=True,
                     features=fingerprint(rgb))
