"""The analysis of a closed phase (Russakovsky et al., IJCV 2015, sec. 6.3): per-class accuracy of the top
entries against object properties of the class.

Per class, over its test images: accuracy of each of the top entries of the private board (1 - top-5 error for
cls and loc, AP for det), their mean and the "optimistic" accuracy (an image counts as right when any top entry
got it right; cls and loc); object scale (mean over the class's boxes of box area / image area); instances per
image (mean number of boxes of the class on an image of it that has boxes); chance performance of
localization, CPL: the share of ordered pairs (i, j), i != j, of the class's boxes whose boxes in normalised
image coordinates overlap with IoU >= 0.5 (a class whose objects sit in the same place in every picture is easy
to localise by chance). Pearson and Spearman correlations of per-class accuracy with scale, instances and CPL.
Everything is an aggregate per class, and it is shown only after the phase closes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from challenge.truth import HeldOut

MAX_CPL_BOXES = 2000  # a class with more boxes gets CPL from a seeded sample of this many


def cpl(boxes: np.ndarray) -> float:
    """Chance performance of localization of one class: boxes (N, 4) in normalised coordinates."""
    n = len(boxes)
    if n < 2:
        return float("nan")
    b = boxes[:, None, :]
    c = boxes[None, :, :]
    iw = np.clip(np.minimum(b[..., 2], c[..., 2]) - np.maximum(b[..., 0], c[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], c[..., 3]) - np.maximum(b[..., 1], c[..., 1]), 0, None)
    inter = iw * ih
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area[:, None] + area[None, :] - inter
    ok = (union > 0) & (inter >= 0.5 * union)
    np.fill_diagonal(ok, False)
    return float(ok.sum() / (n * (n - 1)))


def class_properties(held: HeldOut, seed: int = 0) -> pd.DataFrame:
    """Per class: wnid, images, boxed images, boxes, scale, instances per image, CPL."""
    k = held.n_classes
    out = pd.DataFrame({"cls": np.arange(1, k + 1), "wnid": held.wnids,
                        "images": np.bincount(held.truth, minlength=k + 1)[1:]})
    b = held.boxes
    if not len(b):
        for c in ("boxed_images", "boxes"):
            out[c] = 0
        for c in ("scale", "instances", "cpl"):
            out[c] = np.nan
        return out
    w, h = held.widths[b.image.to_numpy()], held.heights[b.image.to_numpy()]
    norm = np.c_[b.x_min / w, b.y_min / h, b.x_max / w, b.y_max / h]
    area = (norm[:, 2] - norm[:, 0]) * (norm[:, 3] - norm[:, 1])
    frame = pd.DataFrame({"cls": b.cls.to_numpy(), "image": b.image.to_numpy(), "area": area})
    per = frame.groupby("cls").agg(boxes=("area", "size"), scale=("area", "mean"), boxed_images=("image", "nunique"))
    per["instances"] = per.boxes / per.boxed_images
    rng = np.random.default_rng(seed)
    cpls = {}
    for c, idx in frame.groupby("cls").indices.items():
        if len(idx) > MAX_CPL_BOXES:
            idx = rng.choice(idx, MAX_CPL_BOXES, replace=False)
        cpls[c] = cpl(norm[idx])
    per["cpl"] = pd.Series(cpls)
    out = out.merge(per.reset_index(), on="cls", how="left")
    out[["boxes", "boxed_images"]] = out[["boxes", "boxed_images"]].fillna(0).astype(int)
    return out


def per_class_accuracy(evals: list[Any], held: HeldOut) -> np.ndarray:
    """(classes, entries) accuracy of each entry on each class's test images."""
    k = held.n_classes
    acc = np.full((k, len(evals)), np.nan)
    for j, e in enumerate(evals):
        if e.task == "det":
            per = e.headline.get("per_class", {})
            for ci, w in enumerate(held.wnids):
                if w in per:
                    acc[ci, j] = per[w]["ap"]
            continue
        for ci in range(k):
            m = (held.truth == ci + 1) & e.scored
            if m.any():
                acc[ci, j] = 1 - e.loss[m].mean()
    return acc


def _corr(x: np.ndarray, y: np.ndarray) -> dict[str, float | int]:
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "classes": int(ok.sum())}
    return {"pearson": float(stats.pearsonr(x[ok], y[ok])[0]), "spearman": float(stats.spearmanr(x[ok], y[ok])[0]),
            "classes": int(ok.sum())}


@dataclass
class Analysis:
    classes: pd.DataFrame  # class_properties + accuracy columns
    entries: list[str]
    correlations: dict[str, dict[str, float | int]]
    plots: dict[str, str]  # name -> SVG


def analyse(held: HeldOut, entries: list[tuple[str, Any]], *, plots: bool = True) -> Analysis:
    """`entries`: (team name, Evaluation) of the top entries, best first."""
    props = class_properties(held)
    evals = [e for _, e in entries]
    acc = per_class_accuracy(evals, held)
    for j, (name, _) in enumerate(entries):
        props[f"acc:{name}"] = acc[:, j]
    with warnings.catch_warnings():  # a class no entry was scored on: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        props["accuracy"] = np.nanmean(acc, axis=1) if len(evals) else np.nan
    if evals and all(e.task != "det" for e in evals):
        right = np.zeros(held.n, dtype=bool)
        for e in evals:
            right |= e.scored & (e.loss == 0)
        scored = np.any([e.scored for e in evals], axis=0)
        props["optimistic"] = [float(right[(held.truth == c) & scored].mean()) if ((held.truth == c) & scored).any()
                               else np.nan for c in props.cls]
    a = props.accuracy.to_numpy(dtype=np.float64)
    corr = {p: _corr(props[p].to_numpy(dtype=np.float64), a) for p in ("scale", "instances", "cpl")}
    return Analysis(props, [n for n, _ in entries], corr, render_plots(props, corr) if plots else {})


def render_plots(props: pd.DataFrame, corr: dict[str, dict[str, Any]]) -> dict[str, str]:
    """SVG scatter plots of per-class accuracy against scale, instances per image and CPL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    titles = {"scale": "object scale (box area / image area)", "instances": "instances per image",
              "cpl": "chance performance of localization (CPL)"}
    with matplotlib.rc_context({"svg.hashsalt": "synsetforge", "svg.fonttype": "none", "font.size": 9}):
        for p, label in titles.items():
            fig, ax = plt.subplots(figsize=(4.2, 3.2))
            x, y = props[p].to_numpy(dtype=np.float64), props.accuracy.to_numpy(dtype=np.float64)
            ok = np.isfinite(x) & np.isfinite(y)
            ax.scatter(x[ok], y[ok], s=14, color="#3465a4")
            c = corr[p]
            ax.set_xlabel(label)
            ax.set_ylabel("per-class accuracy of the top entries")
            ax.set_title(f"Pearson r = {c['pearson']:.2f}, {c['classes']} classes" if np.isfinite(c["pearson"])
                         else f"{c['classes']} classes with boxes")
            if p == "scale" and ok.any() and (x[ok] > 0).all():
                ax.set_xscale("log")
            ax.set_ylim(-0.02, 1.02)
            fig.tight_layout()
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata={"Date": None})
            plt.close(fig)
            svg = buf.getvalue()
            out[p] = svg[svg.index("<svg"):]
    return out


def analysis_for(svc: Any, slug: str, phase: str | None = None, top: int = 5, *, plots: bool = True,
                 now: Any = None) -> Analysis:
    """The analysis of a closed phase's private board (its top `top` ranked entries, baselines left out)."""
    from challenge.boards import build_board
    from challenge.db import Submission, read_session

    board = build_board(svc, slug, "private", phase, now=now)
    ch = svc.challenge(slug)
    held = svc.held_out(ch.release)
    rows = [r for r in board.rows if not r.baseline][:top]
    with read_session(svc.engine) as s:
        subs = {x.id: x for x in s.query(Submission).filter(Submission.id.in_([r.submission_id for r in rows]))}
    return analyse(held, [(r.team, svc.evaluation(subs[r.submission_id])) for r in rows], plots=plots)


__all__ = ["Analysis", "analyse", "analysis_for", "class_properties", "cpl"]
