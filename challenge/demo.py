"""`make demo`'s last step: a small challenge on the demo's release.

A challenge release is built from the same tables with the demo release as parent (so every image keeps its
split) and its test labels hidden; a cls challenge opens on it with one phase (2 submissions per week), an
organisers' baseline (the most frequent train class for every image) and one team whose submission names the
class of the nearest train image in perceptual-hash distance. The demo has five classes, so five guesses would
always include the truth: both submit one guess per image, and the top-5 error is their top-1 error. The leaderboard is printed
with its 99.9 % bootstrap intervals.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from challenge.boards import build_board, snapshot
from challenge.db import utcnow
from challenge.service import open_service
from pipeline.release.build import build_release
from pipeline.release.manifest import read_manifest, read_release_table
from pipeline.store import LocalStore

SLUG = "demo-cls"


def _phash_guesses(store: Any, version: str, held: Any) -> list[list[int]]:
    """Top-5 classes of each test image by the Hamming distance of its pHash to the train images' pHashes."""
    import io

    from PIL import Image

    from pipeline.ingest.fingerprint import fingerprint

    labels = read_release_table(store, version, "labels").to_pandas()
    train = labels[(labels.split == "train") & labels.is_primary]
    images = read_release_table(store, version, "images").to_pandas().set_index("image_id")
    train = train[train.image_id.isin(images.index)]
    ref = np.array([int(images.loc[i, "phash"]) for i in train.image_id], dtype=np.uint64)
    ref_cls = np.array([held.wnids.index(w) + 1 for w in train.wnid])
    listing = read_release_table(store, version, "test_images").to_pandas()
    out = []
    for key in listing.storage_key:
        with Image.open(io.BytesIO(store.get(key))) as img:
            h = np.uint64(fingerprint(img.convert("RGB"))["phash"])
        dist = np.array([bin(int(v)).count("1") for v in np.bitwise_xor(ref, h)])
        ranked = list(dict.fromkeys(ref_cls[np.argsort(dist, kind="stable")].tolist()))
        out.append(ranked[:5])
    return out


def open_demo_challenge(store: LocalStore, parent: str, workdir: Path) -> dict[str, str]:
    """Build `<parent>-challenge`, open the demo challenge on it, submit a baseline and a team, print the board."""
    version = f"{parent}-challenge"
    pol = read_manifest(store, parent)["split_policy"]
    m = build_release(store, version, parent=parent, val_per_class=pol["val_per_class"],
                      test_per_class=pol["test_per_class"], salt=pol["salt"], challenge=True, force=True)
    print(f"  release {version}: test labels hidden ({m['stats']['challenge']['test_images']} test images listed "
          f"without labels; labels under private/releases/{version}/)")
    svc = open_service(str(store.root))
    now = utcnow()
    svc.create_challenge(SLUG, version, "cls", [dict(name="main", opens_at=now - timedelta(minutes=1),
                                                     closes_at=now + timedelta(days=7), per_week=2)],
                         title="Demo classification challenge")
    held = svc.held_out(version)
    labels = read_release_table(store, version, "labels").to_pandas()
    counts = labels[(labels.split == "train") & labels.is_primary].wnid.value_counts()
    prior = [held.wnids.index(w) + 1 for w in counts.index[:1]]
    base, _ = svc.add_team("organisers: class prior", baseline=True)
    svc.submit(SLUG, base.id, ("\n".join(" ".join(map(str, prior)) for _ in range(held.n)) + "\n").encode(),
               description="the most frequent train class")
    team, token = svc.add_team("demo team", [("Demo", None)])
    guesses = _phash_guesses(store, version, held)
    sub = workdir / "challenge_phash_top1.txt"
    sub.write_text("".join(f"{g[0]}\n" for g in guesses))
    r = svc.submit(SLUG, team.id, sub.read_bytes(), description="nearest train image by pHash")
    print(f"  demo team: submission {r.submission_id}, public error {r.shown_score}; "
          f"{min(w.left for w in r.quota)} submission(s) left this week")
    print("  " + build_board(svc, SLUG).text().replace("\n", "\n  "))
    board = snapshot(svc, SLUG)
    db = Path(store.root) / "challenge" / "challenge.db"
    print(f"  serve it: .venv/bin/synsetforge --store {store.root} challenge serve   (team token: {token})")
    return {"challenge": SLUG, "release": version, "db": str(db), "leaderboard": f"{store.root}/{board['key']}",
            "serve": f".venv/bin/synsetforge --store {store.root} challenge serve"}
