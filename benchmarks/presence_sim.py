"""DET presence annotation: human questions and seconds per image, the question tree against asking every class.

    .venv/bin/python benchmarks/presence_sim.py                 # 1,000 images, 200 classes, 3 seeds
    .venv/bin/python benchmarks/presence_sim.py --images 300    # quicker

The world: 200 classes under a three-level hierarchy (10 top-level groups of 2-3 sub-groups of 6-10 classes), the
question tree built from it by `pipeline.presence.build_question_tree` as for a WordNet vocabulary. Images are
sparse and correlated: each shows one of 16 scenes; the number of objects is 1 + Poisson(1.8) (about 2.8, ILSVRC
2014 DET val's figure), each drawn from its scene's ~12 typical classes (which sit in two or three groups) with
probability 0.85, else from all classes. Workers: the existing crowd's error model (accuracy Beta(8, 2), 10 %
spammers answering at random; benchmarks/crowd_cost.py), the same for every scheme. QC: the existing
AdaptiveConsensus over (image, question) pairs in rounds (two votes, then more until P >= 0.99 or <= 0.01, at
most 10), exactly as the crowd loop decides verification pairs; the answer is applied to the image's state when
its pair is decided.

Schemes: "flat" asks every class of every image; "tree" asks one yes/no question at a time per image from the
question tree (the next by `pipeline.presence.next_question`: expected labels settled per second, co-occurrence
learned online from the images finished so far; two questions per image per round); "group" asks the open
children of a node as one checklist (a "small group of related questions").

Assumed human times (not measurements; change them with --t-question / --t-group-base / --t-group-item): 2.0 s
per yes/no question about a whole image at any level of the tree (Deng et al. report people answer the broad
"is there an animal?" kind quickly), a checklist of k related classes 2.0 s + 0.8 s x k.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.presence import (  # noqa: E402
    YES,
    Cooccurrence,
    ImageState,
    QuestionTimes,
    QuestionTree,
    build_question_tree,
    decide_presence,
    next_question,
)
from pipeline.qc import AdaptiveConsensus  # noqa: E402
from pipeline.qc.base import NO as NO_LABEL  # noqa: E402
from pipeline.qc.base import YES as YES_LABEL  # noqa: E402


def make_world(n_images: int, seed: int, n_classes: int = 200) -> dict:
    rng = np.random.default_rng(seed)
    pairs, classes, k = [], [], 0
    for g in range(10):
        for s in range(int(rng.integers(2, 4))):
            sub = f"s{g}_{s}"
            pairs.append((sub, f"g{g}"))
            for _ in range(int(rng.integers(6, 11))):
                if k < n_classes:
                    classes.append(f"c{k:03d}")
                    pairs.append((classes[-1], sub))
                    k += 1
        pairs.append((f"g{g}", "root"))
    while k < n_classes:  # top up the last sub-group
        classes.append(f"c{k:03d}")
        pairs.append((classes[-1], sub))
        k += 1
    edges = pd.DataFrame(pairs, columns=["child_wnid", "parent_wnid"])
    tree = QuestionTree.from_table(build_question_tree(classes, edges, max_share=0.5))
    cls_nodes = tree.classes
    group_of = {c: tree.ancestors[c][-1] if tree.ancestors[c] else c for c in cls_nodes}
    by_group: dict[int, list[int]] = {}
    for c, g in group_of.items():
        by_group.setdefault(g, []).append(int(c))
    groups = sorted(by_group)
    scenes = []
    for _ in range(16):
        gs = rng.choice(groups, size=int(rng.integers(2, 4)), replace=False)
        pool = np.concatenate([by_group[g] for g in gs])
        scenes.append(rng.choice(pool, size=min(12, len(pool)), replace=False))
    present = np.zeros((n_images, len(tree)), dtype=bool)
    for i in range(n_images):
        scene = scenes[int(rng.integers(len(scenes)))]
        n_obj = 1 + int(rng.poisson(1.8))
        for _ in range(n_obj):
            c = int(rng.choice(scene)) if rng.random() < 0.85 else int(rng.choice(cls_nodes))
            present[i, c] = True
            present[i, tree.ancestors[c]] = True
    return {"tree": tree, "present": present}


class Crowd:
    """Workers with the existing error model; each answer is a fresh draw (a worker answers a pair once)."""

    def __init__(self, seed: int, n_workers: int = 500, spam: float = 0.10):
        self.rng = np.random.default_rng([seed, 7])
        self.acc = self.rng.beta(8, 2, n_workers)
        self.spammer = self.rng.random(n_workers) < spam
        self.n = n_workers

    def answers(self, truth: np.ndarray, n: np.ndarray, used: list[set[int]]) -> list[tuple[int, int, int]]:
        """(pair index, worker, answer 0/1) for n[k] new distinct workers on pair k."""
        out = []
        for k in np.flatnonzero(n):
            for _ in range(int(n[k])):
                w = int(self.rng.integers(self.n))
                while w in used[k]:
                    w = int(self.rng.integers(self.n))
                used[k].add(w)
                if self.spammer[w]:
                    a = int(self.rng.integers(2))
                else:
                    a = int(truth[k]) if self.rng.random() < self.acc[w] else 1 - int(truth[k])
                out.append((int(k), w, a))
        return out


def run_scheme(world: dict, scheme: str, seed: int, times: QuestionTimes, per_round: int = 2,
               max_rounds: int = 400) -> dict:
    tree, present = world["tree"], world["present"]
    n_img = len(present)
    crowd = Crowd(seed)
    states = [ImageState(tree) for _ in range(n_img)]
    model = Cooccurrence(tree)
    pair_img, pair_node, pair_cost = [], [], []  # one entry per (image, question) pair asked
    pair_open: list[bool] = []
    used: list[set[int]] = []
    votes: list[tuple[int, int, int]] = []
    n_more = np.zeros(0, dtype=np.int64)
    done = np.zeros(n_img, dtype=bool)
    asking: list[set[int]] = [set() for _ in range(n_img)]
    qc = AdaptiveConsensus(accept_at=0.99, reject_at=0.01, max_votes=10, initial_votes=2)

    def new_pair(i: int, node: int, cost: float) -> None:
        pair_img.append(i)
        pair_node.append(node)
        pair_cost.append(cost)
        pair_open.append(True)
        used.append(set())
        asking[i].add(node)

    rounds = 0
    while not done.all() and rounds < max_rounds:
        rounds += 1
        before = len(pair_img)
        for i in np.flatnonzero(~done):
            s = states[i]
            if scheme == "flat":
                if rounds == 1:
                    for c in tree.classes:
                        new_pair(i, int(c), times.question)
                continue
            if asking[i]:
                continue
            if scheme == "group":
                # the open set: unknown children of the deepest known-yes nodes (top level first)
                unknown = s.known == -1
                tops = [n for n in np.flatnonzero(unknown) if tree.parent[n] < 0]
                group = tops or [n for n in np.flatnonzero(unknown) if s.known[tree.parent[n]] == YES]
                if group:
                    cost = times.group(len(group)) / len(group)  # one checklist, shared by its items
                    for n in group:
                        new_pair(i, int(n), cost)
                continue
            picked: list[int] = []
            trial = ImageState(tree)
            trial.known = s.known.copy()
            for _ in range(per_round):
                q = next_question(trial, model, times)
                if q is None:
                    break
                picked.append(q)
                trial.known[q] = -2  # taken this round: not askable again
                trial.known[tree.anc[:, q]] = np.where(trial.known[tree.anc[:, q]] == -1, -2,
                                                       trial.known[tree.anc[:, q]])
            for q in picked:
                new_pair(i, q, times.question)
        n_more = np.concatenate([n_more, np.full(len(pair_img) - before, 2, dtype=np.int64)])
        truth = present[np.array(pair_img), np.array(pair_node)]
        votes += crowd.answers(truth, n_more, used)
        v = np.array(votes)
        long = pd.DataFrame({"task": v[:, 0], "worker": v[:, 1], "label": np.where(v[:, 2] == 1, YES_LABEL, NO_LABEL)})
        open_idx = np.flatnonzero(pair_open)
        groups = pd.Series(np.array(pair_node)[open_idx].astype(str), index=open_idx)
        qc.fit(long[long["task"].isin(set(open_idx.tolist()))], tasks=open_idx.tolist(), groups=groups)
        dec = qc.decisions_
        nodes = np.array(pair_node)[dec.index.to_numpy(dtype=np.int64)]
        rate = model.rate()
        status, more = decide_presence(dec["p_yes"].to_numpy(), dec["n_votes"].to_numpy(),
                                       float(dec["p_yes"].mean()), rate[nodes], max_votes=10)
        n_more = np.zeros(len(pair_img), dtype=np.int64)
        for k, st, m in zip(dec.index.to_numpy(dtype=np.int64), status, more, strict=True):
            k = int(k)
            if st == "pending":
                n_more[k] = m
                continue
            pair_open[k] = False
            i, node = pair_img[k], pair_node[k]
            asking[i].discard(node)
            if states[i].known[node] == -1:
                states[i].answer(node, st == "accepted")
            if states[i].done() and not done[i]:
                done[i] = True
                model.add(states[i].present())
    v = np.array(votes)
    cost = np.array(pair_cost)[v[:, 0]]
    found = np.zeros_like(present)
    for i, s in enumerate(states):
        found[i, s.present()] = True
    cls = tree.is_class
    tp = (found & present)[:, cls].sum()
    return {"scheme": scheme, "images": n_img, "rounds": rounds, "done": int(done.sum()),
            "questions_per_image": len(pair_img) / n_img, "votes_per_image": len(votes) / n_img,
            "seconds_per_image": float(cost.sum()) / n_img,
            "recall": tp / max(present[:, cls].sum(), 1), "precision": tp / max(found[:, cls].sum(), 1),
            "objects_per_image": present[:, cls].sum() / n_img}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--t-question", type=float, default=2.0)
    ap.add_argument("--t-group-base", type=float, default=2.0)
    ap.add_argument("--t-group-item", type=float, default=0.8)
    args = ap.parse_args()
    times = QuestionTimes(args.t_question, args.t_group_base, args.t_group_item)
    rows = []
    for seed in range(args.seeds):
        world = make_world(args.images, seed)
        for scheme in ("flat", "tree", "group"):
            t0 = time.perf_counter()
            r = run_scheme(world, scheme, seed, times)
            r["seed"], r["wall_s"] = seed, round(time.perf_counter() - t0, 1)
            rows.append(r)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    df = pd.DataFrame(rows)
    mean = df.groupby("scheme")[["questions_per_image", "votes_per_image", "seconds_per_image", "recall",
                                 "precision", "objects_per_image", "rounds"]].mean()
    flat = mean.loc["flat", "seconds_per_image"]
    mean["seconds_vs_flat"] = flat / mean["seconds_per_image"]
    print()
    print(f"mean over {args.seeds} seeds, {args.images} images x 200 classes; assumed times: question "
          f"{times.question} s, checklist {times.group_base} s + {times.group_item} s per item")
    print(mean.round(4).to_string())


if __name__ == "__main__":
    main()
