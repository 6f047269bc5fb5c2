"""Near-duplicate benchmark set from real photos available offline (shared by neardup_quality.py and tests).

Originals: non-overlapping tiles cut at several scales from the photos shipped in scikit-image's data folder
and in Debian wallpaper packages (lomiri-wallpapers-16.04/-20.04, ukui-wallpapers, mate-backgrounds); each
region of a photo is used once, so two originals never share pixels. Mostly flat tiles (fewer than 60 % of their 8x8
blocks textured, e.g. a patch of clear sky with a corner of a bridge) are skipped: two of them are not distinct
photos in any useful sense, a person would call them near-duplicates too.
Edited copies: one per original, kind cycling through the five crawl edits, parameters drawn at random; plus,
for every original, an asymmetric crop (each of the four margins drawn on its own from 0-5 %), the weakest edit
for centred hashes: `build_asym`.

    .venv/bin/python -m benchmarks.neardup_data   # builds benchmarks/.cache/neardup/ and prints counts
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

CACHE = Path(__file__).resolve().parent / ".cache" / "neardup"
EDIT_KINDS = ("jpeg", "downscale", "crop", "brightness", "overlay")
ASYM_KIND = "asym_crop"

# Photos only (no vector art, no stereo pairs, one resolution of each picture).
SKIMAGE_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                  "gravel.png", "brick.png", "moon.png", "retina.jpg", "rocket.jpg", "hubble_deep_field.jpg",
                  "motorcycle_left.png", "ihc.png")
WALLPAPER_DIRS = ("/usr/share/backgrounds", "/usr/share/wallpapers", "/usr/share/lomiri/wallpapers")
WALLPAPER_PHOTOS = (
    "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
    "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
    "friends_by_Aitzol_Berasategi.jpg", "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
    "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg", "umang_by_Abhishek_Mudgal.jpg",
    "Fossa_by_Jasper_Roks.jpg", "Kleiber_by_Lukas_Baubkus.jpg", "2004default.jpg", "calla.png", "city.png",
    "goldfish.png", "Elephants_5640x3172.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg",
    "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg",
)
TILE_SIDES = (192, 256, 384, 512, 768)  # several scales; each output is then resized to 200-400 px


@dataclass(frozen=True)
class Pair:
    original: Path
    edited: Path
    kind: str
    params: str


def source_photos() -> list[Path]:
    import skimage

    found = [Path(skimage.__file__).parent / "data" / n for n in SKIMAGE_PHOTOS]
    found = [p for p in found if p.exists()]
    names = set(WALLPAPER_PHOTOS)
    for d in WALLPAPER_DIRS:
        for p in sorted(Path(d).rglob("*")) if Path(d).exists() else []:
            if p.name in names:
                found.append(p)
                names.discard(p.name)
    if len(found) < 20:
        raise SystemExit(
            "too few source photos: pip install scikit-image and "
            "apt-get install lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 ukui-wallpapers mate-backgrounds"
        )
    return found


def _tiles(img: Image.Image, rng: random.Random) -> list[Image.Image]:
    """Cut horizontal bands, each band at its own tile side, so tiles never overlap and scales differ."""
    w, h = img.size
    out, y = [], 0
    while True:
        side = rng.choice([s for s in TILE_SIDES if s <= min(w, h)] or [min(w, h)])
        if y + side > h:
            break
        for x in range(0, w - side + 1, side):
            out.append(img.crop((x, y, x + side, y + side)))
        y += side
    return out


def _textured(tile: Image.Image) -> bool:
    g = np.asarray(tile.convert("L").resize((128, 128), Image.Resampling.BOX), dtype=np.float32)
    block_std = g.reshape(8, 16, 8, 16).std(axis=(1, 3))
    return bool((block_std >= 6.0).mean() >= 0.6)


def _font(size: int) -> ImageFont.ImageFont:
    for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",):
        if Path(p).exists():
            return ImageFont.truetype(p, size)
    return ImageFont.load_default(size)


def edit(img: Image.Image, kind: str, rng: random.Random) -> tuple[Image.Image, str, int]:
    """Apply one crawl edit; return (image, parameter description, JPEG quality to save with)."""
    w, h = img.size
    q = rng.randint(85, 95)
    if kind == "jpeg":
        q = rng.randint(20, 70)
        return img, f"quality={q}", q
    if kind == "downscale":
        f = rng.uniform(0.3, 0.8)
        return img.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BICUBIC), f"f={f:.2f}", q
    if kind == "crop":
        lf, t, r, b = (rng.uniform(0.01, 0.05) for _ in range(4))
        box = (round(w * lf), round(h * t), round(w * (1 - r)), round(h * (1 - b)))
        return img.crop(box), f"l={lf:.3f} t={t:.3f} r={r:.3f} b={b:.3f}", q
    if kind == "brightness":
        f = rng.choice([rng.uniform(0.6, 0.85), rng.uniform(1.15, 1.4)])
        return ImageEnhance.Brightness(img).enhance(f), f"f={f:.2f}", q
    if kind == "overlay":
        out = img.copy()
        d = ImageDraw.Draw(out, "RGBA")
        text = rng.choice(["(c) stock photos", "www.example-images.com", "SAMPLE", "photo: J. Doe 2019", "wallpaper hd"])
        if rng.random() < 0.5:  # caption band along the bottom
            bh = round(h * rng.uniform(0.06, 0.12))
            d.rectangle((0, h - bh, w, h), fill=(0, 0, 0, rng.randint(140, 230)))
            d.text((round(w * 0.03), h - bh + bh // 6), text, font=_font(max(8, round(bh * 0.6))), fill=(255, 255, 255, 255))
            return out, f"caption band={bh}px", q
        fs = max(8, round(min(w, h) * rng.uniform(0.05, 0.09)))  # semi-transparent watermark in a corner
        x, y = rng.choice([(0.03, 0.03), (0.55, 0.03), (0.03, 0.85), (0.55, 0.85)])
        d.text((round(w * x), round(h * y)), text, font=_font(fs), fill=(255, 255, 255, rng.randint(120, 220)))
        return out, f"watermark font={fs}px", q
    raise ValueError(kind)


def build(n_min: int = 500, seed: int = 0) -> list[Pair]:
    """Generate (or reuse from the cache) originals and one edited copy of each."""
    manifest = CACHE / f"manifest-{seed}.json"
    if manifest.exists():
        rows = json.loads(manifest.read_text())
        if len(rows) >= n_min:
            return [Pair(CACHE / r["original"], CACHE / r["edited"], r["kind"], r["params"]) for r in rows]
    rng = random.Random(seed)
    (CACHE / "orig").mkdir(parents=True, exist_ok=True)
    (CACHE / "edit").mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    for src in source_photos():
        img = Image.open(src).convert("RGB")
        for tile in _tiles(img, rng):
            if not _textured(tile):
                continue
            side = rng.randint(200, 400)
            tile = tile.resize((side, side), Image.Resampling.LANCZOS)
            kind = EDIT_KINDS[i % len(EDIT_KINDS)]
            edited, params, q = edit(tile, kind, rng)
            o, e = f"orig/{i:05d}.png", f"edit/{i:05d}.jpg"
            tile.save(CACHE / o, optimize=False)
            buf = io.BytesIO()
            edited.save(buf, "JPEG", quality=q)
            (CACHE / e).write_bytes(buf.getvalue())
            rows.append({"original": o, "edited": e, "kind": kind, "params": params, "source": src.name})
            i += 1
    manifest.write_text(json.dumps(rows, indent=0))
    if len(rows) < n_min:
        raise SystemExit(f"only {len(rows)} originals from the source photos, need {n_min}")
    return [Pair(CACHE / r["original"], CACHE / r["edited"], r["kind"], r["params"]) for r in rows]


def asym_crop(img: Image.Image, rng: random.Random) -> tuple[Image.Image, str]:
    """Crop each side by its own margin, drawn uniformly from 0-5 %: the centre moves by up to 2.5 %."""
    w, h = img.size
    lf, t, r, b = (rng.uniform(0.0, 0.05) for _ in range(4))
    box = (round(w * lf), round(h * t), round(w * (1 - r)), round(h * (1 - b)))
    return img.crop(box), f"l={lf:.3f} t={t:.3f} r={r:.3f} b={b:.3f}"


def build_asym(pairs: list[Pair], seed: int = 0) -> list[Pair]:
    """One asymmetric crop of every original (cached), saved as JPEG quality 85-95."""
    manifest = CACHE / f"manifest-asym-{seed}.json"
    if manifest.exists():
        rows = json.loads(manifest.read_text())
        if len(rows) == len(pairs):
            return [Pair(CACHE / r["original"], CACHE / r["edited"], r["kind"], r["params"]) for r in rows]
    rng = random.Random(f"asym-{seed}")
    (CACHE / "asym").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, p in enumerate(pairs):
        cropped, params = asym_crop(Image.open(p.original).convert("RGB"), rng)
        e = f"asym/{i:05d}.jpg"
        cropped.save(CACHE / e, "JPEG", quality=rng.randint(85, 95))
        rows.append({"original": str(p.original.relative_to(CACHE)), "edited": e, "kind": ASYM_KIND, "params": params})
    manifest.write_text(json.dumps(rows, indent=0))
    return [Pair(CACHE / r["original"], CACHE / r["edited"], r["kind"], r["params"]) for r in rows]


if __name__ == "__main__":
    pairs = build()
    print(len(pairs), "originals;", {k: sum(p.kind == k for p in pairs) for k in EDIT_KINDS},
          len(build_asym(pairs)), ASYM_KIND)
