"""Task kinds: what a labeling config shows and how its answers map back to per-image votes.

A kind bundles the config file, the task data built from one request, and the parser of an annotation's
`result` list. provision/push/pull only talk to kinds, so the boxes stage adds draw/quality/coverage
kinds without touching them.

    >>> VERIFY.parse([{"from_name": "answer", "type": "choices", "value": {"choices": ["yes"]}}], {})
    [(None, 'yes')]
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


# The push log and the task table (crowd.push writes them; pull and status read them).
REQUEST_COLUMNS = ["request_id", "project_id", "image_id", "wnid", "kind", "is_gold", "gold_answer", "overlap",
                   "requested_at", "task_key"]
TASK_COLUMNS = ["task_id", "project_id", "request_id", "image_id", "wnid", "kind", "is_gold", "gold_answer",
                "pushed_at"]
TASK_KEY = ["task_id", "image_id"]  # a grid task has one row per image


def request_id(kind: str, project_id: int, image_id: str, wnid: str, k: int) -> str:
    """The k-th request of (kind, project, image, wnid): a stable id, so a resumed push logs the same requests."""
    return hashlib.sha256(f"{kind}|{project_id}|{image_id}|{wnid}|{k}".encode()).hexdigest()[:32]


class BadAnnotation(ValueError):
    """An annotation whose result does not have the shape the kind expects (it is quarantined)."""


def load_config(name: str) -> str:
    path = CONFIG_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"labeling config {path} does not exist; known: {sorted(p.name for p in CONFIG_DIR.glob('*.xml'))}")
    return path.read_text()


@dataclass(frozen=True)
class TaskKind:
    """name: the `kind` column; config: file in crowd/configs; build: request row + context -> task data;
    parse: (result, task data) -> [(image_id or None for the task's own image, answer)]."""

    name: str
    config_file: str
    build: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
    parse: Callable[[list[dict[str, Any]], dict[str, Any]], list[tuple[str | None, str]]]
    answers: tuple[str, ...] = ("yes", "no")
    description: str = ""
    # answer -> the `result` list a person's click produces (simulated annotators submit it); for a kind
    # with `items`, the answer is a dict image_id -> answer
    render: Callable[[Any, dict[str, Any]], list[dict[str, Any]]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Multi-image kinds (grid): task data -> [(request_id, image_id)] of the images the task asks about, and
    # the grouping of a push's per-image requests into tasks (see `group_grid`). None for one-image kinds.
    items: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None
    group: Callable[..., Any] | None = None

    @property
    def label_config(self) -> str:
        return load_config(self.config_file)


def choices_answer(result: list[dict[str, Any]], from_name: str, allowed: tuple[str, ...]) -> str:
    """The single choice of control `from_name`; BadAnnotation for anything else."""
    if not isinstance(result, list):
        raise BadAnnotation(f"result is {type(result).__name__}, expected a list")
    picked = [r for r in result if isinstance(r, dict) and r.get("from_name") == from_name]
    if not picked:
        raise BadAnnotation(f"no '{from_name}' choice in the result")
    if len(picked) > 1:
        raise BadAnnotation(f"{len(picked)} '{from_name}' results, expected one")
    value = picked[0].get("value")
    choices = value.get("choices") if isinstance(value, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], str):
        raise BadAnnotation(f"'{from_name}' choices {choices!r}: expected exactly one")
    answer = choices[0].strip().lower()
    if answer not in allowed:
        raise BadAnnotation(f"answer {choices[0]!r} is not one of {list(allowed)}")
    return answer


def _examples_html(urls: list[str]) -> str:
    imgs = "".join(
        f'<img src="{html.escape(u, quote=True)}" style="height:96px;margin:2px" alt="accepted example"/>' for u in urls
    )
    return f"<div>{imgs}</div>" if imgs else "<div><i>none yet</i></div>"


def _verify_build(req: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    syn = ctx["synsets"].get(req["wnid"])
    if syn is None:
        raise KeyError(req["wnid"])
    return {
        "image": ctx["image_url"](req["image_id"]),
        "lemmas": ", ".join(syn["lemmas"]),
        "gloss": syn["gloss"],
        "examples_html": _examples_html(ctx.get("examples", {}).get(req["wnid"], [])),
    }


def _verify_parse(result: list[dict[str, Any]], data: dict[str, Any]) -> list[tuple[str | None, str]]:
    return [(None, choices_answer(result, "answer", ("yes", "no")))]


def choices_result(answer: str, from_name: str = "answer", to_name: str = "image") -> list[dict[str, Any]]:
    return [{"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": [answer]}}]


VERIFY = TaskKind(
    name="verify", config_file="verify.xml", build=_verify_build, parse=_verify_parse,
    render=lambda answer, data: choices_result(answer),
    description="one image: does it show the synset? yes / no",
    # the instructions (`instructions_html`, set by `crowd.cli.ensure_instructions`) open before labeling starts
    extra={"project": {"show_instruction": True}},
)

KINDS: dict[str, TaskKind] = {VERIFY.name: VERIFY}


def register_kind(kind: TaskKind) -> TaskKind:
    """Add a kind (the boxes stage registers draw/quality/coverage)."""
    KINDS[kind.name] = kind
    return kind


# -- grid: many candidate images of one synset in one task (ImageNet / ImageNetV2 used 48 per HIT) -----------
GRID_MARK = re.compile(r"mark_(\d+)")


def _grid_items(data: dict[str, Any]) -> list[tuple[str, str]]:
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise BadAnnotation("task data has no 'images' list")
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not isinstance(im.get("image_id"), str):
            raise BadAnnotation(f"task data images[{i}] has no image_id")
        out.append((str(im.get("request_id") or ""), im["image_id"]))
    return out


def _grid_build(req: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """req: {"wnid", "items": [{"request_id", "image_id"}, ...]} (one grid); KeyError names an unknown wnid/image."""
    syn = ctx["synsets"].get(req["wnid"])
    if syn is None:
        raise KeyError(req["wnid"])
    images = [{"image": ctx["image_url"](it["image_id"]), "image_id": it["image_id"], "request_id": it["request_id"]}
              for it in req["items"]]
    return {"images": images, "lemmas": ", ".join(syn["lemmas"]), "gloss": syn["gloss"], "n_images": len(images)}


def _grid_parse(result: list[dict[str, Any]], data: dict[str, Any]) -> list[tuple[str | None, str]]:
    """One (image_id, yes|no) per image of the grid: yes for each ticked `mark_<i>`, no for the rest.

    >>> data = {"images": [{"image_id": "a"}, {"image_id": "b"}]}
    >>> _grid_parse([{"from_name": "mark_1", "to_name": "img_1", "type": "choices", "value": {"choices": ["yes"]}}], data)
    [('a', 'no'), ('b', 'yes')]
    """
    ids = [image_id for _, image_id in _grid_items(data)]
    if not isinstance(result, list):
        raise BadAnnotation(f"result is {type(result).__name__}, expected a list")
    marked: set[int] = set()
    for r in result:
        name = r.get("from_name") if isinstance(r, dict) else None
        m = GRID_MARK.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            raise BadAnnotation(f"unexpected control {name!r} in a grid result (expected mark_<index>)")
        idx = int(m.group(1))
        if idx >= len(ids):
            raise BadAnnotation(f"{name} points past the grid's {len(ids)} images")
        if r.get("to_name") != f"img_{idx}":
            raise BadAnnotation(f"{name} is attached to {r.get('to_name')!r}, expected img_{idx}")
        value = r.get("value")
        choices = value.get("choices") if isinstance(value, dict) else None
        if choices == []:
            continue  # ticked then unticked: the front end may keep an empty choice
        if choices != ["yes"]:
            raise BadAnnotation(f"{name} choices {choices!r}: expected ['yes']")
        if idx in marked:
            raise BadAnnotation(f"{name} appears twice in the result")
        marked.add(idx)
    return [(image_id, "yes" if i in marked else "no") for i, image_id in enumerate(ids)]


def _grid_render(answers: dict[str, str], data: dict[str, Any]) -> list[dict[str, Any]]:
    """The result a worker's ticks produce: one `mark_<i>` choice per image answered yes."""
    return [{"from_name": f"mark_{i}", "to_name": f"img_{i}", "type": "choices", "value": {"choices": ["yes"]}}
            for i, (_, image_id) in enumerate(_grid_items(data)) if answers.get(image_id) == "yes"]


def _order(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def group_grid(new: Any, *, gold: Any, history: Any, project_id: int, size: int = 48, positives: int = 3,
               negatives: int = 3, kind: str = "grid") -> Any:
    """Group a push's per-image requests into grids of one synset each (pure).

    Each grid holds up to `size` images: the candidates of one wnid, split into even chunks, plus up to
    `positives` known positives and `negatives` known negatives of that wnid from `gold` (least-used first)
    as controls. Every row gets `task_key` (the grid's request id: a hash of its item request ids); control
    rows are new requests of their own (is_gold, gold_answer), numbered after the pair's earlier requests.

        >>> import pandas as pd
        >>> new = pd.DataFrame([{"request_id": f"r{i}", "project_id": 1, "image_id": f"i{i}", "wnid": "n00000001",
        ...                      "kind": "grid", "is_gold": False, "gold_answer": None, "overlap": 3,
        ...                      "requested_at": None, "task_key": None} for i in range(10)])
        >>> gold = pd.DataFrame({"image_id": ["p", "q"], "wnid": "n00000001", "answer": ["yes", "no"]})
        >>> out = group_grid(new, gold=gold, history=pd.DataFrame(columns=REQUEST_COLUMNS), project_id=1, size=7)
        >>> out.groupby("task_key").size().tolist(), int(out["is_gold"].sum())
        ([7, 7], 4)
    """
    import math

    import pandas as pd

    if new.empty:
        return new.assign(task_key=pd.Series(dtype=object))
    if size < 2:
        raise ValueError(f"grid size {size} is too small: use at least 2 images per grid")
    hist = history[(history["project_id"] == project_id) & (history["kind"] == kind)] if len(history) else history
    used = hist.groupby(["image_id", "wnid"]).size().to_dict() if len(hist) else {}
    now = new["requested_at"].iloc[0]
    rows: list[dict[str, Any]] = []
    for wnid, cand in new.sort_values("request_id").groupby("wnid", sort=True):
        controls: dict[str, list[tuple[str, str]]] = {"yes": [], "no": []}
        if gold is not None and len(gold):
            g = gold[gold["wnid"] == wnid]
            for ans in ("yes", "no"):
                controls[ans] = [(i, ans) for i in g.loc[g["answer"].astype(str).str.lower() == ans, "image_id"]]
        n_ctrl = min(positives, len(controls["yes"])) + min(negatives, len(controls["no"]))
        per_grid = max(1, size - n_ctrl)
        n_grids = math.ceil(len(cand) / per_grid)
        recs = cand.to_dict("records")
        for k in range(n_grids):
            chunk = recs[k * len(recs) // n_grids:(k + 1) * len(recs) // n_grids]
            overlap = max(int(r["overlap"]) for r in chunk)
            picked = []
            for ans, want in (("yes", positives), ("no", negatives)):
                # Least-used controls first, ties in a fixed hashed order, so pushes are reproducible.
                pool = sorted(controls[ans], key=lambda c: (used.get((c[0], wnid), 0), _order(c[0], wnid)))
                picked += pool[:want]
            items = [dict(r) for r in chunk]
            for image_id, ans in picked:
                n = used.get((image_id, wnid), 0)
                used[(image_id, wnid)] = n + 1
                items.append({"request_id": request_id(kind, project_id, image_id, wnid, n), "project_id": project_id,
                              "image_id": image_id, "wnid": wnid, "kind": kind, "is_gold": True, "gold_answer": ans,
                              "overlap": overlap, "requested_at": now})
            key = _order(kind, project_id, wnid, *sorted(it["request_id"] for it in items))[:32]
            for it in items:
                it["overlap"] = overlap
                it["task_key"] = key
            # Controls sit among the candidates in a fixed shuffled order (hash of request id).
            rows += sorted(items, key=lambda it: _order(it["request_id"]))
    return pd.DataFrame(rows, columns=REQUEST_COLUMNS)


GRID = TaskKind(
    name="grid", config_file="grid.xml", build=_grid_build, parse=_grid_parse, render=_grid_render,
    description="a grid of candidate images of one synset: tick every image that shows it",
    # A grid where no image shows the synset is a valid answer: the worker submits it with nothing ticked.
    extra={"project": {"enable_empty_annotation": True, "show_instruction": True}},
    items=_grid_items, group=group_grid,
)
register_kind(GRID)


# -- instructions: what annotators read before labeling (Label Studio's project `expert_instruction`) ---------
COUNTS_AS_YES = (
    "a photograph in which the thing itself can be seen, even when it is small, partly hidden, cut off at the edge "
    "or among other things",
)
COUNTS_AS_NO = (
    "something else, even when it looks alike or usually goes with it",
    "drawings, paintings, cartoons, logos, toys, models and words naming the thing",
    "a photo so dark, blurred or small that you cannot tell",
)
KEYS = {
    "verify": [("1", "yes"), ("2", "no"), ("Ctrl+Enter", "submit the answer and get the next photo")],
    "grid": [("click", "the <i>yes</i> box under every photo that shows it"),
             ("1 ... 9, 0", "tick or untick the first ten photos' boxes (the numbers beside each <i>yes</i>)"),
             ("Ctrl+Enter", "submit the grid (unticked photos count as no)")],
}


def instructions_html(kind: str, synsets: list[dict[str, Any]], examples: dict[str, list[str]] | None = None,
                      max_classes: int = 100) -> str:
    """The project's instructions, built from its synsets: what to do, what counts as yes and as no, the keys, and
    per class its name, WordNet definition and up to three accepted examples. Label Studio shows them before
    labeling starts (`show_instruction`) and behind the labeling stream's instructions button. HTML, escaped.

        >>> page = instructions_html("verify", [{"wnid": "n02123045", "lemmas": ["tabby", "tabby cat"],
        ...                                      "gloss": "a cat with a grey or tawny coat"}])
        >>> "tabby, tabby cat" in page and "a cat with a grey or tawny coat" in page and "<kbd>1</kbd>" in page
        True
    """
    esc = html.escape
    examples = examples or {}
    what = ("Each task shows one photo and one class: answer <b>yes</b> if the photo shows the class, <b>no</b> if "
            "it does not." if kind != "grid" else
            "Each task shows a grid of photos and one class: tick <b>yes</b> under every photo that shows the class "
            "and leave the others unticked.")
    # Label Studio keeps only its safe tags and attributes (bleach; no style attribute), and its modal shows no
    # list bullets: the markup below is what it stores unchanged, so `ensure_instructions` sees no difference
    ul = "<ul>"
    out = [f"<h3>What to do</h3><p>{what} Judge by the definition, not only by the name. Not sure? Use "
           "<b>Skip</b>: a skipped task is no answer, and nobody is asked to guess.</p>",
           "<h4>Counts as yes</h4>" + ul + "".join(f"<li>&#8226; {esc(r)}</li>" for r in COUNTS_AS_YES) + "</ul>",
           "<h4>Counts as no</h4>" + ul + "".join(f"<li>&#8226; {esc(r)}</li>" for r in COUNTS_AS_NO) + "</ul>",
           "<h4>Keys</h4>" + ul + "".join(f"<li><kbd>{k}</kbd> {v}</li>" for k, v in KEYS.get(kind, KEYS["verify"]))
           + "</ul>",
           "<p>Some tasks are checks whose answer is already known; answer them like any other.</p>"]
    rows = sorted(synsets, key=lambda r: str(r["wnid"]))
    out.append(f"<h3>The classes ({len(rows)})</h3><dl>")
    for r in rows[:max_classes]:
        lemmas = r.get("lemmas")
        names = ", ".join(str(x) for x in lemmas) if isinstance(lemmas, list | tuple) or hasattr(lemmas, "tolist") \
            else str(lemmas or r["wnid"])
        shown = examples.get(r["wnid"], [])[:3]
        pics = " ".join(f'<img src="{esc(u, quote=True)}" alt="accepted example" height="72"/>' for u in shown)
        out.append(f"<dt><b>{esc(names)}</b> <small>({esc(str(r['wnid']))})</small></dt>"
                   f"<dd>{esc(str(r.get('gloss') or ''))}"
                   + (f"<br/>accepted examples: {pics}" if pics else "") + "</dd>")
    out.append("</dl>")
    if len(rows) > max_classes:
        out.append(f"<p>... and {len(rows) - max_classes} more: every task shows its own class's definition.</p>")
    return "\n".join(out)
