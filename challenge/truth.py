"""The hidden test set of a challenge release, read from the store's private prefix (nothing else reads it).

`load_held_out(store, version)` checks the private manifest's sha256 against the one the public manifest names,
each private file's sha256 against the private manifest, and that the private images are exactly the public
`test_images` listing in its order. `partition` splits the test images into the public and the private part of
the leaderboard with a secret salt, so no team can tell which image counts where.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.evaluate import BOX, GroundTruth
from pipeline.release.build import private_release_prefix, test_file_stem
from pipeline.release.manifest import read_manifest, read_release_table
from pipeline.store import MissingKey, Store


class ChallengeError(UserError):
    """A challenge cannot be created or run as asked; the message says why and what to do."""


@dataclass
class HeldOut:
    """Test images in devkit order (line k of a submission = image k), their classes and boxes."""

    version: str
    image_ids: list[str]
    files: list[str]
    wnids: list[str]  # class k (1-based) is wnids[k - 1]
    truth: np.ndarray  # (n,) 1-based class of each image
    boxes: pd.DataFrame  # image (0-based position), image_id, cls, x_min, y_min, x_max, y_max
    widths: np.ndarray
    heights: np.ndarray
    digest: str  # sha256 of the private manifest (or of the arrays, for a test set built in memory)

    @property
    def n(self) -> int:
        return len(self.image_ids)

    @property
    def n_classes(self) -> int:
        return len(self.wnids)

    def ground_truth(self) -> GroundTruth:
        """The same test set as `pipeline.evaluate` takes it."""
        truth = dict(zip(self.image_ids, (int(t) for t in self.truth), strict=True))
        return GroundTruth(list(self.image_ids), truth, self.boxes[["image_id", "cls", *BOX]].reset_index(drop=True),
                           list(self.wnids))

    @property
    def position(self) -> dict[str, int]:
        return {i: k for k, i in enumerate(self.image_ids)}


def _read_checked(store: Store, key: str, sha256: str, what: str) -> bytes:
    try:
        data = store.get(key)
    except MissingKey:
        raise ChallengeError(f"{what} {key} is missing from {store.url}; the challenge cannot be scored") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ChallengeError(f"{what} {key} does not match the sha256 its manifest records; it was changed")
    return data


def load_held_out(store: Store, version: str) -> HeldOut:
    """The hidden test set of challenge release `version` (built with `release build --challenge`)."""
    manifest = read_manifest(store, version)
    info = (manifest.get("stats") or {}).get("challenge")
    if not info or "test_images" not in manifest["files"]:
        raise ChallengeError(f"release {version!r} publishes its test labels, so they cannot be a challenge's hidden "
                             "test set. A challenge needs a release built with `synsetforge release build --challenge "
                             "--version NEW` whose test images no release has published: collect new images, then "
                             f"`--challenge --parent {version} --fresh-test` keeps {version}'s train images, makes its "
                             "test images val images and draws the test split from the new images only")
    doc = json.loads(_read_checked(store, info["private_manifest"], info["private_manifest_sha256"],
                                   "private manifest"))
    if not info["private_manifest"].startswith(private_release_prefix(version) + "/"):
        raise ChallengeError(f"release {version!r}: private manifest {info['private_manifest']} is not under "
                             f"{private_release_prefix(version)}/")
    tables = {name: pq.read_table(io.BytesIO(_read_checked(store, e["key"], e["sha256"], f"private {name}")))
              for name, e in doc["files"].items()}
    listing = read_release_table(store, version, "test_images", manifest=manifest)
    synsets = read_release_table(store, version, "synsets", manifest=manifest)
    wnids = sorted(synsets.column("wnid").to_pylist())
    ids = listing.column("image_id").to_pylist()
    if tables["test_images"].column("image_id").to_pylist() != ids:
        raise ChallengeError(f"release {version!r}: the private test images are not the public test listing")
    labels = tables["test_labels"].to_pandas()
    prim = labels[labels.is_primary].set_index("image_id").wnid
    index = {w: k + 1 for k, w in enumerate(wnids)}
    truth = np.array([index[prim[i]] for i in ids], dtype=np.int32)
    pos = {i: k for k, i in enumerate(ids)}
    b = tables["test_boxes"].select(["image_id", "wnid", *BOX]).to_pandas()
    boxes = pd.DataFrame({"image": b.image_id.map(pos).astype(np.int64), "image_id": b.image_id,
                          "cls": b.wnid.map(index).astype(np.int64), **{c: b[c].astype(np.float64) for c in BOX}})
    return HeldOut(version, ids, listing.column("file").to_pylist(), wnids, truth, boxes.reset_index(drop=True),
                   listing.column("width").to_numpy(zero_copy_only=False).astype(np.float64),
                   listing.column("height").to_numpy(zero_copy_only=False).astype(np.float64),
                   info["private_manifest_sha256"])


def held_out_from_arrays(truth: Any, n_classes: int, *, boxes: pd.DataFrame | None = None,
                         widths: Any = None, heights: Any = None, version: str = "memory") -> HeldOut:
    """A test set built in memory (benchmarks, unit tests): image k is named by its position."""
    truth = np.asarray(truth, dtype=np.int32)
    n = len(truth)
    ids = [hashlib.sha256(f"{version}:{k}".encode()).hexdigest() for k in range(n)]
    wnids = [f"n9{k:07d}" for k in range(n_classes)]
    if boxes is None:
        boxes = pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                              (("image", np.int64), ("cls", np.int64), *((c, np.float64) for c in BOX))})
    boxes = boxes.copy()
    boxes["image_id"] = [ids[int(k)] for k in boxes["image"]]
    digest = hashlib.sha256(truth.tobytes() + pd.util.hash_pandas_object(boxes, index=False).values.tobytes()
                            ).hexdigest()
    return HeldOut(version, ids, [test_file_stem(version, k + 1) for k in range(n)], wnids, truth,
                   boxes[["image", "image_id", "cls", *BOX]].reset_index(drop=True),
                   np.full(n, 500.0) if widths is None else np.asarray(widths, np.float64),
                   np.full(n, 375.0) if heights is None else np.asarray(heights, np.float64), digest)


def partition(image_ids: list[str], salt: str, public_fraction: float) -> np.ndarray:
    """Which test images score the public leaderboard (True) and which the private one: the round(f * n) images
    with the smallest sha256(salt, image_id) are public. Without the salt nobody can tell them apart."""
    if not 0 < public_fraction < 1:
        raise ChallengeError(f"public_fraction {public_fraction} must be in (0, 1)")
    keys = np.array([hashlib.sha256(f"{salt}\x00{i}".encode()).digest()[:8] for i in image_ids], dtype="S8")
    order = np.argsort(keys, kind="stable")
    public = np.zeros(len(image_ids), dtype=bool)
    public[order[:round(public_fraction * len(image_ids))]] = True
    return public


def arrow_listing(test: HeldOut) -> pa.Table:
    """The public listing: devkit file name and image id per line, in submission order (no labels)."""
    return pa.table({"file": test.files, "image_id": test.image_ids})
