"""The report's plots, drawn with matplotlib (Agg backend, no pyplot state) and returned as inline SVG.

Every function returns an `Plot` (SVG text + how many data marks it drew) or None when there is nothing to
draw; the report then says so in words instead of showing an empty plot. Each data mark (a bar, a bar
segment) carries the SVG id `<plot id>-mark-<k>`, and every id in a plot's SVG is prefixed with the plot's
id, so several plots can be inlined into one page without id clashes. Output is deterministic for the
same data (fixed hash salt, no date), so a report written twice has the same bytes.

    >>> p = bar_plot("demo", ["train", "val", "test"], [5, 2, 1], title="images per split")
    >>> p.svg.startswith("<svg") and p.marks == 3 and 'id="demo-mark-0"' in p.svg
    True
    >>> bar_plot("empty", ["a"], [0], title="nothing") is None
    True
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # headless: never a GUI backend, whatever the environment says

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLOURS = {"train": "#4a78b5", "val": "#e0883a", "test": "#5a9e6f"}
BAR = "#4a78b5"
MAX_LABELLED_CLASSES = 40  # more classes: a histogram of class sizes instead of one bar per class
_RC = {"svg.hashsalt": "synsetforge", "svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
       "axes.spines.right": False, "font.family": "sans-serif"}


@dataclass
class Plot:
    id: str
    svg: str
    marks: int  # data marks drawn (bars or bar segments of nonzero size)
    title: str


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


_ID = re.compile(r'\bid="([^"]+)"')
_URL = re.compile(r"url\(#([^)]+)\)")
_HREF = re.compile(r'href="#([^"]+)"')


def _svg(fig: Figure, plot_id: str, title: str) -> str:
    """The figure as an inline <svg> element: no XML prolog, ids prefixed with plot_id, a title for
    screen readers."""
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF boilerplate, external namespaces
    text = _ID.sub(lambda m: f'id="{plot_id}-{m.group(1)}"', text)
    text = _URL.sub(lambda m: f"url(#{plot_id}-{m.group(1)})", text)
    text = _HREF.sub(lambda m: f'href="#{plot_id}-{m.group(1)}"', text)
    esc = title.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
    return text.replace("<svg ", f'<svg class="plot" role="img" aria-label="{esc}" ', 1)


def _mark(patches: Sequence, plot_id: str, start: int) -> int:
    """Give every patch of nonzero size the id <plot_id>-mark-<k> (k from start); return how many."""
    k = start
    for patch in patches:
        if patch.get_width() > 0 and patch.get_height() > 0:
            patch.set_gid(f"mark-{k}")
            k += 1
    return k - start


def _finish(fig: Figure, plot_id: str, title: str, marks: int) -> Plot:
    return Plot(plot_id, _svg(fig, plot_id, title), marks, title)


def bar_plot(plot_id: str, labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str = "images",
             colours: Sequence[str] | None = None) -> Plot | None:
    """Vertical bars, one per label; None when every value is 0 (nothing to draw)."""
    vals = np.asarray(values, dtype=np.float64)
    if not len(vals) or not np.nansum(vals) > 0:
        return None
    with matplotlib.rc_context(_RC):
        fig = _figure(4.2, 2.6)
        ax = fig.add_subplot()
        bars = ax.bar(list(labels), vals, color=list(colours) if colours else BAR)
        ax.bar_label(bars, labels=[f"{v:g}" for v in vals], padding=2)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, vals.max() * 1.15)
        marks = _mark(bars, plot_id, 0)
    return _finish(fig, plot_id, title, marks)


def class_plot(plot_id: str, labels: Sequence[str], counts: dict[str, Sequence[int]], *, title: str) -> Plot | None:
    """Images per class. Up to MAX_LABELLED_CLASSES classes: a horizontal bar per class (labelled with its
    wnid and synset name), stacked by split; more: a histogram of images per class. None without images."""
    splits = list(counts)
    mat = np.array([np.asarray(counts[s], dtype=np.float64) for s in splits]).reshape(len(splits), -1)
    totals = mat.sum(axis=0)
    if not len(totals) or not totals.sum() > 0:
        return None
    if len(totals) > MAX_LABELLED_CLASSES:
        return histogram_plot(plot_id, totals, title=f"{title}: classes by number of images", xlabel="images in the class",
                              integer_bins=True)
    with matplotlib.rc_context(_RC):
        fig = _figure(7.6, 0.9 + 0.26 * len(totals))
        ax = fig.add_subplot()
        y = np.arange(len(totals))
        left = np.zeros(len(totals))
        marks = 0
        for s, row in zip(splits, mat, strict=True):
            bars = ax.barh(y, row, left=left, color=COLOURS.get(s, BAR), label=s, height=0.7)
            marks += _mark(bars, plot_id, marks)
            left += row
        ax.set_yticks(y, list(labels))
        ax.invert_yaxis()  # first class on top, as in the table below
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("images")
        ax.set_title(title)
        fig.legend(loc="outside upper right", frameon=False, ncols=len(splits))
        ax.set_xlim(0, totals.max() * 1.08)
    return _finish(fig, plot_id, title, marks)


def histogram_plot(plot_id: str, values: Sequence[float], *, title: str, xlabel: str, lo: float | None = None,
                   hi: float | None = None, bins: int = 20, colour: str = BAR, integer_bins: bool = False
                   ) -> Plot | None:
    """A histogram of the finite `values` over [lo, hi] (default: their range); None when there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    lo = float(v.min()) if lo is None else min(lo, float(v.min()))
    hi = float(v.max()) if hi is None else max(hi, float(v.max()))
    if integer_bins:
        width = max(1, int(np.ceil((hi - lo + 1) / bins)))
        edges = np.arange(np.floor(lo), hi + width + 1, width) - 0.5
    else:
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
    with matplotlib.rc_context(_RC):
        fig = _figure(5.2, 2.6)
        ax = fig.add_subplot()
        _, _, patches = ax.hist(v, bins=edges, color=colour, edgecolor="white", linewidth=0.5)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        marks = _mark(patches, plot_id, 0)
    return _finish(fig, plot_id, title, marks)
