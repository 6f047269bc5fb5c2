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
    levels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

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
        # decisions on the longest path from a top-level question down to a class through each node: a present
        # class is lost when any of them is wrongly rejected, so each gets 1 / levels of the class's miss budget
        below = tree.anc | np.eye(n, dtype=bool)  # below[c, a]: c is a or lies under a
        chain = np.where(tree.is_class[:, None] & below, tree.depth[:, None] + 1, 0)
        tree.levels = np.maximum(chain.max(axis=0), 1)
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
            # P(n | a) estimated as a share of the images showing a (smoothed toward n's share of a's classes),
            # not as a ratio of two smoothed rates: with a handful of annotated images that ratio is near 1
            nc = self._n_classes()
            share0 = nc / np.maximum(nc[nearest], 1)
            lifted = np.minimum(0.99, (self.count + self.strength * share0) / (self.count[nearest] + self.strength))
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


DEFAULT_TIMES = QuestionTimes()


def expected_resolved(state: ImageState, p: np.ndarray) -> np.ndarray:
    """Per node: expected number of unknown class labels its answer settles. A "yes" settles the node and its
    unknown ancestors (counted when they are classes: never, in a tree whose classes are leaves) and tells the
    most when the node is a class; a "no" settles every unknown class below it."""
    tree = state.tree
    cls_unknown = (state.known == UNKNOWN) & tree.is_class
    n_below = cls_unknown.astype(np.int64) @ tree.anc + cls_unknown  # unknown classes below each node, and itself
    yes_gain = tree.is_class.astype(float)  # a yes settles a class; for a question node it settles no class yet
    return p * yes_gain + (1 - p) * n_below


def next_question(state: ImageState, model: Cooccurrence, times: QuestionTimes = DEFAULT_TIMES) -> int | None:
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


def decide_presence(log_bf: np.ndarray, n_votes: np.ndarray, prior: np.ndarray | float, *, accept_at: float = 0.99,
                    miss_factor: float = 300.0, max_votes: int = 25, step: float = 1.386,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Status (accepted / rejected / pending), posterior P(present) and answers still wanted per (image, node).

    Presence is sparse (a few of hundreds of classes per image), so a posterior threshold alone loses objects: with
    a 1 % base rate one "no" already pushes P(present) under 0.01, and rejecting there misses the present objects a
    0.8-accurate worker overlooks first. So the evidence is kept apart from the prior: `log_bf` is the log Bayes
    factor of the answers (odds(present | answers) / odds(present)). A pair is rejected only when its answers are
    `miss_factor` times likelier for an absent object (BF <= 1 / miss_factor: for a well-specified worker model at
    most 1 / miss_factor of present objects are lost at one question, whatever the base rate; `miss_factor` may be
    an array, one per pair: `plan_presence` multiplies the setting by the node's `QuestionTree.levels`, the
    decisions on the longest path down to a class through it, so a class is lost with probability at most
    1 / det.miss_factor over all the questions above it, as when every class is asked on its own), and accepted when the
    posterior with the node's own prior (`prior`: co-occurrence in that image) reaches `accept_at` (precision).
    Undecided pairs ask for as many answers as typical workers (`step`: log-odds one answer moves) need to reach
    the nearer threshold; at `max_votes` the more probable answer stands.

        >>> st, conf, more = decide_presence(np.array([9.0, -6.0, -2.0]), np.array([6, 4, 2]), 0.013)
        >>> st.tolist(), more.tolist()
        (['accepted', 'rejected', 'pending'], [0, 0, 3])
    """
    lbf = np.asarray(log_bf, dtype=float)
    n = np.asarray(n_votes)
    lp = np.broadcast_to(_logit(prior), lbf.shape)
    post_lo = lbf + lp
    confidence = 1 / (1 + np.exp(-post_lo))
    need_accept = _logit(accept_at) - lp  # log BF that accepts
    need_reject = -np.log(np.broadcast_to(np.asarray(miss_factor, dtype=float), lbf.shape))
    accepted = post_lo >= _logit(accept_at)
    rejected = ~accepted & (lbf <= need_reject)
    capped = ~accepted & ~rejected & (n >= max_votes)
    status = np.where(accepted | (capped & (confidence >= 0.5)), "accepted",
                      np.where(rejected | capped, "rejected", "pending")).astype(object)
    gap = np.where(lbf >= (need_accept + need_reject) / 2, need_accept - lbf, lbf - need_reject)
    more = np.clip(np.ceil(gap / max(step, 1e-3)), 1, np.maximum(max_votes - n, 1)).astype(np.int64)
    more = np.where(status == "pending", more, 0)
    return status, confidence, more


def initial_votes(prior: float | np.ndarray, *, miss_factor: float = 300.0, accept_at: float = 0.99,
                  step: float = 1.386, floor: int = 2) -> Any:
    """Answers to ask of a new question: what typical answers need to reach the nearer threshold from no evidence
    (most nodes are absent, so this is usually the answers that clear a "no"); at least `floor`."""
    need_accept = _logit(accept_at) - _logit(prior)
    need = np.minimum(need_accept, np.log(miss_factor))
    return np.maximum(np.ceil(need / max(step, 1e-3)), floor).astype(np.int64)


def flat_cost(n_images: int, n_classes: int, times: QuestionTimes = DEFAULT_TIMES) -> float:
    """Human seconds to ask every class of every image once (the naive baseline, one answer per question)."""
    return n_images * n_classes * times.question


def log2_binary_entropy(p: float) -> float:
    if p <= 0 or p >= 1:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


# ------------------------------------------------------------------------ one image's state from decisions
def state_from_decisions(tree: QuestionTree, accepted: Iterable[int], rejected: Iterable[int]) -> ImageState:
    """An image's state from its decided (image, node) pairs, whatever order they were decided in.

    A node is present when it or a node below it was accepted; absent when it is not present and it or an
    ancestor was rejected while that ancestor is not present. So a "no" to "is there an animal?" clears every
    animal, unless some animal was accepted on its own (noisy answers can disagree): then the "no" is overruled
    and the other animals are asked, instead of being lost.

        >>> edges = pd.DataFrame({"child_wnid": ["c1", "c2", "c3"], "parent_wnid": ["a", "a", "r"]})
        >>> t = QuestionTree.from_table(build_question_tree(["c1", "c2", "c3"], edges, max_share=0.9))
        >>> s = state_from_decisions(t, [t.index["c1"]], [t.index["a"]]); s.known_classes()  # c2 is asked
        {'c1': True}
        >>> state_from_decisions(t, [], [t.index["a"]]).known_classes()
        {'c1': False, 'c2': False}
    """
    n = len(tree)
    acc = np.zeros(n, dtype=bool)
    rej = np.zeros(n, dtype=bool)
    acc[list(accepted)] = True
    rej[list(rejected)] = True
    yes = acc | ((acc.astype(np.int64) @ tree.anc) > 0)
    live_no = rej & ~yes
    no = ~yes & (live_no | ((tree.anc.astype(np.int64) @ live_no.astype(np.int64)) > 0))
    s = ImageState(tree)
    s.known = np.where(yes, YES, np.where(no, NO, UNKNOWN)).astype(np.int8)
    return s


# ------------------------------------------------------------------------------------- presence QC
PRESENCE_METHOD = "presence-ds"
SHRINK_STRENGTH = 8.0  # pseudo-answers pulling a worker's sensitivity / specificity toward the crowd's
CROWD_STRENGTH = 20.0  # pseudo-answers holding the crowd's own rates at the prior accuracy on very few answers


@dataclass
class PresenceFit:
    """Per (image, node) evidence and per worker estimates of one fit of the presence worker model."""

    log_bf: pd.Series  # task key -> log Bayes factor of the unflagged workers' answers
    n_votes: pd.Series  # task key -> answers (all workers)
    n_yes: pd.Series
    workers: pd.DataFrame  # worker, n_votes, n_yes, gold_n, gold_correct, sensitivity, specificity, flagged, flag_reason
    crowd_sensitivity: float
    crowd_specificity: float
    vote_step: float  # log-odds one answer of a typical unflagged worker moves


def _logit(p: Any) -> Any:
    p = np.clip(np.asarray(p, dtype=float), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def fit_presence_model(long: pd.DataFrame, priors: pd.Series, gold: pd.Series | None = None, *,
                       rules: Any = None, strength: float | None = None, n_iter: int = 50,
                       tol: float = 1e-6, prior_accuracy: float = 0.8) -> PresenceFit:
    """Dawid-Skene's two-coin worker model for sparse presence answers (pure numpy EM).

    `long`: task (image|node key), worker, label (yes/no); `priors`: task -> P(present) before its answers
    (the co-occurrence prior of that node in that image, so the model does not pretend every node is as common as
    the average); `gold`: task -> known yes/no (controls: pinned, they train the workers and are never decided).

    Presence is sparse: a worker meets a handful of present objects among hundreds of absent ones, so a
    worker's own sensitivity is estimated from a handful of answers. Each worker's sensitivity and specificity
    are therefore shrunk toward the crowd's pooled ones (empirical Bayes, re-estimated every iteration) by
    `strength` pseudo-answers (default: the spread of accuracies the crowd's agreement shows,
    `pipeline.qc.prior.crowd_prior`, else SHRINK_STRENGTH); gold controls with known positives add exact evidence. Workers are flagged with
    the QC stage's rules (`pipeline.qc.workers.FlagRules`: answers independent of the image, adversarial, failing
    gold) and the model is refitted without their answers, as `AdaptiveConsensus` does.

        >>> long = pd.DataFrame({"task": ["a", "a", "a", "b", "b", "b"], "worker": ["w1", "w2", "w3"] * 2,
        ...                      "label": ["yes", "yes", "no", "no", "no", "no"]})
        >>> fit = fit_presence_model(long, pd.Series({"a": 0.1, "b": 0.1}))
        >>> bool(fit.log_bf["a"] > 0 > fit.log_bf["b"])
        True
    """
    from pipeline.qc.workers import FlagRules, wilson_upper

    rules = rules or FlagRules()
    gold = pd.Series(dtype=object) if gold is None else gold.dropna()
    if not len(long):
        empty = pd.Series(dtype=float)
        return PresenceFit(empty, empty, empty, pd.DataFrame(columns=WORKER_FIT_COLUMNS), 0.8, 0.8,
                           float(_logit(0.8)))
    t_codes, tasks = pd.factorize(long["task"])
    w_codes, workers = pd.factorize(long["worker"])
    y = long["label"].to_numpy() == "yes"
    n_t, n_w = len(tasks), len(workers)
    prior = priors.reindex(tasks).to_numpy(dtype=float)
    prior = np.where(np.isfinite(prior), prior, float(np.nanmean(prior)) if np.isfinite(prior).any() else 0.05)
    gpos = tasks.get_indexer(gold.index)
    gmask = np.zeros(n_t, dtype=bool)
    gval = np.zeros(n_t)
    gmask[gpos[gpos >= 0]] = True
    gval[gpos[gpos >= 0]] = (gold.to_numpy()[gpos >= 0] == "yes").astype(float)
    lp = _logit(prior)

    def em(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
        t, w, yy = t_codes[keep], w_codes[keep], y[keep]
        # start from the answers' share of yes, weighed by the prior
        n = np.bincount(t, minlength=n_t).astype(float)
        k = np.bincount(t, weights=yy.astype(float), minlength=n_t)
        p = 1 / (1 + np.exp(-(lp + 1.4 * (2 * k - n))))
        p = np.where(gmask, gval, p)
        sens = spec = np.full(n_w, 0.8)
        cs = cc = 0.8
        for _ in range(n_iter):
            pt = p[t]
            tp = np.bincount(w, weights=pt * yy, minlength=n_w)
            fn = np.bincount(w, weights=pt * ~yy, minlength=n_w)
            tn = np.bincount(w, weights=(1 - pt) * ~yy, minlength=n_w)
            fp = np.bincount(w, weights=(1 - pt) * yy, minlength=n_w)
            # the crowd's own rates, held near `prior_accuracy` until the answers outweigh CROWD_STRENGTH of them
            cs = (tp.sum() + CROWD_STRENGTH * prior_accuracy) / (tp.sum() + fn.sum() + CROWD_STRENGTH)
            cc = (tn.sum() + CROWD_STRENGTH * prior_accuracy) / (tn.sum() + fp.sum() + CROWD_STRENGTH)
            spec = np.clip((tn + strength * cc) / (tn + fp + strength), 1e-4, 1 - 1e-4)
            sens = np.clip((tp + strength * sensitivity_prior(spec, cs, cc)) / (tp + fn + strength), 1e-4, 1 - 1e-4)
            lr_yes = np.log(sens / (1 - spec))
            lr_no = np.log((1 - sens) / spec)
            lbf = np.bincount(t, weights=np.where(yy, lr_yes[w], lr_no[w]), minlength=n_t)
            new = np.where(gmask, gval, 1 / (1 + np.exp(-(lp + lbf))))
            if np.abs(new - p).max() < tol:
                p = new
                break
            p = new
        return lbf, sens, spec, p, cs, cc

    if strength is None:  # the crowd's own spread of accuracies (empirical Bayes, pipeline.qc.prior)
        from pipeline.qc.prior import crowd_prior

        crowd = crowd_prior(t_codes, w_codes, y.astype(np.int64), prior_accuracy, SHRINK_STRENGTH)
        strength = crowd.strength if crowd.source == "crowd" else SHRINK_STRENGTH
    keep = np.ones(len(long), dtype=bool)
    lbf, sens, spec, p, cs, cc = em(keep)
    n_votes = np.bincount(w_codes, minlength=n_w)
    n_yes = np.bincount(w_codes, weights=y.astype(float), minlength=n_w)
    g_t = gmask[t_codes]
    g_n = np.bincount(w_codes, weights=g_t.astype(float), minlength=n_w)
    g_ok = np.bincount(w_codes, weights=(g_t & (y == (gval[t_codes] == 1))).astype(float), minlength=n_w)
    score = sens + spec - 1
    reason = np.full(n_w, None, dtype=object)
    enough = n_votes >= rules.min_votes
    reason[enough & (spammer_log_odds(long_counts(t_codes, w_codes, y, p, n_w), cs, cc, strength) > 0)] = "random"
    reason[enough & (score < rules.adversarial_score)] = "adversarial"
    failed = (g_n >= rules.min_gold) & (wilson_upper(g_ok, g_n) < rules.gold_min_accuracy)
    reason[failed] = "gold"
    flagged = pd.notna(reason)
    if flagged.any():
        keep = ~flagged[w_codes]
        lbf, sens, spec, p, cs, cc = em(keep)
    # log-odds a typical unflagged answer moves: the mean of |log LR| over kept answers
    w_keep = w_codes[keep]
    moves = np.where(y[keep], np.log(sens / (1 - spec))[w_keep], -np.log((1 - sens) / spec)[w_keep])
    step = float(np.clip(np.mean(moves), 0.4, 3.0)) if len(moves) else float(_logit(0.8))
    wt = pd.DataFrame({"worker": workers, "n_votes": n_votes.astype(np.int64), "n_yes": n_yes.astype(np.int64),
                       "gold_n": g_n.astype(np.int64), "gold_correct": g_ok.astype(np.int64), "sensitivity": sens,
                       "specificity": spec, "flagged": flagged, "flag_reason": reason})
    n_all = np.bincount(t_codes, minlength=n_t)
    k_all = np.bincount(t_codes, weights=y.astype(float), minlength=n_t)
    return PresenceFit(pd.Series(lbf, index=tasks), pd.Series(n_all, index=tasks), pd.Series(k_all, index=tasks),
                       wt, float(cs), float(cc), step)


def sensitivity_prior(spec: np.ndarray, cs: float, cc: float) -> np.ndarray:
    """The prior mean of each worker's sensitivity given their specificity (which the many absent objects measure
    well): the crowd's sensitivity `cs` for a worker as specific as the crowd (`cc`), falling to 1 - spec (answers
    independent of the image) as the worker's false-alarm rate rises to chance. Without this coupling a coin-flipper,
    whose few present objects say little, would get the crowd's sensitivity and their "no" would count as evidence.

        >>> sensitivity_prior(np.array([0.8, 0.5]), 0.8, 0.8).round(3).tolist()
        [0.8, 0.5]
    """
    if cc <= 0.5:
        return np.full_like(spec, cs)
    return np.clip(1 - (1 - cs) * (1 - spec) / (1 - cc), 0.05, 0.995)


def long_counts(t: np.ndarray, w: np.ndarray, y: np.ndarray, p: np.ndarray, n_w: int) -> np.ndarray:
    """Per worker soft counts (yes on present, no on present, no on absent, yes on absent) under the posteriors."""
    pt = p[t]
    return np.stack([np.bincount(w, weights=pt * y, minlength=n_w), np.bincount(w, weights=pt * ~y, minlength=n_w),
                     np.bincount(w, weights=(1 - pt) * ~y, minlength=n_w),
                     np.bincount(w, weights=(1 - pt) * y, minlength=n_w)], axis=1)


def spammer_log_odds(counts: np.ndarray, cs: float, cc: float, strength: float, share: float = 0.1) -> np.ndarray:
    """log P(answers independent of the image | answers) / P(an honest worker | answers) per worker: a Bayesian
    comparison of two models of the worker's answers, with `share` of spammers a priori. Honest: sensitivity and
    specificity drawn around the crowd's (Beta priors of `strength` pseudo-answers); spammer: one yes-rate whatever
    the image (uniform prior). Both marginal likelihoods are Beta-binomial, so a yes-sayer (half yes on absent
    objects) and a no-sayer (no on every present one) stand out however few present objects they met.
    """
    from scipy.special import betaln

    tp, fn, tn, fp = counts.T
    a_s, b_s = strength * cs, strength * (1 - cs)
    a_c, b_c = strength * cc, strength * (1 - cc)
    honest = betaln(tp + a_s, fn + b_s) - betaln(a_s, b_s) + betaln(tn + a_c, fp + b_c) - betaln(a_c, b_c)
    spam = betaln(tp + fp + 1, fn + tn + 1)
    return math.log(share / (1 - share)) + spam - honest


WORKER_FIT_COLUMNS = ["worker", "n_votes", "n_yes", "gold_n", "gold_correct", "sensitivity", "specificity", "flagged",
                      "flag_reason"]


# --------------------------------------------------------------------------------------- the presence loop
ACTION_COLUMNS = ["image_id", "seq", "kind", "parent_id", "node_ids", "overlap", "is_gold", "gold_answers",
                  "request_id"]


def pair_key(image_id: Any, node_id: Any) -> Any:
    """One string per (image, node): image ids are hex digests, nodes wnids or 'group:<id>', so '|' is safe."""
    return image_id + "|" + node_id


def request_id_for(image_id: str, seq: int, gold: bool = False) -> str:
    return f"presence{'-gold' if gold else ''}:{image_id}:{seq}"


def det_settings(settings: Any) -> Any:
    """The det section of Settings (defaults when the caller passes none)."""
    from pipeline.config import DetSettings

    section = getattr(settings, "det", None)
    return section if isinstance(section, DetSettings) else DetSettings()


def _records(frame: pd.DataFrame | None) -> list[dict[str, Any]]:
    if frame is None or not len(frame):
        return []
    cols = list(frame.columns)
    return [dict(zip(cols, row, strict=True)) for row in zip(*(frame[c].tolist() for c in cols), strict=True)]


@dataclass
class PresencePlan:
    actions: pd.DataFrame  # ACTION_COLUMNS: the presence tasks to push next
    labels: pd.DataFrame  # the presence_labels table
    images: pd.DataFrame  # the det_images table
    states: dict[str, ImageState]
    model: Cooccurrence
    fit: PresenceFit


def gold_units(gold: pd.DataFrame | None, tree: QuestionTree, scheme: str) -> list[dict[str, Any]]:
    """Controls the push can mix in, from the presence_gold table: single questions, or (checklist scheme) the
    checklists a real image would get (the top-level questions, a node's children) on gold images whose answers
    to every item are known. Each: image_id, parent_id, node_ids, answers, positive (any yes)."""
    if gold is None or not len(gold):
        return []
    known: dict[str, dict[str, str]] = {}
    for r in _records(gold[["image_id", "node_id", "answer"]]):
        if r["node_id"] in tree.index:
            known.setdefault(r["image_id"], {})[r["node_id"]] = str(r["answer"]).strip().lower()
    units = []
    tops = [tree.ids[i] for i in np.flatnonzero(tree.parent < 0)]
    for image_id in sorted(known):
        k = known[image_id]
        if scheme == "checklist":
            groups = [(None, tops)] + [(tree.ids[p], [tree.ids[c] for c in tree.children[p]])
                                       for p in range(len(tree)) if tree.children[p]]
            for parent, kids in groups:
                if kids and all(c in k for c in kids):
                    units.append({"image_id": image_id, "parent_id": parent, "node_ids": kids,
                                  "answers": [k[c] for c in kids]})
        else:
            units += [{"image_id": image_id, "parent_id": None, "node_ids": [n], "answers": [a]}
                      for n, a in sorted(k.items())]
    for u in units:
        u["positive"] = "yes" in u["answers"]
    return units


def _checklists(image_id: str, groups: Mapping[int, list[int]], tree: QuestionTree, limit: int) -> list[dict]:
    out = []
    for parent in sorted(groups, key=lambda p: (p >= 0, p)):
        kids = groups[parent]
        for start in range(0, len(kids), limit):
            chunk = kids[start:start + limit]
            kind = "checklist" if len(chunk) > 1 else "question"
            out.append({"image_id": image_id, "kind": kind,
                        "parent_id": tree.ids[parent] if parent >= 0 and kind == "checklist" else None,
                        "nodes": chunk})
    return out


def plan_presence(tree: QuestionTree, pool: Sequence[str], tasks: pd.DataFrame | None, votes: pd.DataFrame | None,
                  frozen: pd.DataFrame | None = None, gold: pd.DataFrame | None = None, policy: Any = None,
                  rules: Any = None, times: QuestionTimes = DEFAULT_TIMES, prior_accuracy: float = 0.8) -> PresencePlan:
    """The whole presence loop's state from its tables, and what to push next (pure; nothing kept in memory).

    pool: the image ids to annotate; tasks: the presence_tasks table; votes: presence_votes; frozen: the previous
    presence_labels (its accepted / rejected verdicts stand); gold: presence_gold (controls to mix in).
    Each (image, node) asked is decided by `decide_presence` on the evidence of `fit_presence_model` and the
    co-occurrence prior of that node in that image (learnt from the images already fully annotated); an image is
    fully annotated when every DET class is decided, asked or implied by the tree.
    """
    policy = policy or det_settings(None)
    tasks = tasks if tasks is not None else pd.DataFrame(columns=["task_id", "image_id", "node_ids", "is_gold"])
    votes = votes if votes is not None else pd.DataFrame(columns=["annotation_id", "task_id", "image_id", "node_id",
                                                                  "worker", "answer", "n_items", "lead_time_s"])
    pool = list(dict.fromkeys(pool))
    pool_set = set(pool)
    task_rows = _records(tasks)
    answered = votes.groupby("task_id")["annotation_id"].nunique().to_dict() if len(votes) else {}
    asked: dict[str, set[str]] = {}
    waiting: set[tuple[str, str]] = set()
    n_tasks: dict[str, int] = {}
    seq_next: dict[tuple[str, bool], int] = {}
    gold_uses: dict[tuple, int] = {}
    gold_truth: dict[str, str] = {}
    for t in task_rows:
        nodes = list(t["node_ids"])
        key = (t["image_id"], bool(t["is_gold"]))
        seq_next[key] = max(seq_next.get(key, 0), int(t["seq"]) + 1)
        if t["is_gold"]:
            unit = (t["image_id"], t["parent_id"] if isinstance(t.get("parent_id"), str) else None, tuple(nodes))
            gold_uses[unit] = gold_uses.get(unit, 0) + 1
            for n, a in zip(nodes, list(t["gold_answers"]), strict=False):
                gold_truth[pair_key(t["image_id"], n)] = str(a)
            continue
        if t["image_id"] not in pool_set:
            continue
        n_tasks[t["image_id"]] = n_tasks.get(t["image_id"], 0) + 1
        asked.setdefault(t["image_id"], set()).update(nodes)
        if answered.get(t["task_id"], 0) < int(t["overlap"]):
            waiting.update((t["image_id"], n) for n in nodes)

    frozen_rows = {(r["image_id"], r["node_id"]): r for r in _records(frozen)
                   if r["status"] in ("accepted", "rejected")}

    def states_of(decided: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[str, ImageState]:
        acc: dict[str, list[int]] = {}
        rej: dict[str, list[int]] = {}
        for (image_id, node), r in decided.items():
            if node in tree.index and image_id in pool_set:
                (acc if r["status"] == "accepted" else rej).setdefault(image_id, []).append(tree.index[node])
        return {i: state_from_decisions(tree, acc.get(i, []), rej.get(i, [])) for i in pool}

    def model_of(states: Mapping[str, ImageState]) -> Cooccurrence:
        m = Cooccurrence(tree)
        for i in sorted(states):
            if states[i].done():
                m.add(states[i].present())
        return m

    states = states_of(frozen_rows)
    model = model_of(states)

    # open pairs: asked, not frozen; their prior is the co-occurrence prior given what is known of the image now
    open_pairs = [(i, n) for i in pool for n in sorted(asked.get(i, ())) if (i, n) not in frozen_rows
                  and n in tree.index]
    prior_of: dict[str, float] = {pair_key(i, n): float(r["prior"]) for (i, n), r in frozen_rows.items()
                                  if r.get("prior") is not None and np.isfinite(r["prior"])}
    p_cache: dict[str, np.ndarray] = {}
    for i, n in open_pairs:
        if i not in p_cache:
            p_cache[i] = model.p_present(states[i])
        prior_of[pair_key(i, n)] = float(p_cache[i][tree.index[n]])

    # the worker model over every answer (gold included: pinned)
    if len(votes):
        v = votes.sort_values("annotation_id", kind="stable")
        v = v.assign(_k=pair_key(v["image_id"].astype(str), v["node_id"].astype(str)))
        v = v.drop_duplicates(["_k", "worker"], keep="first")
        long = pd.DataFrame({"task": v["_k"].to_numpy(), "worker": v["worker"].astype(str).to_numpy(),
                             "label": v["answer"].astype(str).str.lower().to_numpy()})
    else:
        long = pd.DataFrame(columns=["task", "worker", "label"])
    gold_series = pd.Series(gold_truth, dtype=object)
    for k in gold_series.index:
        prior_of.setdefault(k, 0.5)
    fit = fit_presence_model(long, pd.Series(prior_of, dtype=float), gold_series, rules=rules,
                             prior_accuracy=prior_accuracy)

    rows: dict[tuple[str, str], dict[str, Any]] = {k: dict(r) for k, r in frozen_rows.items()}
    more: dict[tuple[str, str], int] = {}
    if open_pairs:
        keys = [pair_key(i, n) for i, n in open_pairs]
        lbf = fit.log_bf.reindex(keys).fillna(0.0).to_numpy()
        nv = fit.n_votes.reindex(keys).fillna(0).to_numpy().astype(np.int64)
        ny = fit.n_yes.reindex(keys).fillna(0).to_numpy().astype(np.int64)
        pr = np.array([prior_of[k] for k in keys])
        miss = policy.miss_factor * tree.levels[[tree.index[n] for _, n in open_pairs]]
        status, conf, n_more = decide_presence(lbf, nv, pr, accept_at=policy.accept_at, miss_factor=miss,
                                               max_votes=policy.max_votes, step=fit.vote_step)
        for j, (i, n) in enumerate(open_pairs):
            st = "pending" if (i, n) in waiting else status[j]
            rows[(i, n)] = {"image_id": i, "node_id": n, "is_class": bool(tree.is_class[tree.index[n]]), "status": st,
                            "n_votes": int(nv[j]), "n_yes": int(ny[j]), "bayes_factor": float(np.exp(min(lbf[j], 700))),
                            "prior": float(pr[j]), "confidence": float(conf[j]), "method": PRESENCE_METHOD}
            if st == "pending" and (i, n) not in waiting:
                more[(i, n)] = int(n_more[j])
    decided = {k: r for k, r in rows.items() if r["status"] in ("accepted", "rejected")}
    states = states_of(decided)
    model = model_of(states)

    # next tasks per image: re-ask the pairs still undecided, then open new questions
    actions: list[dict[str, Any]] = []
    more_by_image: dict[str, dict[int, int]] = {}
    for (i, n), m in more.items():
        more_by_image.setdefault(i, {})[tree.index[n]] = m
    for i in pool:
        s = states[i]
        if s.done() or any((i, n) in waiting for n in asked.get(i, ())):
            continue
        pend_more = more_by_image.get(i, {})
        pend = sorted(pend_more)
        busy = set(pend)
        new: list[dict[str, Any]] = []
        p = model.p_present(s)
        if policy.scheme == "checklist":
            groups: dict[int, list[int]] = {}
            for n in pend:
                groups.setdefault(int(tree.parent[n]), []).append(n)
            for g in _checklists(i, groups, tree, policy.checklist_max):
                g["overlap"] = max(pend_more[n] for n in g["nodes"])
                new.append(g)
            unknown = s.known == UNKNOWN
            fresh: dict[int, list[int]] = {}
            for n in np.flatnonzero(unknown):
                par = int(tree.parent[n])
                if n in busy or (par >= 0 and s.known[par] != YES):
                    continue
                fresh.setdefault(par, []).append(int(n))
            for g in _checklists(i, fresh, tree, policy.checklist_max):
                g["overlap"] = int(max(initial_votes(p[n], miss_factor=policy.miss_factor * tree.levels[n],
                                                     accept_at=policy.accept_at,
                                                     step=fit.vote_step) if policy.initial_votes is None
                                       else policy.initial_votes for n in g["nodes"]))
                new.append(g)
        else:
            if pend:
                new += [{"image_id": i, "kind": "question", "parent_id": None, "nodes": [n], "overlap": pend_more[n]}
                        for n in pend]
            else:
                trial = ImageState(tree)
                trial.known = s.known.copy()
                for _ in range(policy.questions_per_round):
                    q = next_question(trial, model, times)
                    if q is None:
                        break
                    ov = (int(initial_votes(p[q], miss_factor=policy.miss_factor * tree.levels[q],
                                            accept_at=policy.accept_at,
                                            step=fit.vote_step)) if policy.initial_votes is None
                          else policy.initial_votes)
                    new.append({"image_id": i, "kind": "question", "parent_id": None, "nodes": [q], "overlap": ov})
                    trial.known[q] = -2  # taken this round: neither askable again nor counted as answered
                    above = tree.anc[q]
                    trial.known[above] = np.where(trial.known[above] == UNKNOWN, -2, trial.known[above])
                    if trial.done() or not (trial.known == UNKNOWN).any():
                        break
        for g in new:
            seq = seq_next.get((i, False), 0)
            seq_next[(i, False)] = seq + 1
            actions.append({"image_id": i, "seq": seq, "kind": g["kind"], "parent_id": g["parent_id"],
                            "node_ids": [tree.ids[n] for n in g["nodes"]], "overlap": int(max(1, g["overlap"])),
                            "is_gold": False, "gold_answers": [], "request_id": request_id_for(i, seq)})
    actions += _gold_actions(actions, gold_units(gold, tree, policy.scheme), gold_uses, seq_next, policy)

    # the tables
    label_rows = sorted(rows.values(), key=lambda r: (r["image_id"], r["node_id"]))
    labels = pd.DataFrame(label_rows, columns=PRESENCE_LABEL_COLUMNS)
    secs: dict[str, float] = {}
    nvotes: dict[str, int] = {}
    if len(votes):
        vv = votes[votes["image_id"].isin(pool_set) & ~votes["is_gold"].astype(bool)] if "is_gold" in votes else votes
        share = pd.to_numeric(vv["lead_time_s"], errors="coerce").fillna(0.0) / vv["n_items"].clip(lower=1)
        secs = share.groupby(vv["image_id"]).sum().to_dict()
        nvotes = vv.groupby("image_id").size().to_dict()
    cls = tree.classes
    image_rows = []
    for i in pool:
        s = states[i]
        state = "done" if s.done() else ("waiting" if any((i, n) in waiting for n in asked.get(i, ())) else "asking")
        image_rows.append({"image_id": i, "state": state, "present": sorted(tree.ids[c] for c in s.present()),
                           "n_decided": int((s.known[cls] != UNKNOWN).sum()), "n_classes": len(cls),
                           "n_questions": len(asked.get(i, ())), "n_tasks": n_tasks.get(i, 0),
                           "n_votes": int(nvotes.get(i, 0)), "worker_seconds": float(secs.get(i, 0.0))})
    images = pd.DataFrame(image_rows, columns=DET_IMAGE_COLUMNS)
    return PresencePlan(pd.DataFrame(actions, columns=ACTION_COLUMNS), labels, images, states, model, fit)


PRESENCE_LABEL_COLUMNS = ["image_id", "node_id", "is_class", "status", "n_votes", "n_yes", "bayes_factor", "prior",
                          "confidence", "method"]
DET_IMAGE_COLUMNS = ["image_id", "state", "present", "n_decided", "n_classes", "n_questions", "n_tasks", "n_votes",
                     "worker_seconds"]


def _gold_actions(actions: list[dict[str, Any]], units: list[dict[str, Any]], uses: dict[tuple, int],
                  seq_next: dict[tuple[str, bool], int], policy: Any) -> list[dict[str, Any]]:
    """ImageNetV2's controls: for every `gold_batch` new tasks, `gold_positives` known positives and
    `gold_negatives` known negatives, least used first (ties in a fixed hashed order), as tasks of the same kind."""
    import hashlib

    n_new = len(actions)
    if not n_new or not units:
        return []
    batches = -(-n_new // policy.gold_batch)
    # as many answers as a typical task of the push gets: controls are then ~gold_batch-th of the answers, as in
    # ImageNetV2's HITs (6 of 48), and every worker of the batch is as likely to meet one
    overlap = int(np.median([int(a["overlap"]) for a in actions]))

    def order(u: dict[str, Any]) -> tuple:
        k = (u["image_id"], u["parent_id"], tuple(u["node_ids"]))
        return uses.get(k, 0), hashlib.sha256(repr(k).encode()).hexdigest()

    out = []
    for positive, want in ((True, policy.gold_positives), (False, policy.gold_negatives)):
        pool = sorted((u for u in units if u["positive"] == positive), key=order)
        for u in pool[: want * batches]:
            seq = seq_next.get((u["image_id"], True), 0)
            seq_next[(u["image_id"], True)] = seq + 1
            out.append({"image_id": u["image_id"], "seq": seq,
                        "kind": "checklist" if len(u["node_ids"]) > 1 else "question", "parent_id": u["parent_id"],
                        "node_ids": list(u["node_ids"]), "overlap": overlap, "is_gold": True,
                        "gold_answers": list(u["answers"]), "request_id": request_id_for(u["image_id"], seq, True)})
    return out


# ------------------------------------------------------------------------------------------- I/O shell
def read_tree(store: Any) -> QuestionTree:
    if not store.has_table("det_questions"):
        raise QuestionTreeError(f"no det_questions table in {store.url}: build the DET vocabulary first "
                                "(synsetforge vocab --wnid-file det_classes.txt --det)")
    return QuestionTree.from_table(store.read_table("det_questions"))


def det_pool(store: Any, policy: Any = None, gold: pd.DataFrame | None = None) -> list[str]:
    """The images to annotate: every accepted image of the `images` table except the controls, in a stable hashed
    order (a sample of `det.max_images` keeps the same images whatever else is ingested later)."""
    import hashlib

    policy = policy or det_settings(None)
    images = store.read_table("images", columns=["image_id", "status"], missing_ok=True).to_pandas()
    ids = set(images.loc[(images["status"] == "accepted") & images["image_id"].notna(), "image_id"])
    if gold is not None and len(gold):  # expert control images are controls only; crowd-built ones stay
        ids -= set(gold.loc[gold["source"] != CROWD, "image_id"]) if "source" in gold else set(gold["image_id"])
    if store.has_table("image_links"):  # a near copy of a kept image would be annotated twice
        links = store.read_table("image_links", columns=["image_id", "near_duplicate_of"]).to_pandas()
        copies = links.groupby("image_id")["near_duplicate_of"].apply(lambda s: s.notna().all())
        ids -= set(copies.index[copies])
    ordered = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    return ordered[: policy.max_images] if policy.max_images else ordered


def _table(store: Any, name: str) -> pd.DataFrame | None:
    df = store.read_table(name, missing_ok=True).to_pandas()
    return df if len(df) else None


def run_presence_plan(store: Any, settings: Any = None, pool: Sequence[str] | None = None) -> PresencePlan:
    """Read the presence tables, replay the loop, write `presence_labels` and `det_images`; return the plan."""
    from pipeline.qc.workers import FlagRules

    policy = det_settings(settings)
    qc = getattr(settings, "qc", None)
    rules = FlagRules(min_votes=qc.min_votes_to_flag, min_gold=qc.min_gold_to_flag,
                      gold_min_accuracy=qc.gold_min_accuracy) if qc is not None else None
    tree = read_tree(store)
    gold = _table(store, "presence_gold")
    pool = det_pool(store, policy, gold) if pool is None else list(pool)
    result = plan_presence(tree, pool, _table(store, "presence_tasks"), _table(store, "presence_votes"),
                           _table(store, "presence_labels"), gold, policy, rules=rules,
                           prior_accuracy=qc.prior_accuracy if qc is not None else 0.8)
    store.write_table("presence_labels", result.labels)
    store.write_table("det_images", result.images)
    return result


def summarize(images: pd.DataFrame, labels: pd.DataFrame | None = None) -> dict[str, Any]:
    """Counts for `det status`, the DAG and the benchmarks."""
    n = len(images)
    done = images[images["state"] == "done"] if n else images
    return {
        "images": n,
        "by_state": {k: int(v) for k, v in images["state"].value_counts().sort_index().items()} if n else {},
        "done": len(done),
        "present_per_done_image": float(done["present"].map(len).mean()) if len(done) else None,
        "questions_per_image": float(images["n_questions"].mean()) if n else None,
        "votes_per_image": float(images["n_votes"].mean()) if n else None,
        "worker_seconds_per_image": float(images["worker_seconds"].mean()) if n else None,
        "pending_pairs": int((labels["status"] == "pending").sum()) if labels is not None and len(labels) else 0,
    }


# ------------------------------------------------------------------------------------------------ controls
EXPERT, CROWD = "expert", "crowd"
GOLD_COLUMNS = ["image_id", "node_id", "answer", "source"]


class PresenceGoldError(UserError):
    """The presence gold seed file is missing or malformed; the message names the file and the rows."""


def read_presence_seed(path: str | Any, tree: QuestionTree) -> pd.DataFrame:
    """Expert-annotated control images (CSV or Parquet: image_id, node_id or wnid, answer yes/no). Every node the
    tree implies is filled in: a yes answers the node's ancestors, a no the nodes below it."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise PresenceGoldError(f"presence gold seed file {p} does not exist; fix det.gold_seed_file or unset it")
    try:
        df = pd.read_parquet(p) if p.suffix in (".parquet", ".pq") else pd.read_csv(p, dtype=str)
    except Exception as exc:  # noqa: BLE001 - pandas raises many types for a bad file
        raise PresenceGoldError(f"presence gold seed file {p} is not readable: {exc}") from None
    if "node_id" not in df.columns and "wnid" in df.columns:
        df = df.rename(columns={"wnid": "node_id"})
    missing = [c for c in ("image_id", "node_id", "answer") if c not in df.columns]
    if missing:
        raise PresenceGoldError(f"presence gold seed file {p} lacks column(s) {missing}; give image_id, node_id "
                                "(or wnid) and answer (yes/no)")
    answer = df["answer"].astype(str).str.strip().str.lower()
    bad = df[~answer.isin(["yes", "no"]) | ~df["node_id"].isin(tree.index)]
    if len(bad):
        raise PresenceGoldError(f"presence gold seed file {p}: {len(bad)} row(s) with an answer other than yes/no or a "
                                f"node the DET tree does not have (first lines: {[int(i) + 2 for i in bad.index[:5]]})")
    rows = []
    for image_id, g in df.assign(answer=answer).groupby("image_id", sort=True):
        acc = [tree.index[n] for n in g.loc[g["answer"] == "yes", "node_id"]]
        rej = [tree.index[n] for n in g.loc[g["answer"] == "no", "node_id"]]
        st = state_from_decisions(tree, acc, rej)
        rows += [{"image_id": image_id, "node_id": tree.ids[n], "answer": "yes" if st.known[n] == YES else "no",
                  "source": EXPERT} for n in np.flatnonzero(st.known != UNKNOWN)]
    return pd.DataFrame(rows, columns=GOLD_COLUMNS)


def crowd_gold(tree: QuestionTree, images: pd.DataFrame, labels: pd.DataFrame, *, n_images: int,
               min_yes: int = 3, min_confidence: float = 0.999, reject_bf: float = 1e-4) -> pd.DataFrame:
    """Controls from the crowd's own confident results: fully annotated images whose every asked node was decided
    with strong evidence (present: `min_yes` yes answers and P >= `min_confidence`; absent: Bayes factor <=
    `reject_bf`), every node answered as the image's final state says; the first `n_images` in a hashed order."""
    import hashlib

    if not len(images) or not len(labels) or n_images <= 0:
        return pd.DataFrame(columns=GOLD_COLUMNS)
    strong = np.where(labels["status"] == "accepted",
                      (labels["n_yes"] >= min_yes) & (labels["confidence"] >= min_confidence),
                      (labels["status"] == "rejected") & (labels["bayes_factor"] <= reject_bf))
    weak = set(labels.loc[~strong.astype(bool), "image_id"])
    done = images[(images["state"] == "done") & ~images["image_id"].isin(weak)]
    ids = sorted(done["image_id"], key=lambda i: hashlib.sha256(f"gold|{i}".encode()).hexdigest())[:n_images]
    by = labels[labels["image_id"].isin(set(ids))]
    rows = []
    for image_id, g in by.groupby("image_id", sort=True):
        st = state_from_decisions(tree, [tree.index[n] for n in g.loc[g["status"] == "accepted", "node_id"]],
                                  [tree.index[n] for n in g.loc[g["status"] == "rejected", "node_id"]])
        rows += [{"image_id": image_id, "node_id": tree.ids[n], "answer": "yes" if st.known[n] == YES else "no",
                  "source": CROWD} for n in range(len(tree))]
    return pd.DataFrame(rows, columns=GOLD_COLUMNS)


def refresh_presence_gold(store: Any, settings: Any = None, *, crowd_images: int = 10) -> dict[str, Any]:
    """Rebuild `presence_gold`: the expert seed file (det.gold_seed_file; its images are controls only, never
    dataset images) and up to `crowd_images` of the crowd's confidently annotated images (they stay in the
    dataset). Controls already in the table stay (a control's answers do not change under the workers' feet)."""
    tree = read_tree(store)
    policy = det_settings(settings)
    prev = store.read_table("presence_gold", missing_ok=True).to_pandas()
    parts = [prev] if len(prev) else []
    if policy.gold_seed_file:
        parts.append(read_presence_seed(policy.gold_seed_file, tree))
    have = set(prev.loc[prev["source"] == CROWD, "image_id"]) if len(prev) else set()
    if len(have) < crowd_images:
        images = store.read_table("det_images", missing_ok=True).to_pandas()
        labels = store.read_table("presence_labels", missing_ok=True).to_pandas()
        new = crowd_gold(tree, images[~images["image_id"].isin(have)] if len(images) else images, labels,
                         n_images=crowd_images - len(have))
        parts.append(new)
    gold = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=GOLD_COLUMNS)
    gold = gold.drop_duplicates(["image_id", "node_id"], keep="first").sort_values(["image_id", "node_id"])
    store.write_table("presence_gold", gold.reset_index(drop=True))
    return {"controls": len(gold), "images": int(gold["image_id"].nunique()),
            "expert_images": int(gold.loc[gold["source"] == EXPERT, "image_id"].nunique()),
            "crowd_images": int(gold.loc[gold["source"] == CROWD, "image_id"].nunique())}


# ------------------------------------------------------------------------------------------------- CLI
def _cmd_plan(args: Any, settings: Any) -> int:
    from pipeline.store import store_from_settings

    result = run_presence_plan(store_from_settings(settings), settings)
    s = summarize(result.images, result.labels)
    kinds = result.actions["kind"].value_counts().to_dict() if len(result.actions) else {}
    print(f"{s['images']} images, {s['done']} fully annotated; next tasks: {kinds or 'none'}")
    return 0


def _cmd_status(args: Any, settings: Any) -> int:
    import json

    from pipeline.store import store_from_settings

    store = store_from_settings(settings)
    images = store.read_table("det_images", missing_ok=True).to_pandas()
    labels = store.read_table("presence_labels", missing_ok=True).to_pandas()
    s = summarize(images, labels)
    boxes = store.read_table("det_coverage", missing_ok=True).to_pandas()
    if len(boxes):
        s["boxes"] = {"pairs": len(boxes), "finished": int(boxes["state"].isin(["done", "capped", "gave_up"]).sum()),
                      "covered": int(boxes["covered"].sum()), "boxes_accepted": int(boxes["n_boxes"].sum())}
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    if not len(images):
        print(f"no presence loop state in {store.url}: run `synsetforge det sync` (or the presence DAG) first")
        return 0
    print(f"store: {store.url}")
    print(f"images: {s['images']}   fully annotated: {s['done']}   states: "
          + ", ".join(f"{k} {v}" for k, v in s["by_state"].items()))
    if s["present_per_done_image"] is not None:
        print(f"present classes per annotated image: {s['present_per_done_image']:.2f}")
    print(f"per image: {s['questions_per_image']:.1f} questions, {s['votes_per_image']:.1f} answers, "
          f"{s['worker_seconds_per_image']:.1f} worker-seconds; {s['pending_pairs']} pairs still undecided")
    if "boxes" in s:
        b = s["boxes"]
        print(f"boxes: {b['pairs']} (image, class) pairs, {b['finished']} finished, {b['covered']} covered, "
              f"{b['boxes_accepted']} boxes accepted")
    return 0


def _cmd_gold(args: Any, settings: Any) -> int:
    from pipeline.store import store_from_settings

    out = refresh_presence_gold(store_from_settings(settings), settings, crowd_images=args.crowd_images)
    print(f"presence_gold: {out['controls']} controls on {out['images']} images ({out['expert_images']} expert, "
          f"{out['crowd_images']} from the crowd's results)")
    return 0


def _cmd_release(args: Any, settings: Any) -> int:
    import json

    from pipeline.release.det import build_det_release
    from pipeline.store import store_from_settings

    det = det_settings(settings)
    m = build_det_release(store_from_settings(settings), args.version, parent=args.parent,
                          val=args.val if args.val is not None else det.val_images,
                          test=args.test if args.test is not None else det.test_images,
                          salt=settings.release.split_salt, config_digest=settings.digest())
    print(f"DET release {m['version']}: {json.dumps(m['splits'], sort_keys=True)} images, "
          f"{sum(c.get('boxes', 0) for c in m['classes'].values())} boxes of {len(m['classes'])} classes")
    return 0


def register_cli(subparsers: Any) -> None:
    from pipeline.release.cli import quota_arg

    parser = subparsers.add_parser("det", help="DET: presence of every class (a tree of questions), boxes of each "
                                   "present class, DET releases")
    sub = parser.add_subparsers(dest="det_command", metavar="SUBCOMMAND")
    p = sub.add_parser("status", help="images fully annotated, questions and seconds per image, box loop state")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("plan", help="replay the presence tables: QC, image states, the next questions")
    p.set_defaults(func=_cmd_plan)
    p = sub.add_parser("gold", help="rebuild presence_gold: the expert seed file (det.gold_seed_file) and the "
                       "crowd's confidently annotated images")
    p.add_argument("--crowd-images", type=int, default=10, help="images taken from the crowd's results (default 10)")
    p.set_defaults(func=_cmd_gold)
    p = sub.add_parser("release", help="build a DET release: fully annotated images with the boxes of every "
                       "present class (devkit export: `release export --format devkit`)")
    p.add_argument("--version", required=True)
    p.add_argument("--parent", help="keep this DET release's split of its images")
    p.add_argument("--val", type=quota_arg, help="val images: a count or a fraction (default det.val_images)")
    p.add_argument("--test", type=quota_arg, help="test images: a count or a fraction (default det.test_images)")
    p.set_defaults(func=_cmd_release)
    parser.subcommands = sub  # crowd.presence adds `det sync` and `det boxes` (the Label Studio side) here
