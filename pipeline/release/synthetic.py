"""Synthetic input tables for releases: small ones with real image blobs (tests, demo), big ones without (benchmark).

`make_fixture` writes synsets, candidates, images (real JPEGs in the store, fingerprinted with the ingest
stage's `fingerprint` so near-duplicate search works on them), labels, boxes, votes, tasks and box_answers,
and plants edited copies of some images so the train/val leakage filter has something to find.

    >>> from pipeline.store import open_store
    >>> import tempfile
    >>> store = open_store(tempfile.mkdtemp())
    >>> fx = make_fixture(store, n_classes=2, per_class=5, seed=1)
    >>> store.read_table("labels").num_rows >= 10
    True
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.schemas import arrow_schema, validate
from pipeline.store import Store

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def synthetic_wnids(n: int) -> list[str]:
    """n distinct, well-formed, sorted wnids ("n" + 8 digits) that are not real WordNet offsets on purpose."""
    return [f"n9{i:07d}" for i in range(n)]


def fill_schema(name: str, data: dict[str, Any], n: int) -> pa.Table:
    """Build table `name` from `data`, adding the schema's other columns: nullable -> null, else a zero value.

    The schema files grow columns as stages evolve; fixtures should not break each time one is added.
    """
    cols: dict[str, Any] = {}
    for f in arrow_schema(name):
        if f.name in data:
            cols[f.name] = pa.array(data[f.name], type=f.type) if not isinstance(data[f.name], pa.Array) else data[f.name]
        elif f.nullable:
            cols[f.name] = pa.nulls(n, type=f.type)
        else:
            zero: Any = [] if pa.types.is_list(f.type) else ("" if pa.types.is_string(f.type) else 0)
            cols[f.name] = pa.array([zero] * n, type=f.type)
    return validate(name, pa.table(cols))


def _draw_image(rng: np.random.Generator, hue: int, size: tuple[int, int]) -> Any:
    """A distinct little picture: a gradient in the class colour with random shapes (PIL image)."""
    from PIL import Image, ImageDraw

    w, h = size
    base = np.zeros((h, w, 3), dtype=np.uint8)
    gx = np.linspace(0, 1, w)[None, :]
    gy = np.linspace(0, 1, h)[:, None]
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * gx + np.sin(angle) * gy)
    grad = (grad - grad.min()) / (np.ptp(grad) + 1e-9)
    colour = np.array([(hue * 97) % 256, (hue * 57 + 80) % 256, (hue * 31 + 160) % 256], dtype=np.float64)
    base[:] = (grad[..., None] * colour + (1 - grad[..., None]) * (255 - colour)).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = int(rng.integers(x0 + 6, w + 1)), int(rng.integers(y0 + 6, h + 1))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return img


def _jpeg(img: Any, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Row dicts -> column lists, None where a row lacks the key (no pandas: uint64 hashes must stay exact)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return {c: [r.get(c) for r in rows] for c in names}


def _fingerprint(img: Any) -> dict[str, int]:
    try:
        from pipeline.ingest.fingerprint import fingerprint
    except ImportError:  # the ingest stage is not in this build: no fingerprints, no near-dup search
        return {}
    return fingerprint(img)


@dataclass
class Fixture:
    wnids: list[str]
    image_ids: dict[str, list[str]]  # wnid -> accepted image ids, in creation order
    near_dup_pairs: list[tuple[str, str]] = field(default_factory=list)  # (original, edited copy)
    multi_label_image: str | None = None


def make_fixture(
    store: Store,
    *,
    n_classes: int = 4,
    per_class: int = 12,
    box_fraction: float = 0.3,
    near_dups_per_class: int = 2,
    seed: int = 0,
    size: tuple[int, int] = (96, 72),
    n_workers: int = 6,
    without: Sequence[str] = (),
) -> Fixture:
    """Write a small, complete set of input tables with real image blobs to `store`; return what was planted.
    `without`: tables not to write (a store whose boxes loop, say, never ran)."""

    def write(name: str, table: pa.Table) -> None:
        if name not in without:
            store.write_table(name, table)
    rng = np.random.default_rng(seed)
    wnids = synthetic_wnids(n_classes)
    synsets = {
        "wnid": wnids,
        "name": [f"thing{i}.n.01" for i in range(n_classes)],
        "lemmas": [[f"thing {i}", f"object {i}"] for i in range(n_classes)],
        "gloss": [f"a synthetic test class number {i}" for i in range(n_classes)],
        "depth": [5] * n_classes,
        "parent_wnids": [["n90000000"]] * n_classes,
        "lexname": ["noun.artifact"] * n_classes,
        "is_leaf": [True] * n_classes,
        "queries": [[f"thing {i}"] for i in range(n_classes)],
    }
    write("synsets", fill_schema("synsets", synsets, n_classes))

    img_rows: list[dict[str, Any]] = []
    cand_rows: list[dict[str, Any]] = []
    label_rows: list[dict[str, Any]] = []
    fx = Fixture(wnids=wnids, image_ids={w: [] for w in wnids})
    licenses = ["CC BY 2.0", "CC BY-SA 4.0", "CC0 1.0", "Public Domain Mark 1.0"]

    def add_image(wnid: str, img: Any, url: str, quality: int = 90) -> str:
        data = _jpeg(img, quality)
        key = store.put_content(data, ".jpg")
        image_id = key.rsplit("/", 1)[1].split(".")[0]
        img_rows.append({"image_id": image_id, "width": img.width, "height": img.height, "format": "JPEG",
                         "n_bytes": len(data), "storage_key": key, "first_url": url, "status": "accepted",
                         "reject_reason": None, **_fingerprint(img)})
        cand_rows.append({"wnid": wnid, "source": "url_list", "query": wnid, "url": url,
                          "page_url": url + ".html", "title": f"photo {len(cand_rows)}",
                          "license": licenses[len(cand_rows) % len(licenses)], "license_url": None,
                          "creator": f"creator{len(cand_rows) % 5}", "rank": len(cand_rows), "found_at": T0})
        return image_id

    for ci, wnid in enumerate(wnids):
        originals = []
        for j in range(per_class):
            img = _draw_image(rng, ci, size)
            image_id = add_image(wnid, img, f"http://example.test/{wnid}/{j}.jpg")
            fx.image_ids[wnid].append(image_id)
            originals.append((image_id, img))
        for k in range(min(near_dups_per_class, per_class)):
            orig_id, img = originals[k]
            # an edited copy: slight crop + resize + brightness change + stronger JPEG compression
            from PIL import ImageEnhance

            w, h = img.size
            edited = ImageEnhance.Brightness(img.crop((2, 2, w - 2, h - 2)).resize((w - 10, h - 8))).enhance(1.08)
            copy_id = add_image(wnid, edited, f"http://example.test/{wnid}/copy{k}.jpg", quality=70)
            fx.image_ids[wnid].append(copy_id)
            fx.near_dup_pairs.append((orig_id, copy_id))
        # rejected downloads: no image_id, a reason
        for reason in ("too_small", "not_an_image", "http_404")[: 1 + ci % 3]:
            url = f"http://example.test/{wnid}/bad-{reason}.jpg"
            img_rows.append({"image_id": None, "first_url": url, "status": "rejected", "reject_reason": reason})
            cand_rows.append({"wnid": wnid, "source": "url_list", "query": wnid, "url": url, "rank": len(cand_rows),
                              "found_at": T0, "license": "CC BY 2.0"})

    for wnid in wnids:
        for j, image_id in enumerate(fx.image_ids[wnid]):
            n_votes = int(rng.integers(3, 8))
            # every 7th image is a crowd rejection, the last one of each class is still pending
            status = "pending" if j == len(fx.image_ids[wnid]) - 1 else ("rejected" if j % 7 == 6 else "accepted")
            n_yes = n_votes if status == "accepted" else (0 if status == "rejected" else n_votes // 2)
            conf = float(rng.uniform(0.95, 0.999)) if status == "accepted" else (0.01 if status == "rejected" else 0.5)
            label_rows.append({"image_id": image_id, "wnid": wnid, "status": status, "n_votes": n_votes,
                               "n_yes": n_yes, "confidence": conf, "method": "confidence_table"})
    # one image accepted in two classes: its primary label is the more confident one
    if n_classes >= 2:
        shared = fx.image_ids[wnids[0]][1]
        label_rows.append({"image_id": shared, "wnid": wnids[1], "status": "accepted", "n_votes": 5, "n_yes": 4,
                           "confidence": 0.9, "method": "confidence_table"})
        fx.multi_label_image = shared

    labels = pd.DataFrame(label_rows)
    images = pd.DataFrame(img_rows)[["image_id", "width", "height"]]
    write("images", fill_schema("images", _columns(img_rows), len(img_rows)))
    write("candidates", fill_schema("candidates", _columns(cand_rows), len(cand_rows)))
    write("labels", fill_schema("labels", _columns(label_rows), len(label_rows)))

    # boxes on a share of the accepted images, some rejected by quality verification
    accepted = labels[labels.status == "accepted"]
    dims = images.dropna(subset=["image_id"]).set_index("image_id")[["width", "height"]]
    box_rows = []
    for row in accepted.itertuples():
        if rng.random() >= box_fraction:
            continue
        w, h = dims.loc[row.image_id]
        for b in range(int(rng.integers(1, 3))):
            x0, y0 = float(rng.uniform(0, w / 2)), float(rng.uniform(0, h / 2))
            x1, y1 = float(rng.uniform(x0 + 8, w)), float(rng.uniform(y0 + 8, h))
            verified = "rejected" if rng.random() < 0.15 else "accepted"
            box_rows.append({"box_id": f"{row.image_id[:16]}-{row.wnid}-{b}", "image_id": row.image_id,
                             "wnid": row.wnid, "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1,
                             "verified": verified, "drawn_by": f"w{b}", "seq": b, "n_drawn": 1, "n_votes": 3,
                             "n_yes": 3 if verified == "accepted" else 0,
                             "confidence": 0.97 if verified == "accepted" else 0.05})
    names = arrow_schema("boxes").names
    present = {c: v for c, v in _columns(box_rows).items() if c in names}
    write("boxes", fill_schema("boxes", present, len(box_rows)))
    boxes = pd.DataFrame(box_rows, columns=["box_id", "image_id", "wnid", "x_min", "y_min", "x_max", "y_max"])

    _write_crowd_tables(write, labels, boxes, rng, n_workers)
    return fx


def _write_crowd_tables(write: Callable[[str, pa.Table], None], labels: pd.DataFrame, boxes: pd.DataFrame, rng: np.random.Generator,
                        n_workers: int) -> None:
    """votes + tasks for verification, box_answers for boxes: what the report's cost sections read."""
    votes, tasks = [], []
    ann = 0
    workers = [f"worker{k:02d}" for k in range(n_workers)]
    skill = {w: (0.55 if k == n_workers - 1 else float(rng.uniform(0.85, 0.98))) for k, w in enumerate(workers)}
    for t, row in enumerate(labels.itertuples()):
        tasks.append({"task_id": t, "project_id": 1, "request_id": f"verify:{row.image_id}:{row.wnid}",
                      "image_id": row.image_id, "wnid": row.wnid, "kind": "verify", "is_gold": False,
                      "gold_answer": None, "pushed_at": T0})
        truth = "yes" if row.status == "accepted" else "no"
        for k in rng.choice(n_workers, size=min(row.n_votes, n_workers), replace=False):
            w = workers[int(k)]
            ans = truth if rng.random() < skill[w] else ("no" if truth == "yes" else "yes")
            votes.append({"annotation_id": ann, "task_id": t, "image_id": row.image_id, "wnid": row.wnid,
                          "worker": w, "answer": ans, "is_gold": False,
                          "lead_time_s": float(rng.gamma(2.0, 2.0)), "submitted_at": T0 + timedelta(seconds=ann)})
            ann += 1
    write("votes", fill_schema("votes", _columns(votes), len(votes)))
    write("tasks", fill_schema("tasks", _columns(tasks), len(tasks)))
    if "box_answers" not in _known_tables():
        return
    answers = []
    for b in boxes.itertuples():
        for kind, secs in (("draw", 30.0), ("quality", 4.0), ("quality", 5.0), ("coverage", 6.0)):
            answers.append({"annotation_id": ann, "task_id": 10_000 + ann, "image_id": b.image_id, "wnid": b.wnid,
                            "kind": kind, "worker": workers[ann % n_workers],
                            "answer": "box" if kind == "draw" else "yes",
                            "x_min": b.x_min if kind == "draw" else None, "y_min": b.y_min if kind == "draw" else None,
                            "x_max": b.x_max if kind == "draw" else None, "y_max": b.y_max if kind == "draw" else None,
                            "lead_time_s": secs, "submitted_at": T0 + timedelta(seconds=ann)})
            ann += 1
    write("box_answers", fill_schema("box_answers", _columns(answers), len(answers)))


def _known_tables() -> list[str]:
    from pipeline.schemas import table_names

    return table_names()
