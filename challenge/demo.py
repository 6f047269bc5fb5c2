"""`make demo`'s last step: a small challenge on the demo's release, with test images no release ever published.

ILSVRC never published its test labels. Release 1.0.0 (and the DET release) already published every image the
demo's crowd labelled, its test split included, so none of them can be a hidden test image: `build_release`
refuses a challenge whose test images a release of the store published (`HiddenLabelGuard`). So the step does
what a challenge's organisers do and collects a fresh test set: `fresh_views` cuts new views of the five photos
(crops at other places and scales, in another light: brightness and contrast changed; a view that is a near
copy of an image already in the store is skipped), ingests them as any download is ingested (`validate_image`:
the stored bytes, their sha256 as image id, the fingerprints) and labels each with the class of its photo (the
organisers' own test labels, method `organisers`) and the object's box. The challenge release
`<parent>-challenge` is built from the store's tables plus these images, with the demo release as parent and
`fresh_test`: the parent's train images stay train, its published test images become val images, and the test
split is the new images only, listed without labels (their labels and boxes go under private/releases/<v>/).

A cls challenge then opens on it with one phase (2 submissions per week) and a fixed partition salt, so the
public/private split and the bootstrap draws are the same on every run (a real challenge draws the salt at
random, `create_challenge`'s default). On it: an organisers' baseline (the most frequent train class, ties by
wnid, for every image) and one team whose submission names the class of the nearest train or val image by
grey-level histogram (`nearest_image_guesses`). The demo has five classes, so five guesses would always include
the truth: both submit one guess per image, and the top-5 error is their top-1 error. The public leaderboard is
printed with its 99.9 % bootstrap intervals. No token is printed: a token is shown once, to whoever makes it
(`synsetforge challenge token "demo team"` makes one to sign in with), and the server keeps only its hash.
"""

from __future__ import annotations

import io
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from challenge.boards import build_board, snapshot
from challenge.db import utcnow
from challenge.service import open_service
from pipeline.release.build import Inputs, build_release, read_inputs
from pipeline.release.manifest import read_manifest, read_release_table
from pipeline.store import LocalStore, Store

SLUG = "demo-cls"
TEAM = "demo team"
FRESH_PER_CLASS = 16  # new test images per class: 80 in all, 40 on each board (the demo's 1.0.0 has 17 images)
DEMO_PARTITION_SALT = "synsetforge-demo"  # fixed, so the demo's board is the same every run; not a secret here
FRESH_METHOD = "organisers"


def fresh_views(store: Store, per_class: int = FRESH_PER_CLASS, seed: int = 0,
                synsets: Any = None) -> dict[str, pa.Table]:
    """New, never published views of the demo's photos, stored as blobs in `store` and returned as rows to
    add to the input tables: images, labels (accepted, method `organisers`), boxes and candidates."""
    from pipeline.demo_corpus import DEMO_SYNSETS, LICENSES, SKIMAGE_DOCS, View, _coin_box, _render, load_photo
    from pipeline.ingest.validate import ValidateConfig, validate_image

    synsets = DEMO_SYNSETS if synsets is None else synsets
    existing = store.read_table("images") if store.has_table("images") else None
    images, labels, boxes, candidates = [], [], [], []
    cfg = ValidateConfig()
    for syn in synsets:
        photo = load_photo(syn.photo)
        w, h = photo.size
        obj = next((v.box for v in syn.views if v.box is not None), None)  # the object in photo pixels
        rng = random.Random(f"fresh-{seed}-{syn.wnid}")
        made: list[dict[str, Any]] = []
        for _ in range(per_class * 20):
            if len(made) >= per_class * 2:
                break
            f = rng.uniform(0.35, 0.8)
            cw, ch = min(w, round(w * f * rng.uniform(0.85, 1.15))), min(h, round(h * f * rng.uniform(0.85, 1.15)))
            if obj is not None:  # the crop holds the object's centre
                cx, cy = (obj[0] + obj[2]) / 2, (obj[1] + obj[3]) / 2
                x0 = rng.randint(max(0, int(cx) - cw + 1), max(0, min(w - cw, int(cx))))
                y0 = rng.randint(max(0, int(cy) - ch + 1), max(0, min(h - ch, int(cy))))
            else:
                x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            scale = max(rng.uniform(0.7, 1.5), 72 / min(cw, ch))
            img, box = _render(photo, View((x0, y0, x0 + cw, y0 + ch), round(scale, 3), obj))
            if syn.photo == "coins.png":
                box = _coin_box(img)
            if box[2] - box[0] < 8 or box[3] - box[1] < 8:
                continue
            img = _photometric(img.convert("RGB"), rng)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            v = validate_image(buf.getvalue(), cfg)
            if not v.ok or any(m["v"].image_id == v.image_id for m in made):
                continue
            made.append({"v": v, "box": box, "rect": (x0, y0, x0 + cw, y0 + ch)})
        rows = [{"image_id": m["v"].image_id, "width": m["v"].width, "height": m["v"].height, "format": m["v"].format,
                 "n_bytes": len(m["v"].stored), **m["v"].features} for m in made]
        keep = _not_near_copies(rows, existing)
        for m, row in [(m, row) for m, row, ok in zip(made, rows, keep, strict=True) if ok][:per_class]:
            v = m["v"]
            key = store.put_content(v.stored, ".jpg")
            url = f"{SKIMAGE_DOCS}{Path(syn.photo).stem}#crop={','.join(map(str, m['rect']))}"
            images.append({**row, "storage_key": key, "first_url": url, "status": "accepted", "reject_reason": None})
            labels.append({"image_id": v.image_id, "wnid": syn.wnid, "status": "accepted", "n_votes": 0, "n_yes": 0,
                           "confidence": 1.0, "method": FRESH_METHOD})
            boxes.append({"box_id": f"{v.image_id[:16]}-{syn.wnid}-0", "image_id": v.image_id, "wnid": syn.wnid,
                          "x_min": float(m["box"][0]), "y_min": float(m["box"][1]), "x_max": float(m["box"][2]),
                          "y_max": float(m["box"][3]), "verified": "accepted", "drawn_by": FRESH_METHOD, "seq": 0,
                          "n_drawn": 1, "n_votes": 0, "n_yes": 0, "confidence": 1.0})
            _, lic_url = LICENSES[syn.license]
            candidates.append({"wnid": syn.wnid, "source": "organisers", "query": syn.lemma, "url": url,
                               "page_url": SKIMAGE_DOCS + Path(syn.photo).stem,
                               "title": f"{syn.lemma} ({syn.photo}, fresh test view)", "license": syn.license,
                               "license_url": lic_url, "creator": syn.creator, "rank": len(candidates),
                               "found_at": utcnow()})
        if len([r for r in labels if r["wnid"] == syn.wnid]) < per_class:
            raise RuntimeError(f"only {sum(r['wnid'] == syn.wnid for r in labels)} fresh views of {syn.photo}")

    return {"images": _rows_table("images", images), "labels": _rows_table("labels", labels),
            "boxes": _rows_table("boxes", boxes), "candidates": _rows_table("candidates", candidates)}


def _rows_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) as table `name`, the schema's other columns filled (`fill_schema`)."""
    from pipeline.release.synthetic import fill_schema

    cols = {c: [r.get(c) for r in rows] for c in dict.fromkeys(k for r in rows for k in r)}
    return fill_schema(name, cols, len(rows))


def _photometric(img: Any, rng: random.Random) -> Any:
    """Another day's light and camera: brightness and contrast each scaled by 0.6 to 1.4 (the box is unchanged)."""
    from PIL import ImageEnhance

    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))


def _not_near_copies(rows: list[dict[str, Any]], existing: pa.Table | None) -> list[bool]:
    """False for a view that is a near copy (or the same bytes) of an image already in the store."""
    if existing is None or not rows:
        return [True] * len(rows)
    from pipeline.ingest.neardup import cross_duplicates

    query = _rows_table("images", [{**r, "status": "accepted"} for r in rows])
    ref = existing.filter(pa.compute.equal(existing["status"], "accepted"))
    ref = ref.filter(pa.compute.is_valid(ref["image_id"]))
    pairs = cross_duplicates(query, ref)
    near = set(pairs["query_image_id"]) if len(pairs) else set()
    same = set(ref.column("image_id").to_pylist())
    return [r["image_id"] not in near and r["image_id"] not in same for r in rows]


def _with_fresh(inputs: Inputs, fresh: dict[str, pa.Table]) -> Inputs:
    def cat(name: str, table: pa.Table | None) -> pa.Table:
        return fresh[name] if table is None else pa.concat_tables([table, fresh[name].cast(table.schema)])

    return Inputs(synsets=inputs.synsets, images=cat("images", inputs.images), labels=cat("labels", inputs.labels),
                  boxes=cat("boxes", inputs.boxes), candidates=cat("candidates", inputs.candidates))


def build_challenge_release(store: Store, parent: str, fresh: dict[str, pa.Table], version: str | None = None,
                            **options: Any) -> dict[str, Any]:
    """`<parent>-challenge`: the store's tables plus `fresh` images, the parent's splits kept (its published
    test images moved to val) and the test split drawn from the fresh images only (`fresh_test`)."""
    pol = read_manifest(store, parent)["split_policy"]
    n_fresh = fresh["labels"].num_rows
    classes = len(set(fresh["labels"].column("wnid").to_pylist()))
    opts = {"val_per_class": pol["val_per_class"], "test_per_class": n_fresh // max(classes, 1),
            "salt": pol["salt"], "force": True, **options}
    return build_release(store, version or f"{parent}-challenge", parent=parent, inputs=_with_fresh(read_inputs(store), fresh),
                         challenge=True, fresh_test=True, **opts)


def grey_histogram(data: bytes, bins: int = 8) -> np.ndarray:
    """The demo team's image descriptor: the share of pixels in each of `bins` grey levels (a 64 x 64 copy)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        grey = np.asarray(img.convert("L").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.int64)
    counts = np.bincount((grey * bins // 256).ravel(), minlength=bins).astype(np.float64)
    return counts / counts.sum()


def nearest_image_guesses(store: Any, version: str, held: Any) -> list[list[int]]:
    """Top-5 classes of each test image, ranked by the L1 distance of its grey-level histogram to the nearest
    train or val image of each class (what the demo team submits; nothing but public files is read)."""
    labels = read_release_table(store, version, "labels").to_pandas()
    ref_rows = labels[labels.is_primary].sort_values("image_id", kind="stable")
    images = read_release_table(store, version, "images").to_pandas().set_index("image_id")
    ref_rows = ref_rows[ref_rows.image_id.isin(images.index)]
    ref = np.array([grey_histogram(store.get(images.loc[i, "storage_key"])) for i in ref_rows.image_id])
    ref_cls = np.array([held.wnids.index(w) + 1 for w in ref_rows.wnid])
    listing = read_release_table(store, version, "test_images").to_pandas()
    out = []
    for key in listing.storage_key:
        dist = np.abs(ref - grey_histogram(store.get(key))).sum(axis=1)
        out.append(list(dict.fromkeys(ref_cls[np.argsort(dist, kind="stable")].tolist()))[:5])
    return out


def open_demo_challenge(store: LocalStore, parent: str, workdir: Path, *, per_class: int = FRESH_PER_CLASS
                        ) -> dict[str, Any]:
    """Build `<parent>-challenge` on fresh test images, open the demo challenge on it, submit a baseline and a
    team, print the board (no token)."""
    fresh = fresh_views(store, per_class)
    m = build_challenge_release(store, parent, fresh)
    version = m["version"]
    splits = m["splits"]
    print(f"  release {version}: {m['stats']['challenge']['test_images']} fresh test images (new views of the five "
          f"photos, labelled by the organisers, never published), listed without labels; labels under "
          f"private/releases/{version}/. Train {splits['train']} and val {splits['val']} from {parent} ({parent}'s "
          "test images are val images here: their labels are public)")
    svc = open_service(str(store.root))
    now = utcnow()
    svc.create_challenge(SLUG, version, "cls", [dict(name="main", opens_at=now - timedelta(minutes=1),
                                                     closes_at=now + timedelta(days=7), per_week=2)],
                         title="Demo classification challenge", partition_salt=DEMO_PARTITION_SALT)
    held = svc.held_out(version)
    labels = read_release_table(store, version, "labels").to_pandas()
    train = labels[(labels.split == "train") & labels.is_primary]
    counts = train.groupby("wnid").size().reset_index(name="n").sort_values(["n", "wnid"], ascending=[False, True])
    prior = held.wnids.index(counts.wnid.iloc[0]) + 1
    base, _ = svc.add_team("organisers: class prior", baseline=True)
    svc.submit(SLUG, base.id, "".join(f"{prior}\n" for _ in range(held.n)).encode(),
               description="the most frequent train class")
    team, _token = svc.add_team(TEAM, [("Demo", None)])  # the token is not kept: see the module doc
    guesses = nearest_image_guesses(store, version, held)
    sub = workdir / "challenge_nearest_top1.txt"
    sub.write_text("".join(f"{g[0]}\n" for g in guesses))
    r = svc.submit(SLUG, team.id, sub.read_bytes(), description="nearest train or val image by grey-level histogram")
    print(f"  {TEAM}: submission {r.submission_id}, public error {r.shown_score}; "
          f"{min(w.left for w in r.quota)} submission(s) left this week")
    board = build_board(svc, SLUG)
    print("  " + board.text().replace("\n", "\n  "))
    snap = snapshot(svc, SLUG)
    db = Path(store.root) / "challenge" / "challenge.db"
    serve = f".venv/bin/synsetforge --store {store.root} challenge serve"
    print(f"  serve it: {serve}   (to sign in as {TEAM!r}: .venv/bin/synsetforge --store {store.root} challenge "
          f"token {TEAM!r} prints a new token, once)")
    return {"challenge": SLUG, "release": version, "db": str(db), "leaderboard": f"{store.root}/{snap['key']}",
            "serve": serve, "board": board, "test_images": held.n}
