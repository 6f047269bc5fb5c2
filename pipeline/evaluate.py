"""ILSVRC evaluation of submissions against a release's val split: classification, localization, detection.

Metrics (Russakovsky et al., IJCV 2015; devkit 2012-2015):
- cls: up to 5 guesses per image; top-1 error = first guess wrong, top-5 (flat) error = no guess equals the
  true class. An image with no line / no guesses counts as an error.
- loc: a guess is right only when its class is the true class and its box has IoU >= 0.5 with a true box
  of that class. Only val images that have a box of their true class are scored (our releases box a share
  of images; ILSVRC boxed all); the count is reported.
- det: per class, detections of all images sorted by score; each is matched to the unmatched true box of
  its class in its image with the highest IoU among those with IoU >= min(0.5, w*h / ((w+10)*(h+10))),
  w x h the true box's size, so small objects get a looser threshold. A detection of an already matched
  object is a false positive (duplicates). AP is the area under the precision envelope (VOC 2010+ /
  ILSVRC devkit `VOCap`); "coco101" (101 recall points, as pycocotools) and "voc07" (11 points) can be
  chosen. mAP is the mean over classes that have true boxes.
Boxes are continuous pixel coordinates (x_max - x_min is the width), as in the release's boxes table; the
MATLAB devkit's +1 on integer pixel boxes is not applied.

Input formats:
- devkit text: cls = one line per val image (devkit order), up to 5 space-separated 1-based class indices;
  loc = per line up to 5 groups "class x_min y_min x_max y_max"; det = one detection per line
  "image_index class score x_min y_min x_max y_max" (1-based image index); ground truth = one index per
  line; mapping = lines holding a 1-based index and a wnid (either order, e.g. map_clsloc.txt).
- Parquet: columns image_id (or image_index, 1-based), wnid (or class_index, 1-based), rank or score,
  and for loc/det x_min, y_min, x_max, y_max.

    >>> classification_error([3, 1], [[3, 2], [2, 4, 5, 6, 1]])
    {'top1_error': 0.5, 'top5_error': 0.0, 'n_images': 2}
    >>> round(float(det_iou_threshold(10, 10)), 3)
    0.25
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import UserError

MAX_GUESSES = 5
BOX = ["x_min", "y_min", "x_max", "y_max"]


class EvaluationInputError(UserError):
    """A submission or ground-truth file is malformed; the message names the file and the line."""


# ---------------------------------------------------------------- pure metrics


def iou(a: Sequence[float], b: np.ndarray) -> np.ndarray:
    """IoU of box `a` with each row of `b` (x_min, y_min, x_max, y_max)."""
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def det_iou_threshold(w: Any, h: Any) -> Any:
    """ILSVRC DET: a true box of w x h pixels matches at IoU >= min(0.5, w*h / ((w+10)*(h+10)))."""
    return np.minimum(0.5, (w * h) / ((w + 10.0) * (h + 10.0)))


def classification_error(truth: Sequence[int], guesses: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Top-1 and top-5 flat error; guesses[i] are image i's guesses, best first (at most 5)."""
    if len(guesses) != len(truth):
        raise EvaluationInputError(f"{len(guesses)} prediction lines for {len(truth)} ground-truth images")
    top1 = top5 = 0
    for i, (t, g) in enumerate(zip(truth, guesses, strict=True)):
        if len(g) > MAX_GUESSES:
            raise EvaluationInputError(f"image {i + 1}: {len(g)} guesses, at most {MAX_GUESSES} allowed")
        top1 += not (len(g) and g[0] == t)
        top5 += t not in g
    n = len(truth)
    return {"top1_error": top1 / n if n else float("nan"), "top5_error": top5 / n if n else float("nan"),
            "n_images": n}


def localization_error(
    truth: dict[str, int], true_boxes: pd.DataFrame, guesses: dict[str, list[tuple[int, Sequence[float]]]]
) -> dict[str, Any]:
    """Top-1 / top-5 localization error over images that have a true box of their class.

    `true_boxes` has image_id, cls, x_min..y_max; `guesses[image_id]` is a list of (cls, box), best first.
    """
    by_image = {k: g for k, g in true_boxes.groupby("image_id")}
    top1 = top5 = n = 0
    for image_id, t in truth.items():
        tb = by_image.get(image_id)
        if tb is None:
            continue
        tb = tb[tb.cls == t][BOX].to_numpy(dtype=np.float64)
        if not len(tb):
            continue
        n += 1
        g = guesses.get(image_id, [])
        if len(g) > MAX_GUESSES:
            raise EvaluationInputError(f"image {image_id}: {len(g)} guesses, at most {MAX_GUESSES} allowed")
        hits = [c == t and bool((iou(box, tb) >= 0.5).any()) for c, box in g]
        top1 += not (hits and hits[0])
        top5 += not any(hits)
    return {"top1_error": top1 / n if n else float("nan"), "top5_error": top5 / n if n else float("nan"),
            "n_images": n}


def average_precision(recall: np.ndarray, precision: np.ndarray, method: str = "voc") -> float:
    """AP from a precision/recall curve (points in detection order).

    voc: exact area under the monotone precision envelope (VOC 2010+, ILSVRC VOCap);
    coco101: mean envelope precision at recall 0, 0.01, ..., 1 (pycocotools); voc07: 11 points.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if method == "voc":
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
        return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
    env = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    points = np.linspace(0, 1, 101) if method == "coco101" else np.linspace(0, 1, 11) if method == "voc07" else None
    if points is None:
        raise ValueError(f"unknown AP method {method!r}; use voc, coco101 or voc07")
    if method == "voc07":  # max precision at recall >= t
        return float(np.mean([env[recall >= t].max() if (recall >= t).any() else 0.0 for t in points]))
    idx = np.searchsorted(recall, points, side="left")
    return float(np.mean([env[i] if i < len(env) else 0.0 for i in idx]))


def match_detections(dets: pd.DataFrame, gts: pd.DataFrame) -> tuple[np.ndarray, int]:
    """For one class: True/False per detection (in score order, highest first) and the number of true boxes.

    dets: image_id, score, box; gts: image_id, box. Greedy in score order; each true box matches once.
    """
    order = np.argsort(-dets.score.to_numpy(dtype=np.float64), kind="mergesort")
    dets = dets.iloc[order]
    gt_boxes = {k: g[BOX].to_numpy(dtype=np.float64) for k, g in gts.groupby("image_id")}
    thresholds = {k: det_iou_threshold(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) for k, b in gt_boxes.items()}
    used = {k: np.zeros(len(b), dtype=bool) for k, b in gt_boxes.items()}
    tp = np.zeros(len(dets), dtype=bool)
    boxes = dets[BOX].to_numpy(dtype=np.float64)
    for j, image_id in enumerate(dets.image_id.to_numpy()):
        gb = gt_boxes.get(image_id)
        if gb is None:
            continue
        ov = iou(boxes[j], gb)
        ok = (ov >= thresholds[image_id]) & ~used[image_id]
        if ok.any():
            k = int(np.argmax(np.where(ok, ov, -1.0)))
            used[image_id][k] = True
            tp[j] = True
    return tp, len(gts)


def detection_ap(dets: pd.DataFrame, gts: pd.DataFrame, method: str = "voc") -> dict[str, Any]:
    """Per-class AP and mAP. dets: image_id, cls, score, box; gts: image_id, cls, box."""
    per_class = {}
    for cls, g in gts.groupby("cls"):
        d = dets[dets.cls == cls]
        tp, n_gt = match_detections(d, g)
        ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
        recall = ctp / n_gt
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        per_class[cls] = {"ap": average_precision(recall, precision, method) if len(tp) else 0.0,
                          "n_true": int(n_gt), "n_detections": int(len(d)), "n_tp": int(tp.sum())}
    aps = [v["ap"] for v in per_class.values()]
    return {"mean_ap": float(np.mean(aps)) if aps else float("nan"), "per_class": per_class, "method": method}


# ---------------------------------------------------------------- ground truth and file formats


@dataclass
class GroundTruth:
    order: list[str]  # val image ids in devkit order (line k of text files = order[k-1])
    truth: dict[str, int]  # image_id -> 1-based class index
    boxes: pd.DataFrame  # image_id, cls, x_min..y_max (all classes)
    wnids: list[str]  # wnids[k-1] = class k

    @property
    def index(self) -> dict[str, int]:
        return {w: k + 1 for k, w in enumerate(self.wnids)}


def ground_truth_from_release(store: Any, version: str, split: str = "val") -> GroundTruth:
    from pipeline.release.export import class_index, split_order
    from pipeline.release.manifest import read_manifest, read_release_table

    manifest = read_manifest(store, version)
    if manifest.get("task") == "det":  # a DET release: fully annotated images, every instance boxed
        from pipeline.release.det import det_ground_truth

        return det_ground_truth(store, version, split)
    synsets = read_release_table(store, version, "synsets", manifest=manifest)
    labels = read_release_table(store, version, "labels", manifest=manifest)
    boxes = read_release_table(store, version, "boxes", manifest=manifest)
    index = class_index(synsets)
    order = split_order(labels, split)
    prim = labels.filter(labels["is_primary"]).to_pandas()
    wnid_of = dict(zip(prim.image_id, prim.wnid, strict=True))
    truth = {i: index[wnid_of[i]] for i in order}
    b = boxes.select(["image_id", "wnid", *BOX]).to_pandas()
    b = b[b.image_id.isin(set(order))]
    b["cls"] = b.wnid.map(index)
    return GroundTruth(order, truth, b[["image_id", "cls", *BOX]].reset_index(drop=True), list(index))


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationInputError(f"cannot read {path}: {exc}") from None


def read_mapping(path: str | Path) -> list[str]:
    """Devkit class mapping (e.g. map_clsloc.txt "n02119789 1 kit_fox"): returns wnids in index order."""
    path = Path(path)
    found: dict[int, str] = {}
    for n, line in enumerate(_lines(path), start=1):
        tok = line.split()
        if not tok:
            continue
        idx = next((t for t in tok[:2] if t.isdigit()), None)
        wnid = next((t for t in tok[:2] if t.startswith("n") and t[1:].isdigit()), None)
        if idx is None or wnid is None:
            raise EvaluationInputError(f"{path}:{n}: expected a class index and a wnid, got {line!r}")
        found[int(idx)] = wnid
    if sorted(found) != list(range(1, len(found) + 1)):
        raise EvaluationInputError(f"{path}: class indices must be 1..{len(found)} without gaps")
    return [found[k] for k in range(1, len(found) + 1)]


def read_ground_truth_file(path: str | Path, n_classes: int | None = None) -> list[int]:
    path = Path(path)
    out = []
    for n, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            k = int(line.strip())
        except ValueError:
            raise EvaluationInputError(f"{path}:{n}: expected one class index, got {line!r}") from None
        if k < 1 or (n_classes and k > n_classes):
            raise EvaluationInputError(f"{path}:{n}: class index {k} outside 1..{n_classes or 'N'}")
        out.append(k)
    return out


def _ints(path: Path, n: int, tokens: list[str], n_classes: int) -> list[int]:
    try:
        vals = [int(t) for t in tokens]
    except ValueError:
        raise EvaluationInputError(f"{path}:{n}: class indices must be integers, got {' '.join(tokens)!r}") from None
    bad = [v for v in vals if v < 1 or v > n_classes]
    if bad:
        raise EvaluationInputError(f"{path}:{n}: class index {bad[0]} outside 1..{n_classes}")
    return vals


def read_cls_text(path: str | Path, n_images: int, n_classes: int) -> list[list[int]]:
    path = Path(path)
    lines = _lines(path)
    if len(lines) != n_images:
        raise EvaluationInputError(f"{path}: {len(lines)} lines, the ground truth has {n_images} images; "
                                   "write one line per validation image in devkit order")
    out = []
    for n, line in enumerate(lines, start=1):
        g = _ints(path, n, line.split(), n_classes)
        if len(g) > MAX_GUESSES:
            raise EvaluationInputError(f"{path}:{n}: {len(g)} guesses, at most {MAX_GUESSES} allowed")
        out.append(g)
    return out


def read_loc_text(path: str | Path, order: list[str], n_classes: int) -> dict[str, list[tuple[int, list[float]]]]:
    path = Path(path)
    lines = _lines(path)
    if len(lines) != len(order):
        raise EvaluationInputError(f"{path}: {len(lines)} lines for {len(order)} validation images")
    out = {}
    for n, (line, image_id) in enumerate(zip(lines, order, strict=True), start=1):
        tok = line.split()
        if len(tok) % 5:
            raise EvaluationInputError(f"{path}:{n}: expected groups of 'class x_min y_min x_max y_max'")
        groups = []
        for g in range(0, len(tok), 5):
            c = _ints(path, n, tok[g:g + 1], n_classes)[0]
            try:
                groups.append((c, [float(t) for t in tok[g + 1:g + 5]]))
            except ValueError:
                raise EvaluationInputError(f"{path}:{n}: box coordinates must be numbers") from None
        if len(groups) > MAX_GUESSES:
            raise EvaluationInputError(f"{path}:{n}: {len(groups)} guesses, at most {MAX_GUESSES} allowed")
        out[image_id] = groups
    return out


def read_det_text(path: str | Path, order: list[str], n_classes: int) -> pd.DataFrame:
    path = Path(path)
    rows = []
    for n, line in enumerate(_lines(path), start=1):
        tok = line.split()
        if not tok:
            continue
        if len(tok) != 7:
            raise EvaluationInputError(f"{path}:{n}: expected 'image_index class score x_min y_min x_max y_max'")
        try:
            img, cls = int(tok[0]), int(tok[1])
            vals = [float(t) for t in tok[2:]]
        except ValueError:
            raise EvaluationInputError(f"{path}:{n}: not numbers: {line!r}") from None
        if not 1 <= img <= len(order):
            raise EvaluationInputError(f"{path}:{n}: image index {img} outside 1..{len(order)}")
        if not 1 <= cls <= n_classes:
            raise EvaluationInputError(f"{path}:{n}: class index {cls} outside 1..{n_classes}")
        rows.append((order[img - 1], cls, *vals))
    return pd.DataFrame(rows, columns=["image_id", "cls", "score", *BOX])


def read_parquet_predictions(path: str | Path, task: str, gt: GroundTruth) -> pd.DataFrame:
    """Parquet predictions -> image_id, cls (1-based), rank/score[, box], checked against the ground truth."""
    path = Path(path)
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise EvaluationInputError(f"cannot read Parquet predictions {path}: {exc}") from None
    if "image_id" not in df and "image_index" in df:
        idx = df.image_index.astype(int)
        if ((idx < 1) | (idx > len(gt.order))).any():
            raise EvaluationInputError(f"{path}: image_index outside 1..{len(gt.order)}")
        df["image_id"] = [gt.order[i - 1] for i in idx]
    if "cls" not in df:
        if "wnid" in df:
            unknown = sorted(set(df.wnid) - set(gt.index))
            if unknown:
                raise EvaluationInputError(f"{path}: unknown wnids {unknown[:5]}; use the release's classes")
            df["cls"] = df.wnid.map(gt.index)
        elif "class_index" in df:
            df["cls"] = df.class_index.astype(int)
    need = ["image_id", "cls"] + (BOX if task in ("loc", "det") else []) + (["score"] if task == "det" else [])
    missing = [c for c in need if c not in df]
    if missing:
        raise EvaluationInputError(f"{path}: missing columns {missing} for task {task}; see `synsetforge evaluate -h`")
    if ((df.cls < 1) | (df.cls > len(gt.wnids))).any():
        raise EvaluationInputError(f"{path}: class indices outside 1..{len(gt.wnids)}")
    unknown = set(df.image_id) - set(gt.truth)
    if unknown:
        raise EvaluationInputError(f"{path}: {len(unknown)} image ids are not in the evaluated split, "
                                   f"e.g. {sorted(unknown)[0]}")
    if task != "det":
        if "rank" not in df:
            df["rank"] = df.groupby("image_id")["score"].rank(ascending=False, method="first") if "score" in df \
                else df.groupby("image_id").cumcount() + 1
        df = df.sort_values(["image_id", "rank"], kind="stable")
    return df


def _guess_lists(df: pd.DataFrame, gt: GroundTruth) -> list[list[int]]:
    by = df.groupby("image_id")["cls"].apply(list).to_dict()
    return [[int(c) for c in by.get(i, [])] for i in gt.order]


def evaluate(task: str, predictions: str | Path, gt: GroundTruth, *, ap_method: str = "voc") -> dict[str, Any]:
    """Score a submission file (text or Parquet) against `gt`."""
    path = Path(predictions)
    if not path.is_file():
        raise EvaluationInputError(f"predictions file {path} does not exist")
    parquet = path.suffix.lower() in (".parquet", ".pq")
    n_classes = len(gt.wnids)
    if task == "cls":
        guesses = _guess_lists(read_parquet_predictions(path, task, gt), gt) if parquet else \
            read_cls_text(path, len(gt.order), n_classes)
        return {"task": "cls", **classification_error([gt.truth[i] for i in gt.order], guesses)}
    if task == "loc":
        if parquet:
            df = read_parquet_predictions(path, task, gt)
            guesses = {k: [(int(r.cls), [r.x_min, r.y_min, r.x_max, r.y_max]) for r in g.itertuples()]
                       for k, g in df.groupby("image_id")}
        else:
            guesses = read_loc_text(path, gt.order, n_classes)
        return {"task": "loc", **localization_error(gt.truth, gt.boxes, guesses)}
    if task == "det":
        dets = read_parquet_predictions(path, task, gt) if parquet else read_det_text(path, gt.order, n_classes)
        res = detection_ap(dets, gt.boxes, ap_method)
        res["per_class"] = {gt.wnids[int(k) - 1]: v for k, v in res["per_class"].items()}
        return {"task": "det", **res}
    raise EvaluationInputError(f"unknown task {task!r}; use cls, loc or det")


def ground_truth_from_files(ground_truth: str | Path, mapping: str | Path | None = None,
                            n_classes: int | None = None) -> GroundTruth:
    """Classification ground truth from devkit text files alone (no store): images are named by line number.

    Without a mapping, prediction and truth are both the devkit's 1-based indices and nothing needs a wnid: the
    classes are 1..n_classes (default: the largest index in the ground truth)."""
    if mapping is not None:
        wnids = read_mapping(mapping)
        labels = read_ground_truth_file(ground_truth, len(wnids))
    else:
        labels = read_ground_truth_file(ground_truth, n_classes)
        k = n_classes or max(labels, default=0)
        if k < 1:
            raise EvaluationInputError(f"{ground_truth}: no ground-truth lines")
        wnids = [f"class {i}" for i in range(1, k + 1)]
    order = [f"{k:08d}" for k in range(1, len(labels) + 1)]
    return GroundTruth(order, dict(zip(order, labels, strict=True)),
                       pd.DataFrame(columns=["image_id", "cls", *BOX]), wnids)


def format_result(res: dict[str, Any]) -> str:
    if res["task"] in ("cls", "loc"):
        return (f"| task | images | top-1 error | top-5 error |\n|---|---:|---:|---:|\n"
                f"| {res['task']} | {res['n_images']} | {res['top1_error']:.4f} | {res['top5_error']:.4f} |")
    lines = [f"| wnid | true boxes | detections | AP ({res['method']}) |", "|---|---:|---:|---:|"]
    for w, v in sorted(res["per_class"].items()):
        lines.append(f"| {w} | {v['n_true']} | {v['n_detections']} | {v['ap']:.4f} |")
    lines.append(f"| **mean** | | | **{res['mean_ap']:.4f}** |")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def _cmd(args: argparse.Namespace, settings: Any) -> int:
    from pipeline.errors import UserError
    from pipeline.release.manifest import ReleaseError
    from pipeline.store import store_from_settings

    try:
        if args.release:
            store = store_from_settings(settings)
            gt = ground_truth_from_release(store, args.release, args.split)
        elif args.ground_truth and args.task == "cls":
            gt = ground_truth_from_files(args.ground_truth, args.mapping, args.n_classes)
        else:
            raise UserError("give --release V, or for --task cls --ground-truth FILE (with --mapping FILE or "
                            "--n-classes N when predictions may name classes the ground truth never uses)")
        if args.release and args.task != "det" and _is_det_release(store, args.release):
            raise UserError(f"release {args.release!r} is a DET release: score it with --task det")
        res = evaluate(args.task, args.predictions, gt, ap_method=args.ap)
    except (EvaluationInputError, ReleaseError) as exc:
        raise UserError(str(exc)) from None
    print(format_result(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, sort_keys=True))
    return 0


def _is_det_release(store: Any, version: str) -> bool:
    from pipeline.release.manifest import read_manifest

    return read_manifest(store, version).get("task") == "det"


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="score a submission (cls, loc, det) against a release's val split",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", help="release version whose ground truth to use")
    p.add_argument("--task", choices=["cls", "loc", "det"], required=True)
    p.add_argument("--predictions", required=True, help="devkit text file or Parquet")
    p.add_argument("--split", default="val", choices=["val", "test"], help="split to score (default val)")
    p.add_argument("--ground-truth", help="devkit ground-truth file (cls without a store)")
    p.add_argument("--mapping", help="devkit mapping file index <-> wnid (with --ground-truth; optional)")
    p.add_argument("--n-classes", type=int, help="number of classes when there is no mapping (default: the largest "
                   "index in the ground truth)")
    p.add_argument("--ap", default="voc", choices=["voc", "coco101", "voc07"], help="AP interpolation for det")
    p.add_argument("--json", help="also write the full result as JSON here")
    p.set_defaults(func=_cmd)

