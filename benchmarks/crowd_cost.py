"""Crowd cost study: accuracy against the truth and votes per image, four verification schemes, one crowd.

    .venv/bin/python benchmarks/crowd_cost.py                # 100,000 tasks, 2,000 workers, both crowds
    .venv/bin/python benchmarks/crowd_cost.py --tasks 10000  # quicker

Every scheme sees the same answers: each task has a fixed sequence of 10 distinct workers and their
answers; a scheme that stops after n votes uses the first n. Crowds: "easy" = accuracy ~ Beta(8, 2),
10 % spammers answering at random; "hard" = Beta(4, 2), 20 % spammers; truth is 50/50 yes/no.
Schemes: fixed 10 votes + majority vote; fixed 10 votes + Dawid-Skene; ImageNet's per-synset
confidence table (100 synsets x 1,000 images, 10 % calibrated with 10 votes, the rest voted one at a
time until P >= 0.99 or <= 0.01 or 10 votes); ours (AdaptiveConsensus, rounds of pull -> aggregate -> push).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.qc import AdaptiveConsensus, ConfidenceTable, DawidSkene, MajorityVote  # noqa: E402
from pipeline.qc.base import NO, YES  # noqa: E402
from pipeline.qc.workers import FlagRules  # noqa: E402

MAX_VOTES = 10
N_CANDIDATES = 40  # distinct workers lined up per task; only a scheme that blocks workers goes past the 10th


def make_crowd(n_tasks: int, n_workers: int, a: float, b: float, spam: float, seed: int,
               adversarial: float = 0.0, activity: float = 0.0) -> dict[str, np.ndarray]:
    """Truth, the candidate workers of each task and their answers. `spam`: share of workers answering at
    random; `adversarial`: share (among the others) who flip the answer an honest worker of their accuracy
    would give. `activity` > 0: workers are drawn in proportion to a Zipf weight rank^-activity (ranks
    shuffled, independent of accuracy), so a few regulars answer much and most workers answer little, as on
    a real crowd; 0 = every worker equally often. Both options draw from their own streams, so a crowd
    without them is the same for a given seed."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n_tasks)
    acc = rng.beta(a, b, n_workers)
    spammer = rng.random(n_workers) < spam
    # distinct workers per task: offset + k * stride (mod W) with stride coprime to W
    strides = np.array([s for s in range(1, n_workers) if np.gcd(s, n_workers) == 1])
    off = rng.integers(0, n_workers, n_tasks)[:, None]
    stride = rng.choice(strides, n_tasks)[:, None]
    workers = (off + np.arange(N_CANDIDATES)[None, :] * stride) % n_workers
    if activity > 0:  # weighted sampling without replacement: the top N_CANDIDATES of log w + Gumbel noise
        rng_a = np.random.default_rng([seed, 1])
        logw = -activity * np.log(rng_a.permutation(n_workers) + 1.0)
        for lo in range(0, n_tasks, 1000):
            keys = logw[None, :] + rng_a.gumbel(size=(min(1000, n_tasks - lo), n_workers))
            top = np.argpartition(-keys, N_CANDIDATES - 1, axis=1)[:, :N_CANDIDATES]
            order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
            workers[lo:lo + len(top)] = np.take_along_axis(top, order, axis=1)
    correct = rng.random((n_tasks, N_CANDIDATES)) < acc[workers]
    answers = np.where(correct, truth[:, None], 1 - truth[:, None])
    coin = rng.integers(0, 2, (n_tasks, N_CANDIDATES))
    answers = np.where(spammer[workers], coin, answers)
    if adversarial > 0:
        rng_b = np.random.default_rng([seed, 2])
        adversary = ~spammer & (rng_b.random(n_workers) < adversarial / max(1.0 - spam, 1e-9))
        answers = np.where(adversary[workers], 1 - answers, answers)
    else:
        adversary = np.zeros(n_workers, dtype=bool)
    return {"truth": truth, "workers": workers, "answers": answers, "accuracy": acc, "spammer": spammer,
            "adversary": adversary}


def long_frame(crowd: dict[str, np.ndarray], n: np.ndarray | None = None, used: np.ndarray | None = None) -> pd.DataFrame:
    """Votes of the first n[t] candidates of each task, or of the candidates marked in `used`."""
    mask = used if used is not None else np.arange(N_CANDIDATES)[None, :] < n[:, None]
    t, k = np.nonzero(mask)
    return pd.DataFrame({"task": t, "worker": crowd["workers"][t, k],
                         "label": np.where(crowd["answers"][t, k] == 1, YES, NO)})


def fixed(crowd: dict[str, np.ndarray], method: str) -> tuple[float, float]:
    n = np.full(len(crowd["truth"]), MAX_VOTES)
    df = long_frame(crowd, n)
    model = MajorityVote() if method == "mv" else DawidSkene(n_iter=100)
    pred = model.fit(df).labels_.sort_index()
    return float(((pred.to_numpy() == YES).astype(int) == crowd["truth"]).mean()), float(MAX_VOTES)


def imagenet_table(crowd: dict[str, np.ndarray], per_synset: int = 1000, calib_share: float = 0.1,
                   threshold: float = 0.99) -> tuple[float, float]:
    truth, answers = crowd["truth"], crowd["answers"]
    n_tasks = len(truth)
    group = np.arange(n_tasks) // per_synset
    calib = (np.arange(n_tasks) % per_synset) < max(1, int(per_synset * calib_share))
    n_votes = np.full(n_tasks, MAX_VOTES)
    df = long_frame(crowd, np.where(calib, MAX_VOTES, 0))
    ct = ConfidenceTable(min_votes=MAX_VOTES, accept_at=threshold, reject_at=1 - threshold)
    ct.fit(df, groups=pd.Series(group[df["task"].unique()], index=df["task"].unique()))
    pred = np.zeros(n_tasks, dtype=int)
    pred[calib] = (ct.probas_.sort_index()[YES].to_numpy() > 0.5).astype(int)
    cum_yes = np.cumsum(answers, axis=1)
    rest = np.flatnonzero(~calib)
    decided = np.zeros(len(rest), dtype=bool)
    p_final = np.full(len(rest), 0.5)
    for k in range(1, MAX_VOTES + 1):  # one more vote per round for every undecided image
        y = cum_yes[rest, k - 1]
        p = np.array([ct.tables_[g][0][yy, k] for g, yy in zip(group[rest], y, strict=True)])
        p = np.where(np.isnan(p), 0.5, p)
        newly = ~decided & ((p >= threshold) | (p <= 1 - threshold) | (k == MAX_VOTES))
        n_votes[rest[newly]] = k
        p_final[newly] = p[newly]
        decided |= newly
    pred[rest] = (p_final > 0.5).astype(int)
    return float((pred == truth).mean()), float(n_votes.mean())


def ours(crowd: dict[str, np.ndarray], block: bool = False, **kw) -> tuple[float, float, int]:
    """Rounds of aggregate -> push (see `run_adaptive`): (accuracy, votes per image, rounds)."""
    model, used, rounds = run_adaptive(crowd, block, **kw)
    pred = (model.decisions_["p_yes"].reindex(range(len(crowd["truth"]))).to_numpy() > 0.5).astype(int)
    return float((pred == crowd["truth"]).mean()), float(used.sum(axis=1).mean()), rounds


def run_adaptive(crowd: dict[str, np.ndarray], block: bool = False, model: AdaptiveConsensus | None = None,
                 **kw) -> tuple[AdaptiveConsensus, np.ndarray, int]:
    """Rounds of aggregate -> push: each pending task gets n_more votes from its next candidates; with
    `block`, candidates the model has flagged so far are skipped (the crowd stage removes them).
    Returns the last fit model, the (task, candidate) mask of votes used and the number of rounds."""
    n_tasks = len(crowd["truth"])
    used = np.zeros((n_tasks, N_CANDIDATES), dtype=bool)
    ptr = np.zeros(n_tasks, dtype=np.int64)  # next candidate position per task
    model = model or AdaptiveConsensus(max_votes=MAX_VOTES, **kw)
    rounds = 0
    cols = np.arange(N_CANDIDATES)[None, :]
    while True:
        rounds += 1
        model.fit(long_frame(crowd, used=used), tasks=range(n_tasks))
        more = model.decisions_["n_more"].reindex(range(n_tasks)).to_numpy()
        if not more.any():
            break
        allowed = cols >= ptr[:, None]
        if block and len(model.blocked_):
            blocked = np.zeros(crowd["workers"].max() + 1, dtype=bool)
            blocked[model.blocked_.astype(int)] = True
            allowed &= ~blocked[crowd["workers"]]
        take = allowed & (np.cumsum(allowed, axis=1) <= more[:, None])
        used |= take
        last = np.where(take.any(axis=1), N_CANDIDATES - 1 - np.argmax(take[:, ::-1], axis=1), ptr - 1)
        ptr = np.where(more > 0, np.maximum(last + 1, ptr), ptr)
        if not take.any():
            break  # every candidate left is blocked
    return model, used, rounds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2_000)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--crowds", default="easy,hard")
    ap.add_argument("--accept-at", type=float, default=0.995)
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--initial-votes", type=int, default=2)
    ap.add_argument("--block-below", type=float, default=0.7, help="block workers estimated under this accuracy")
    ap.add_argument("--schemes", default="mv,ds,imagenet,ours,ours-block")
    args = ap.parse_args(argv)
    crowds = {"easy": (8, 2, 0.10), "hard": (4, 2, 0.20)}
    rows = []
    for name in args.crowds.split(","):
        a, b, spam = crowds[name]
        crowd = make_crowd(args.tasks, args.workers, a, b, spam, args.seed)
        kw = dict(accept_at=args.accept_at, reject_at=1 - args.accept_at, max_batch=args.max_batch,
                  initial_votes=args.initial_votes)
        schemes = {
            "mv": ("fixed 10 + majority vote", lambda c: fixed(c, "mv")),
            "ds": ("fixed 10 + Dawid-Skene", lambda c: fixed(c, "ds")),
            "imagenet": ("ImageNet confidence table (P>=0.99)", imagenet_table),
            "ours": (f"ours: adaptive DS, P>={args.accept_at}, no blocking", lambda c, kw=kw: ours(c, **kw)),
            "ours-block": (f"ours: adaptive DS, P>={args.accept_at}, blocks flagged + acc<{args.block_below}",
                           lambda c, kw=kw: ours(c, block=True, rules=FlagRules(min_accuracy=args.block_below), **kw)),
        }
        for key in args.schemes.split(","):
            label, fn = schemes[key]
            t0 = time.perf_counter()
            res = fn(crowd)
            rows.append({"crowd": f"{name}: Beta({a},{b}), {int(spam * 100)}% spammers", "scheme": label,
                         "accuracy %": round(100 * res[0], 2), "votes/image": round(res[1], 2),
                         "rounds": res[2] if len(res) > 2 else (1 if "fixed" in label else MAX_VOTES),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(rows[-1], file=sys.stderr, flush=True)
    df = pd.DataFrame(rows)
    print(f"\n{args.tasks:,} tasks, {args.workers:,} workers, truth 50/50, seed {args.seed}\n")
    print(df.to_markdown(index=False) if _has_tabulate() else _md(df))
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def _md(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
