"""DET presence annotation: which of the DET classes appear in each whole image, asked as a tree of yes/no questions.

ILSVRC's detection set has every image annotated for the presence or absence of every one of its 200 classes.
Asking each class of each image costs O(images x classes); Deng et al. (CHI 2014, "Scalable multi-label
annotation") used three facts instead: labels are sparse (ILSVRC-2014 DET val: 2.8 objects per image), correlated
(keyboard, mouse, monitor) and hierarchical (a "no" to "is there an animal?" clears every animal). This module is
the pure core of that loop:

- `build_question_tree`: the DET vocabulary's question tree from the `synset_edges` table (WordNet ancestors that
  split the classes become question nodes) plus hand-set groups, as the `det_questions` table;
- `QuestionTree` + `ImageState`: what is known of one image; a "yes" makes every ancestor "yes", a "no" makes
  every descendant "no";
- `Cooccurrence`: P(node present | what is known) from images already fully annotated (sparsity and correlation);
- `next_question`: the question with the most expected labels resolved per second of human time. A likely class
  may be asked before its parent (a "yes" answers the parent too); an unlikely subtree is cleared by one "no".

    >>> edges = pd.DataFrame({"child_wnid": ["c1", "c2", "c3", "a", "b"], "parent_wnid": ["a", "a", "b", "r", "r"]})
    >>> t = QuestionTree.from_table(build_question_tree(["c1", "c2", "c3"], edges, max_share=0.9))
    >>> sorted(t.ids), t.parent_of("c1"), t.parent_of("c3")
    (['a', 'c1', 'c2', 'c3'], 'a', None)
    >>> s = ImageState(t); s.answer(t.index["a"], False); s.known_classes()
    {'c1': False, 'c2': False}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import UserError

UNKNOWN, NO, YES = -1, 0, 1


class QuestionTreeError(UserError):
    """The DET vocabulary or its groups are inconsistent; the message names the nodes."""


# ------------------------------------------------------------------------------------------ the question tree
def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def question_for(name: str, is_class: bool) -> str:
    """The question asked about the whole image (Deng et al.: 'is there an animal?' before each animal)."""
    if is_class:
        return f"Is there {_article(name)} {name} in the image?"
    return f"Is there any kind of {name} in the image?"


def build_question_tree(
    classes: Sequence[str],
    edges: pd.DataFrame,
    names: Mapping[str, str] | None = None,
    *,
    groups: Sequence[Mapping[str, Any]] = (),
    max_share: float = 0.5,
) -> pd.DataFrame:
    """The `det_questions` table for `classes` (wnids) from is-a `edges` (child_wnid, parent_wnid) and groups.

    An ancestor becomes a question when at least two of its child branches hold classes (a node on a chain would
    ask the same thing twice) and it covers at most `max_share` of all classes ("is there an entity?" tells
    nothing). Each class and question hangs under its nearest kept ancestor. Where WordNet has several parents, the
    one covering the most classes is followed (then the smallest wnid), so the tree is deterministic.
    `groups`: hand-set question nodes, as ILSVRC's DET hierarchy had (Appendix D), each a mapping with `id`,
    `name`, optional `question`, `members` (class wnids, other groups' ids or kept WordNet nodes) and optional
    `parent` (a kept node or group id); a member's parent becomes the group.
    """
    names = dict(names or {})
    classes = list(dict.fromkeys(classes))
    if not classes:
        raise QuestionTreeError("no DET classes given: select the classes first (synsetforge vocab --det ...)")
    parents_of: dict[str, list[str]] = {}
    for child, parent in zip(edges["child_wnid"], edges["parent_wnid"], strict=True):
        parents_of.setdefault(child, []).append(parent)
    class_set = set(classes)
    # Classes below each node, through every parent (coverage picks the parent to follow).
    below: dict[str, set[str]] = {}
    for c in classes:
        stack, seen = [c], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            below.setdefault(n, set()).add(c)
            stack.extend(parents_of.get(n, []))
    overlap = sorted(c for c in classes if len(below.get(c, ())) > 1)
    if overlap:
        raise QuestionTreeError(f"DET classes must not be ancestors of each other: {overlap[:5]} lie above other "
                                "classes; select leaves (synsetforge vocab --leaves-only)")

    def main_parent(n: str) -> str | None:
        ps = parents_of.get(n, [])
        return min(ps, key=lambda p: (-len(below.get(p, ())), p)) if ps else None

    path: dict[str, list[str]] = {}  # class -> its ancestors along the main parents, nearest first
    for c in classes:
        chain, n = [], main_parent(c)
        while n is not None and n not in chain:
            chain.append(n)
            n = main_parent(n)
        path[c] = chain
    branches: dict[str, set[str]] = {}
    for c, chain in path.items():
        prev = c
        for a in chain:
            branches.setdefault(a, set()).add(prev)
            prev = a
    covered = {a: {c for c in classes if a in path[c]} for a in branches}
    limit = max_share * len(classes)
    kept = {a for a, b in branches.items() if len(b) >= 2 and len(covered[a]) <= limit and a not in class_set}
    parent: dict[str, str | None] = {}
    for n in [*classes, *kept]:
        chain = path[n] if n in path else _chain(n, main_parent)
        parent[n] = next((a for a in chain if a in kept), None)
    source = {n: "class" for n in classes} | {n: "wordnet" for n in kept}
    for g in groups:
        gid = f"group:{g['id']}"
        if gid in parent:
            raise QuestionTreeError(f"group {g['id']!r} is defined twice")
        names[gid] = str(g.get("name") or g["id"])
        parent[gid], source[gid] = None, "group"
    for g in groups:
        gid = f"group:{g['id']}"
        for m in g.get("members", []):
            key = m if m in parent and not str(m).startswith("group:") else (f"group:{m}" if f"group:{m}" in parent else m)
            if key not in parent:
                raise QuestionTreeError(f"group {g['id']!r}: member {m!r} is neither a DET class, another group nor "
                                        "a question node WordNet gave; list class wnids or group ids")
            parent[key] = gid
        if g.get("parent"):
            p = g["parent"] if g["parent"] in parent else f"group:{g['parent']}"
            if p not in parent:
                raise QuestionTreeError(f"group {g['id']!r}: parent {g['parent']!r} is not a node of the tree")
            parent[gid] = p
    _check_acyclic(parent)
    # Question nodes left with fewer than two children ask nothing new: fold them into their parent.
    while True:
        kids: dict[str | None, list[str]] = {}
        for n, p in parent.items():
            kids.setdefault(p, []).append(n)
        lone = [n for n in parent if source[n] == "wordnet" and len(kids.get(n, [])) < 2]
        if not lone:
            break
        for n in lone:
            for k in kids.get(n, []):
                parent[k] = parent[n]
            del parent[n]
    depth: dict[str, int] = {}

    def depth_of(n: str) -> int:
        if n not in depth:
            p = parent[n]
            depth[n] = 0 if p is None else 1 + depth_of(p)
        return depth[n]

    n_classes = dict.fromkeys(parent, 0)
    for c in classes:
        n: str | None = c
        while n is not None:
            n_classes[n] += 1
            n = parent[n]
    rows = []
    for n in sorted(parent, key=lambda x: (depth_of(x), x)):
        is_class = source[n] == "class"
        name = names.get(n) or n
        custom = next((g.get("question") for g in groups if f"group:{g['id']}" == n and g.get("question")), None)
        rows.append({"node_id": n, "parent_id": parent[n], "question": custom or question_for(name, is_class),
                     "name": name, "is_class": is_class, "n_classes": n_classes[n], "depth": depth_of(n),
                     "source": source[n]})
    df = pd.DataFrame(rows)
    return df.astype({"n_classes": "int32", "depth": "int32"})


def _chain(n: str, main_parent: Any) -> list[str]:
    chain, p = [], main_parent(n)
    while p is not None and p not in chain:
        chain.append(p)
        p = main_parent(p)
    return chain


def _check_acyclic(parent: Mapping[str, str | None]) -> None:
    for start in parent:
        seen, n = set(), start
        while n is not None:
            if n in seen:
                raise QuestionTreeError(f"the groups make a cycle through {n!r}; a group cannot contain its own parent")
            seen.add(n)
            n = parent.get(n)


@dataclass
class QuestionTree:
    """The question tree as arrays: node i's parent, children, ancestors and descendants."""

    ids: list[str]
    parent: np.ndarray  # int, -1 for top-level
    is_class: np.ndarray  # bool
    questions: list[str]
    index: dict[str, int] = field(default_factory=dict)
    children: list[list[int]] = field(default_factory=list)
    ancestors: list[list[int]] = field(default_factory=list)  # nearest first
    descendants: list[np.ndarray] = field(default_factory=list)
    anc: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool))
    depth: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def from_table(cls, table: Any) -> QuestionTree:
        df = table.to_pandas() if hasattr(table, "to_pandas") else pd.DataFrame(table)
        ids = df["node_id"].astype(str).tolist()
        index = {n: i for i, n in enumerate(ids)}
        missing = sorted({p for p in df["parent_id"].dropna() if p not in index})
        if missing:
            raise QuestionTreeError(f"det_questions: parent(s) {missing[:5]} are not nodes of the table")
        parent = np.array([index[p] if isinstance(p, str) else -1 for p in df["parent_id"]], dtype=np.int64)
        tree = cls(ids, parent, df["is_class"].to_numpy(bool), df["question"].astype(str).tolist(), index)
        tree.children = [[] for _ in ids]
        for i, p in enumerate(parent):
            if p >= 0:
                tree.children[p].append(i)
        for i in range(len(ids)):
            chain, p = [], parent[i]
            while p >= 0:
                if p in chain or len(chain) > len(ids):
                    raise QuestionTreeError(f"det_questions: a cycle through {ids[i]!r}")
                chain.append(int(p))
                p = parent[p]
            tree.ancestors.append(chain)
        desc: list[list[int]] = [[] for _ in ids]
        for i, chain in enumerate(tree.ancestors):
            for a in chain:
                desc[a].append(i)
        tree.descendants = [np.array(d, dtype=np.int64) for d in desc]
        # Dense forms for the per-image arithmetic (a DET vocabulary has a few hundred nodes).
        n = len(ids)
        tree.anc = np.zeros((n, n), dtype=bool)  # anc[i, a]: a is an ancestor of i
        for i, chain in enumerate(tree.ancestors):
            tree.anc[i, chain] = True
        tree.depth = tree.anc.sum(axis=1)
        return tree

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def classes(self) -> np.ndarray:
        return np.flatnonzero(self.is_class)

    def parent_of(self, node: str) -> str | None:
        p = self.parent[self.index[node]]
        return None if p < 0 else self.ids[p]


# ----------------------------------------------------------------------------------------- one image's state
class ImageState:
    """What is known of one image: UNKNOWN / NO / YES per node, with the tree's implications applied."""

    def __init__(self, tree: QuestionTree):
        self.tree = tree
        self.known = np.full(len(tree), UNKNOWN, dtype=np.int8)

    def answer(self, node: int, yes: bool) -> None:
        if yes:
            self.known[node] = YES
            for a in self.tree.ancestors[node]:
                self.known[a] = YES
        else:
            self.known[node] = NO
            d = self.tree.descendants[node]
            self.known[d[self.known[d] == UNKNOWN]] = NO

    def answer_group(self, parent: int, present: Iterable[int]) -> None:
        """A checklist of `parent`'s children answered at once: the ticked ones are present, the rest absent."""
        ticked = set(present)
        for c in self.tree.children[parent]:
            if self.known[c] == UNKNOWN:
                self.answer(c, c in ticked)

    def done(self) -> bool:
        return bool((self.known[self.tree.is_class] != UNKNOWN).all())

    def askable(self) -> np.ndarray:
        """Unknown nodes under no known-absent ancestor (a known "no" has already cleared its subtree)."""
        return np.flatnonzero(self.known == UNKNOWN)

    def present(self) -> list[int]:
        return [int(i) for i in np.flatnonzero((self.known == YES) & self.tree.is_class)]

    def known_classes(self) -> dict[str, bool]:
        return {self.tree.ids[i]: bool(self.known[i] == YES) for i in self.tree.classes if self.known[i] != UNKNOWN}


# ------------------------------------------------------------------------------------ co-occurrence model
class Cooccurrence:
    """P(node present) from images already fully annotated: how often each node appears (sparsity), and how often
    it appears given each present class (correlation). Additive smoothing towards a prior rate keeps the first
    images from giving 0 or 1."""

    def __init__(self, tree: QuestionTree, prior_rate: float = 0.02, strength: float = 2.0):
        self.tree = tree
        self.prior_rate, self.strength = prior_rate, strength
        n = len(tree)
        self.n_images = 0
        self.count = np.zeros(n)
        self.pair = np.zeros((len(tree.classes), n))  # rows: classes (by position in tree.classes), cols: nodes
        self._row = {int(c): k for k, c in enumerate(tree.classes)}

    def add(self, present_classes: Iterable[int]) -> None:
        """Record one fully annotated image by its present classes."""
        nodes = set()
        for c in present_classes:
            nodes.add(int(c))
            nodes.update(self.tree.ancestors[int(c)])
        idx = np.fromiter(nodes, dtype=np.int64) if nodes else np.zeros(0, np.int64)
        self.n_images += 1
        self.count[idx] += 1
        for c in present_classes:
            self.pair[self._row[int(c)], idx] += 1

    def rate(self) -> np.ndarray:
        """P(node present) with no other knowledge."""
        prior = self.prior_rate * np.maximum(1, self._n_classes())
        prior = np.minimum(prior, 0.5)
        return (self.count + self.strength * prior) / (self.n_images + self.strength)

    def _n_classes(self) -> np.ndarray:
        if not hasattr(self, "_nc"):
            nc = np.zeros(len(self.tree))
            for c in self.tree.classes:
                nc[c] += 1
                for a in self.tree.ancestors[c]:
                    nc[a] += 1
            self._nc = nc
        return self._nc

    def p_present(self, state: ImageState) -> np.ndarray:
        """P(node present | the image's known answers), for every node (1 / 0 where known)."""
        base = self.rate()
        p = base.copy()
        yes_classes = [c for c in state.present()]
        if yes_classes:
            rows = [self._row[c] for c in yes_classes]
            n_c = self.count[yes_classes]
            cond = (self.pair[rows] + self.strength * base) / (n_c[:, None] + self.strength)
            p = np.maximum(p, cond.max(axis=0))
        # Given a present ancestor, a node is that much likelier: P(n | a) = P(n) / P(a), for its nearest present a.
        tree = self.tree
        yes = state.known == YES
        if yes.any():
            score = tree.anc & yes[None, :]
            has = score.any(axis=1) & (state.known == UNKNOWN)
            nearest = np.argmax(np.where(score, tree.depth[None, :] + 1, 0), axis=1)
            lifted = np.minimum(0.99, base / np.maximum(base[nearest], 1e-9))
            p = np.where(has, np.maximum(p, lifted), p)
        p[state.known == YES] = 1.0
        p[state.known == NO] = 0.0
        return np.clip(p, 1e-6, 1 - 1e-6)


# ------------------------------------------------------------------------------------------- the policy
@dataclass(frozen=True)
class QuestionTimes:
    """Human seconds per answer. `question`: one yes/no question about a whole image; `group_base` +
    `group_item` x k: one checklist of k related classes. These are assumptions of the caller (the benchmark
    states its own), not measurements."""

    question: float = 2.0
    group_base: float = 2.0
    group_item: float = 0.8

    def group(self, k: int) -> float:
        return self.group_base + self.group_item * k


def expected_resolved(state: ImageState, p: np.ndarray) -> np.ndarray:
    """Per node: expected number of unknown class labels its answer settles. A "yes" settles the node and its
    unknown ancestors (counted when they are classes: never, in a tree whose classes are leaves) and tells the
    most when the node is a class; a "no" settles every unknown class below it."""
    tree = state.tree
    cls_unknown = (state.known == UNKNOWN) & tree.is_class
    n_below = cls_unknown.astype(np.int64) @ tree.anc + cls_unknown  # unknown classes below each node, and itself
    yes_gain = tree.is_class.astype(float)  # a yes settles a class; for a question node it settles no class yet
    return p * yes_gain + (1 - p) * n_below


def next_question(state: ImageState, model: Cooccurrence, times: QuestionTimes = QuestionTimes()) -> int | None:
    """The askable node with the most expected class labels settled per second, or None when the image is done.

    Every node costs one question; the value counts what its answer settles, plus, for a question node, the
    questions its "no" saves (its whole subtree would otherwise have to be asked)."""
    if state.done():
        return None
    p = model.p_present(state)
    value = expected_resolved(state, p)
    # Askable: unknown, and (for a question node) with an unknown class below it.
    tree = state.tree
    cls_unknown = (state.known == UNKNOWN) & tree.is_class
    open_below = (cls_unknown.astype(np.int64) @ tree.anc) > 0
    ok = (state.known == UNKNOWN) & (tree.is_class | open_below)
    if not ok.any():
        return None
    return int(np.argmax(np.where(ok, value / times.question, -np.inf)))


def decide_presence(p_yes: np.ndarray, n_votes: np.ndarray, model_prior: float, node_prior: np.ndarray | float,
                    *, accept_at: float = 0.99, miss_factor: float = 100.0, max_votes: int = 10
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Status (accepted / rejected / pending) and votes still wanted per (image, node) pair, from QC's posterior.

    Presence is sparse (a few of hundreds of classes per image), so a posterior threshold alone loses objects: with
    a 1 % base rate one "no" already pushes P(present) under 0.01, and rejecting there misses the present objects a
    0.8-accurate worker overlooks first. So the evidence is taken apart from the prior: the Bayes factor
    BF = odds(p_yes) / odds(model_prior) (`model_prior`: the base rate QC's posterior assumed). A pair is rejected
    only when its answers are `miss_factor` times likelier for an absent object (BF <= 1 / miss_factor: recall,
    whatever the base rate), and accepted when the posterior with the node's own base rate (`node_prior`, e.g.
    from `Cooccurrence`) reaches `accept_at` (precision). Undecided pairs get more votes, up to `max_votes`; then
    the more probable answer stands.

        >>> decide_presence(np.array([0.9995, 0.0004, 0.03]), np.array([6, 2, 2]), 0.013, 0.013)[0].tolist()
        ['accepted', 'pending', 'pending']
    """
    p = np.clip(np.asarray(p_yes, dtype=float), 1e-12, 1 - 1e-12)
    n = np.asarray(n_votes)

    def odds(x: Any) -> Any:
        x = np.clip(np.asarray(x, dtype=float), 1e-9, 1 - 1e-9)
        return x / (1 - x)

    bf = odds(p) / odds(model_prior)
    posterior = bf * odds(node_prior)
    posterior = posterior / (1 + posterior)
    accepted = posterior >= accept_at
    rejected = ~accepted & (bf <= 1.0 / miss_factor)
    capped = ~accepted & ~rejected & (n >= max_votes)
    status = np.where(accepted | (capped & (posterior >= 0.5)), "accepted",
                      np.where(rejected | capped, "rejected", "pending")).astype(object)
    n_more = np.where(status == "pending", np.maximum(1, 2 - n), 0)
    return status, n_more


def flat_cost(n_images: int, n_classes: int, times: QuestionTimes = QuestionTimes()) -> float:
    """Human seconds to ask every class of every image once (the naive baseline, one answer per question)."""
    return n_images * n_classes * times.question


def log2_binary_entropy(p: float) -> float:
    if p <= 0 or p >= 1:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
