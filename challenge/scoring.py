"""Submissions: parse and validate (every problem listed), evaluate per image, bootstrap, the Ladder.

A submission is a devkit text file or Parquet, read against the hidden test set in its public order (line k =
test image k). `read_submission` lists everything that is wrong (line count, index out of range, more than five
guesses, unknown image, malformed box, ...) instead of stopping at the first problem; a submission with
problems is refused and never counts against a team's limit.

The headline metric comes from `pipeline.evaluate` (top-5 classification error, top-5 localization error, mean
AP); `Evaluation` keeps what it was computed from per image (0/1 losses for cls and loc; every detection's
image, class, score and match for det), so the same number can be recomputed on any weighting of the test
images: the public or the private part, or a bootstrap resample. `evaluate_submission` checks that the
all-images value equals pipeline.evaluate's.

    >>> from challenge.truth import held_out_from_arrays
    >>> test = held_out_from_arrays([1, 2, 3, 1], n_classes=3)
    >>> ev = evaluate_submission(read_submission(b"1\\n3 2\\n1\\n2 3\\n", "cls", test), test)
    >>> ev.metric, ev.headline["top5_error"], ev.headline["top1_error"]
    ('top5_error', 0.5, 0.75)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from challenge.truth import HeldOut
from pipeline import evaluate as ev_mod
from pipeline.evaluate import BOX, MAX_GUESSES

TASKS = ("cls", "loc", "det")
METRIC = {"cls": "top5_error", "loc": "top5_error", "det": "mean_ap"}
LOWER_IS_BETTER = {"cls": True, "loc": True, "det": False}
EXAMPLES_PER_KIND = 5


class SubmissionProblems(ValueError):
    """A submission that cannot be scored; `problems` lists what is wrong (kind, count, examples)."""

    def __init__(self, problems: list[dict[str, Any]]):
        self.problems = problems
        super().__init__("; ".join(format_problem(p) for p in problems))


def format_problem(p: dict[str, Any]) -> str:
    more = p["count"] - len(p["examples"])
    return f"{p['kind']}: " + "; ".join(p["examples"]) + (f" (and {more} more)" if more > 0 else "")


class Problems:
    """Collects problems by kind: a count and the first few examples of each."""

    def __init__(self) -> None:
        self.kinds: dict[str, dict[str, Any]] = {}

    def add(self, kind: str, example: str, count: int = 1) -> None:
        p = self.kinds.setdefault(kind, {"kind": kind, "count": 0, "examples": []})
        p["count"] += count
        if len(p["examples"]) < EXAMPLES_PER_KIND:
            p["examples"].append(example)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def raise_if_any(self) -> None:
        if self.kinds:
            raise SubmissionProblems(list(self.kinds.values()))


@dataclass
class Parsed:
    """A valid submission: cls = (n, 5) guesses (0 = none), loc = the same plus (n, 5, 4) boxes,
    det = a frame of detections (image position, cls, score, box)."""

    task: str
    guesses: np.ndarray | None = None
    boxes: np.ndarray | None = None
    detections: pd.DataFrame | None = None
    format: str = "text"


# ------------------------------------------------------------------------------------------------ reading
def _text_lines(data: bytes, problems: Problems) -> list[str] | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.add("encoding", f"not UTF-8 text (byte {exc.start}); upload devkit text or Parquet")
        return None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _check_box(b: list[float], k: int, w: float, h: float, where: str, problems: Problems) -> bool:
    if not all(math.isfinite(v) for v in b):
        problems.add("malformed box", f"{where}: coordinates must be finite numbers")
        return False
    if b[2] <= b[0] or b[3] <= b[1]:
        problems.add("malformed box", f"{where}: x_max must exceed x_min and y_max y_min, got {b}")
        return False
    if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
        problems.add("box outside the image", f"{where}: {b} is outside the image's {w:g} x {h:g} pixels")
        return False
    return True


def _classes(tokens: list[str], where: str, n_classes: int, problems: Problems) -> list[int] | None:
    out = []
    for t in tokens:
        try:
            c = int(t)
        except ValueError:
            problems.add("not an integer", f"{where}: {t!r} is not a class index")
            return None
        if not 1 <= c <= n_classes:
            problems.add("index out of range", f"{where}: class index {c} outside 1..{n_classes}")
            return None
        out.append(c)
    return out


def _read_cls_text(lines: list[str], test: HeldOut, problems: Problems) -> Parsed:
    n, k = test.n, test.n_classes
    guesses = np.zeros((n, MAX_GUESSES), dtype=np.int32)
    for i, line in enumerate(lines[:n]):
        tok = line.split()
        where = f"line {i + 1}"
        if len(tok) > MAX_GUESSES:
            problems.add("more than five guesses", f"{where}: {len(tok)} guesses, at most {MAX_GUESSES}")
            continue
        g = _classes(tok, where, k, problems)
        if g:
            guesses[i, :len(g)] = g
    return Parsed("cls", guesses=guesses)


def _read_loc_text(lines: list[str], test: HeldOut, problems: Problems) -> Parsed:
    n, k = test.n, test.n_classes
    guesses = np.zeros((n, MAX_GUESSES), dtype=np.int32)
    boxes = np.zeros((n, MAX_GUESSES, 4), dtype=np.float64)
    for i, line in enumerate(lines[:n]):
        tok = line.split()
        where = f"line {i + 1}"
        if len(tok) % 5:
            problems.add("malformed box", f"{where}: expected groups of 'class x_min y_min x_max y_max'")
            continue
        if len(tok) // 5 > MAX_GUESSES:
            problems.add("more than five guesses", f"{where}: {len(tok) // 5} guesses, at most {MAX_GUESSES}")
            continue
        for g in range(len(tok) // 5):
            c = _classes(tok[5 * g:5 * g + 1], where, k, problems)
            try:
                b = [float(t) for t in tok[5 * g + 1:5 * g + 5]]
            except ValueError:
                problems.add("malformed box", f"{where}: box coordinates must be numbers")
                continue
            if c and _check_box(b, c[0], test.widths[i], test.heights[i], where, problems):
                guesses[i, g], boxes[i, g] = c[0], b
    return Parsed("loc", guesses=guesses, boxes=boxes)


def _read_det_text(lines: list[str], test: HeldOut, problems: Problems) -> Parsed:
    rows = []
    for i, line in enumerate(lines):
        tok = line.split()
        if not tok:
            continue
        where = f"line {i + 1}"
        if len(tok) != 7:
            problems.add("malformed line", f"{where}: expected 'image_index class score x_min y_min x_max y_max'")
            continue
        try:
            img = int(tok[0])
        except ValueError:
            problems.add("unknown image", f"{where}: image index {tok[0]!r} is not an integer")
            continue
        if not 1 <= img <= test.n:
            problems.add("unknown image", f"{where}: image index {img} outside 1..{test.n}")
            continue
        c = _classes(tok[1:2], where, test.n_classes, problems)
        try:
            vals = [float(t) for t in tok[2:]]
        except ValueError:
            problems.add("malformed box", f"{where}: score and box must be numbers")
            continue
        if not math.isfinite(vals[0]):
            problems.add("malformed line", f"{where}: score must be a finite number")
            continue
        if c and _check_box(vals[1:], c[0], test.widths[img - 1], test.heights[img - 1], where, problems):
            rows.append((img - 1, c[0], *vals))
    det = pd.DataFrame(rows, columns=["image", "cls", "score", *BOX])
    return Parsed("det", detections=det)


PARQUET_MAGIC = b"PAR1"


def _read_parquet(data: bytes, task: str, test: HeldOut, problems: Problems, max_rows: int) -> Parsed | None:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(io.BytesIO(data))
        meta = f.metadata
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        problems.add("unreadable Parquet", f"cannot read the file: {exc}")
        return None
    if meta.num_rows > max_rows:
        problems.add("too many rows", f"{meta.num_rows} rows, at most {max_rows} for {test.n} images")
        return None
    unpacked = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    if unpacked > 64 * max(len(data), 1 << 20):
        problems.add("unreadable Parquet", f"{unpacked} bytes unpacked from {len(data)}: refused")
        return None
    names = set(f.schema_arrow.names)
    need_box = task in ("loc", "det")
    missing = [c for c in (["image_id|image_index", "wnid|class_index"] + (BOX if need_box else [])
                           + (["score"] if task == "det" else [])) if not (set(c.split("|")) & names)]
    if missing:
        problems.add("missing column", f"columns {missing} are needed for task {task} (have {sorted(names)})")
        return None
    cols = [c for c in ("image_id", "image_index", "wnid", "class_index", "rank", "score", *BOX) if c in names]
    try:
        df = f.read(columns=cols).to_pandas()
    except Exception as exc:  # noqa: BLE001
        problems.add("unreadable Parquet", f"cannot read the columns: {exc}")
        return None
    pos = test.position
    if "image_id" in df:
        img = df.image_id.map(pos)
        bad = img.isna()
        for v in df.image_id[bad].head(EXAMPLES_PER_KIND):
            problems.add("unknown image", f"image_id {str(v)[:64]!r} is not a test image", 0)
        if bad.any():
            problems.add("unknown image", f"{int(bad.sum())} rows name images outside the test set", int(bad.sum()))
    else:
        img = pd.to_numeric(df.image_index, errors="coerce") - 1
        bad = img.isna() | (img < 0) | (img >= test.n) | (img != np.floor(img))
        if bad.any():
            problems.add("unknown image", f"{int(bad.sum())} rows have an image_index outside 1..{test.n}, e.g. "
                         f"{df.image_index[bad].iloc[0]!r}", int(bad.sum()))
    index = {w: k + 1 for k, w in enumerate(test.wnids)}
    if "wnid" in df:
        cls = df.wnid.map(index)
        badc = cls.isna()
        if badc.any():
            problems.add("index out of range", f"{int(badc.sum())} rows name wnids outside the release's classes, e.g. "
                         f"{str(df.wnid[badc].iloc[0])[:20]!r}", int(badc.sum()))
    else:
        cls = pd.to_numeric(df.class_index, errors="coerce")
        badc = cls.isna() | (cls < 1) | (cls > test.n_classes) | (cls != np.floor(cls))
        if badc.any():
            problems.add("index out of range", f"{int(badc.sum())} rows have a class_index outside "
                         f"1..{test.n_classes}, e.g. {df.class_index[badc].iloc[0]!r}", int(badc.sum()))
    if problems:
        return None
    out = pd.DataFrame({"image": img.astype(np.int64).to_numpy(), "cls": cls.astype(np.int64).to_numpy()})
    if "score" in df:
        out["score"] = pd.to_numeric(df.score, errors="coerce").to_numpy(dtype=np.float64)
    if "rank" in df:
        out["rank"] = pd.to_numeric(df["rank"], errors="coerce").to_numpy(dtype=np.float64)
    if need_box:
        b = df[BOX].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        w, h = test.widths[out.image.to_numpy()], test.heights[out.image.to_numpy()]
        finite = np.isfinite(b).all(axis=1)
        ordered = finite & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        inside = ordered & (b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= w) & (b[:, 3] <= h)
        for mask, kind, what in ((~ordered, "malformed box", "non-finite or empty boxes"),
                                 (ordered & ~inside, "box outside the image", "boxes outside their image")):
            if mask.any():
                r = int(np.nonzero(mask)[0][0])
                problems.add(kind, f"{int(mask.sum())} rows have {what}, e.g. row {r + 1}: {b[r].tolist()}",
                             int(mask.sum()))
        for j, c in enumerate(BOX):
            out[c] = b[:, j]
    if "score" in out and not np.isfinite(out.score).all():
        problems.add("malformed line", "score must be a finite number in every row")
    if problems:
        return None
    if task == "det":
        return Parsed("det", detections=out[["image", "cls", "score", *BOX]], format="parquet")
    order = ["image", "rank"] if "rank" in out else (["image", "score"] if "score" in out else ["image"])
    asc = [True, True] if "rank" in out else ([True, False] if "score" in out else [True])
    out = out.sort_values(order, ascending=asc, kind="stable")
    slot = out.groupby("image").cumcount().to_numpy()
    over = slot >= MAX_GUESSES
    if over.any():
        imgs = np.unique(out.image.to_numpy()[over])
        problems.add("more than five guesses", f"{len(imgs)} images have more than {MAX_GUESSES} rows, e.g. "
                     f"{test.image_ids[imgs[0]][:16]}...", len(imgs))
        return None
    guesses = np.zeros((test.n, MAX_GUESSES), dtype=np.int32)
    guesses[out.image.to_numpy(), slot] = out.cls.to_numpy()
    if task == "cls":
        return Parsed("cls", guesses=guesses, format="parquet")
    boxes = np.zeros((test.n, MAX_GUESSES, 4), dtype=np.float64)
    boxes[out.image.to_numpy(), slot] = out[BOX].to_numpy()
    return Parsed("loc", guesses=guesses, boxes=boxes, format="parquet")


def read_submission(data: bytes, task: str, test: HeldOut, *, max_rows_per_image: int = 100) -> Parsed:
    """Parse and validate a submission; raise SubmissionProblems listing every problem found."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    problems = Problems()
    if data[:4] == PARQUET_MAGIC:
        parsed = _read_parquet(data, task, test, problems, max_rows=max(1, test.n) * max_rows_per_image)
        problems.raise_if_any()
        assert parsed is not None
        return parsed
    lines = _text_lines(data, problems)
    problems.raise_if_any()
    assert lines is not None
    if task in ("cls", "loc") and len(lines) != test.n:
        problems.add("line count", f"{len(lines)} lines, the test set has {test.n} images: write one line per test "
                     "image in the order of the test listing")
    parsed = {"cls": _read_cls_text, "loc": _read_loc_text, "det": _read_det_text}[task](lines, test, problems)
    if task == "det" and len(parsed.detections) > max(1, test.n) * max_rows_per_image:
        problems.add("too many rows", f"{len(parsed.detections)} detections, at most "
                     f"{max(1, test.n) * max_rows_per_image}")
    problems.raise_if_any()
    return parsed


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class Evaluation:
    """Per-image evidence of one submission's score.

    cls/loc: `loss` (n,) 0/1 top-5 error per image, `scored` (n,) which images count (loc: those with a true
    box of their class). det: `det` (image, cls, score, tp) per detection in score order within each class and
    `gt` (image, cls) per true box."""

    task: str
    headline: dict[str, Any]
    loss: np.ndarray | None = None
    scored: np.ndarray | None = None
    det: dict[str, np.ndarray] = field(default_factory=dict)
    gt: dict[str, np.ndarray] = field(default_factory=dict)
    n: int = 0

    @property
    def metric(self) -> str:
        return METRIC[self.task]

    def score(self, weights: np.ndarray) -> np.ndarray:
        """The metric on weighted test images: weights (n,) or (rounds, n), e.g. a 0/1 mask of the public part
        or bootstrap counts. Returns a float (1-D weights) or one value per row."""
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if self.task == "det":
            out = _weighted_map(self.det, self.gt, w)
        else:
            ws = w * self.scored
            den = ws.sum(axis=1)
            out = np.where(den > 0, ws @ self.loss.astype(np.float64) / np.where(den > 0, den, 1), np.nan)
        return out if np.ndim(weights) == 2 else float(out[0])

    # ---- compact storage (the database keeps one blob per submission)
    def to_bytes(self) -> bytes:
        arrays = {"loss": self.loss, "scored": self.scored, **{f"det_{k}": v for k, v in self.det.items()},
                  **{f"gt_{k}": v for k, v in self.gt.items()}}
        buf = io.BytesIO()
        np.savez(buf, **{k: v for k, v in arrays.items() if v is not None})
        head = json.dumps({"task": self.task, "headline": self.headline, "n": self.n}).encode()
        return zlib.compress(len(head).to_bytes(4, "big") + head + buf.getvalue(), 6)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Evaluation:
        raw = zlib.decompress(blob)
        k = int.from_bytes(raw[:4], "big")
        head = json.loads(raw[4:4 + k])
        arrays = np.load(io.BytesIO(raw[4 + k:]), allow_pickle=False)
        return cls(head["task"], head["headline"], arrays["loss"] if "loss" in arrays else None,
                   arrays["scored"] if "scored" in arrays else None,
                   {f[4:]: arrays[f] for f in arrays.files if f.startswith("det_")},
                   {f[3:]: arrays[f] for f in arrays.files if f.startswith("gt_")}, head["n"])


def _weighted_map(det: dict[str, np.ndarray], gt: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
    """Mean AP (VOC: area under the precision envelope) over classes with true boxes, images weighted by w."""
    rounds = w.shape[0]
    classes = np.unique(gt["cls"])
    aps = np.full((rounds, len(classes)), np.nan)
    for j, c in enumerate(classes):
        npos = w[:, gt["image"][gt["cls"] == c]].sum(axis=1)
        sel = det["cls"] == c
        if not sel.any():
            aps[:, j] = np.where(npos > 0, 0.0, np.nan)
            continue
        wd = w[:, det["image"][sel]]
        tp = det["tp"][sel].astype(np.float64)
        ctp = np.cumsum(wd * tp, axis=1)
        cfp = np.cumsum(wd * (1 - tp), axis=1)
        prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        env = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
        dr = wd * tp / np.where(npos > 0, npos, 1)[:, None]
        aps[:, j] = np.where(npos > 0, (dr * env).sum(axis=1), np.nan)
    with warnings.catch_warnings():  # a resample without any true box of the board's classes: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(aps, axis=1) if len(classes) else np.full(rounds, np.nan)


def _loc_losses(parsed: Parsed, test: HeldOut) -> tuple[np.ndarray, np.ndarray]:
    """Per image: scored (has a true box of its class) and the top-5 localization loss."""
    tb = test.boxes[test.boxes.cls.to_numpy() == test.truth[test.boxes.image.to_numpy()]]
    scored = np.zeros(test.n, dtype=bool)
    scored[tb.image.to_numpy()] = True
    img, slot = np.nonzero(parsed.guesses == test.truth[:, None])
    hit = np.zeros(test.n, dtype=bool)
    if len(img) and len(tb):
        g = pd.DataFrame({"image": img, **{c: parsed.boxes[img, slot, j] for j, c in enumerate(BOX)}})
        m = g.merge(tb[["image", *BOX]], on="image", suffixes=("", "_t"))
        iw = np.clip(np.minimum(m.x_max, m.x_max_t) - np.maximum(m.x_min, m.x_min_t), 0, None)
        ih = np.clip(np.minimum(m.y_max, m.y_max_t) - np.maximum(m.y_min, m.y_min_t), 0, None)
        inter = iw * ih
        union = (m.x_max - m.x_min) * (m.y_max - m.y_min) + (m.x_max_t - m.x_min_t) * (m.y_max_t - m.y_min_t) - inter
        ok = (union > 0) & (inter / np.where(union > 0, union, 1) >= 0.5)
        hit[m.image.to_numpy()[ok.to_numpy()]] = True
    return scored, (~hit).astype(np.uint8)


def evaluate_submission(parsed: Parsed, test: HeldOut) -> Evaluation:
    """Score a parsed submission on all test images through pipeline.evaluate and keep the per-image evidence."""
    gt = test.ground_truth()
    if parsed.task == "cls":
        guesses = [[int(c) for c in row if c] for row in parsed.guesses]
        head = ev_mod.classification_error([int(t) for t in test.truth], guesses)
        loss = (~(parsed.guesses == test.truth[:, None]).any(axis=1)).astype(np.uint8)
        ev = Evaluation("cls", head, loss=loss, scored=np.ones(test.n, dtype=bool), n=test.n)
        top1 = float(np.mean(parsed.guesses[:, 0] != test.truth)) if test.n else float("nan")
        _same(ev.score(np.ones(test.n)), head["top5_error"], "top-5 error")
        _same(top1, head["top1_error"], "top-1 error")
        return ev
    if parsed.task == "loc":
        guesses = {test.image_ids[i]: [(int(c), parsed.boxes[i, s].tolist()) for s, c in enumerate(row) if c]
                   for i, row in enumerate(parsed.guesses) if row.any()}
        head = ev_mod.localization_error(gt.truth, gt.boxes, guesses)
        scored, loss = _loc_losses(parsed, test)
        ev = Evaluation("loc", head, loss=loss, scored=scored, n=test.n)
        _same(ev.score(np.ones(test.n)), head["top5_error"], "top-5 localization error")
        return ev
    d = parsed.detections
    dets = pd.DataFrame({"image_id": [test.image_ids[i] for i in d.image], "cls": d.cls.to_numpy(),
                         "score": d.score.to_numpy(), **{c: d[c].to_numpy() for c in BOX}})
    head = ev_mod.detection_ap(dets, gt.boxes)
    head["per_class"] = {test.wnids[int(k) - 1]: v for k, v in head["per_class"].items()}
    parts = {k: [] for k in ("image", "cls", "score", "tp")}
    for c, g in gt.boxes.groupby("cls"):
        sel = d.cls.to_numpy() == c
        tp, _ = ev_mod.match_detections(dets[sel], g)
        order = np.argsort(-d.score.to_numpy()[sel], kind="mergesort")  # the order match_detections uses
        parts["image"].append(d.image.to_numpy()[sel][order])
        parts["cls"].append(np.full(len(order), c))
        parts["score"].append(d.score.to_numpy()[sel][order])
        parts["tp"].append(tp)
    det = {k: (np.concatenate(v) if v else np.zeros(0)).astype(t)
           for (k, v), t in zip(parts.items(), (np.int32, np.int32, np.float64, bool), strict=True)}
    gts = {"image": test.boxes.image.to_numpy().astype(np.int32), "cls": test.boxes.cls.to_numpy().astype(np.int32)}
    ev = Evaluation("det", {k: v for k, v in head.items()}, det=det, gt=gts, n=test.n)
    _same(ev.score(np.ones(test.n)), head["mean_ap"], "mean AP")
    return ev


def _same(a: float, b: float, what: str) -> None:
    if not ((math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9):
        raise AssertionError(f"per-image {what} {a} differs from pipeline.evaluate's {b}")


# ------------------------------------------------------------------------------------------------ fingerprints
def canonical_digest(parsed: Parsed) -> str:
    """sha256 of what a submission says, independent of its format (text or Parquet, spacing)."""
    h = hashlib.sha256(parsed.task.encode())
    if parsed.task == "det":
        d = parsed.detections.sort_values(["image", "cls", "score", *BOX], kind="stable")
        h.update(np.ascontiguousarray(d[["image", "cls"]].to_numpy(np.int64)).tobytes())
        h.update(np.ascontiguousarray(np.round(d[["score", *BOX]].to_numpy(np.float64), 4)).tobytes())
    else:
        h.update(np.ascontiguousarray(parsed.guesses).tobytes())
        if parsed.boxes is not None:
            h.update(np.ascontiguousarray(np.round(parsed.boxes, 1)).tobytes())
    return h.hexdigest()


def signature(parsed: Parsed, n: int) -> np.ndarray:
    """One 64-bit value per test image summarising the prediction for it; two submissions' agreement is the
    share of images whose values are equal (near-identical submissions agree on almost all)."""
    if parsed.task == "cls":
        g = parsed.guesses.astype(np.uint64)
        sig = np.zeros(n, dtype=np.uint64)
        for j in range(g.shape[1]):
            sig = sig * np.uint64(1_000_003) + g[:, j]
        return sig
    per_image: dict[int, list[Any]] = {}
    if parsed.task == "loc":
        for i in range(n):
            per_image[i] = np.round(np.c_[parsed.guesses[i], parsed.boxes[i]]).tolist()
    else:
        d = parsed.detections.sort_values(["image", "cls", "score"], kind="stable")
        for i, g in d.groupby("image"):
            per_image[int(i)] = np.round(g[["cls", *BOX]].to_numpy()).tolist()
    sig = np.zeros(n, dtype=np.uint64)
    for i, v in per_image.items():
        sig[i] = int.from_bytes(hashlib.blake2b(repr(v).encode(), digest_size=8).digest(), "big")
    return sig


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b)) if len(a) and len(a) == len(b) else 0.0


# ------------------------------------------------------------------------------------------------ bootstrap
def bootstrap_weights(subset: np.ndarray, rounds: int, rng: np.random.Generator, chunk: int = 100):
    """Yield (rounds_in_chunk, n) count matrices: each row resamples the images of `subset` (a 0/1 mask) with
    replacement, as many draws as there are images in it."""
    idx = np.nonzero(subset)[0]
    m, n = len(idx), len(subset)
    done = 0
    while done < rounds:
        r = min(chunk, rounds - done)
        draws = rng.integers(0, m, size=(r, m), dtype=np.int64) if m else np.zeros((r, 0), np.int64)
        draws += (np.arange(r, dtype=np.int64) * m)[:, None]
        counts = np.bincount(draws.ravel(), minlength=r * m).reshape(r, m).astype(np.float64)
        if m == n:
            yield counts
        else:
            w = np.zeros((r, n))
            w[:, idx] = counts
            yield w
        done += r


def bootstrap(evals: list[Evaluation], subset: np.ndarray, rounds: int = 1000, seed: int = 0) -> np.ndarray:
    """(rounds, len(evals)) metric values on bootstrap resamples of the images in `subset`, every entry scored on
    the same resample (so differences between entries are paired)."""
    rng = np.random.default_rng(seed)
    out = np.empty((rounds, len(evals)))
    if evals and all(e.task != "det" for e in evals):
        idx = np.nonzero(subset)[0]
        # per image: 0 = not scored, 1 = scored and right, 2 = scored and wrong, for every entry
        state = np.stack([(e.scored[idx] * (1 + e.loss[idx])) for e in evals], axis=1).astype(np.uint8)
        return _pattern_bootstrap(state, rounds, rng)
    done = 0
    for w in bootstrap_weights(subset, rounds, rng, chunk=50):
        for j, e in enumerate(evals):
            out[done:done + len(w), j] = e.score(w)
        done += len(w)
    return out


MAX_PATTERNS = 20_000


def _pattern_bootstrap(state: np.ndarray, rounds: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap of 0/1 losses, exact and fast: resampling m images with replacement draws each distinct
    pattern of states (one per entry) a Multinomial(m, pattern frequencies) number of times, so the counts of
    the few distinct patterns are drawn instead of m indices per round. Falls back to drawing indices when
    almost every image has a pattern of its own (many entries)."""
    m, r = state.shape
    if m == 0:
        return np.full((rounds, r), np.nan)
    if r <= 39:
        key = state.astype(np.int64) @ (3 ** np.arange(r, dtype=np.int64))
        _, first, counts = np.unique(key, return_index=True, return_counts=True)
        patterns = state[first]
    else:
        patterns, counts = np.unique(state, axis=0, return_counts=True)
    num_w = (patterns == 2).astype(np.float64)  # wrong and scored
    den_w = (patterns > 0).astype(np.float64)  # scored
    if len(patterns) <= MAX_PATTERNS:
        draws = rng.multinomial(m, counts / m, size=rounds).astype(np.float64)
    else:
        draws = np.empty((rounds, len(patterns)))
        inverse = np.repeat(np.arange(len(patterns)), counts)
        for a in range(0, rounds, 50):
            b = min(rounds, a + 50)
            pick = inverse[rng.integers(0, m, size=(b - a, m))] + (np.arange(b - a) * len(patterns))[:, None]
            draws[a:b] = np.bincount(pick.ravel(), minlength=(b - a) * len(patterns)).reshape(b - a, -1)
    den = draws @ den_w
    return np.where(den > 0, (draws @ num_w) / np.where(den > 0, den, 1), np.nan)


def interval(values: np.ndarray, confidence: float = 0.999) -> tuple[float, float]:
    a = (1 - confidence) / 2
    v = values[np.isfinite(values)]
    if not len(v):
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [a, 1 - a])
    return float(lo), float(hi)


def significantly_better(better: np.ndarray, worse: np.ndarray, lower_is_better: bool,
                         confidence: float = 0.999) -> bool:
    """Paired bootstrap: the `confidence` interval of (worse - better) on the same resamples excludes zero."""
    d = (worse - better) if lower_is_better else (better - worse)
    lo, _ = interval(d, confidence)
    return bool(lo > 0)


# ------------------------------------------------------------------------------------------------ the Ladder
def ladder_step(new: Evaluation, best: Evaluation | None, subset: np.ndarray, best_score: float | None,
                rounds: int = 200, seed: int = 0) -> bool:
    """Parameter-free Ladder (Blum & Hardt, ICML 2015, Algorithm 2): does `new` move the team's public score?

    Only when it beats the best so far by more than one standard error of the paired per-image loss difference
    on the public images (a one-sided paired test: std(l_new - l_best) / sqrt(n)). For mean AP, which has no
    per-image loss, the standard error of the paired difference comes from a bootstrap over the public images.
    """
    if best is None or best_score is None:
        return True
    lower = LOWER_IS_BETTER[new.task]
    new_score = new.score(subset)
    if new.task != "det":
        mask = subset & new.scored & best.scored
        d = new.loss[mask].astype(np.float64) - best.loss[mask].astype(np.float64)
        n = int(mask.sum())
        se = float(np.std(d, ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    else:
        b = bootstrap([new, best], subset, rounds, seed)
        se = float(np.nanstd(b[:, 0] - b[:, 1], ddof=1))
    return bool(new_score < best_score - se) if lower else bool(new_score > best_score + se)
