"""The adaptive rule on integer codes: chunks of votes in, posteriors, worker model and decisions out.

One implementation serves three callers:

- `AdaptiveConsensus.fit` (all votes as one chunk in memory);
- a full QC refit (`pipeline.qc.stage`, `synsetforge qc --full`): the votes of all synsets as chunks, each
  chunk holding whole tasks (a few synsets), streamed from a spill folder on disk, so memory follows the
  number of tasks and workers, not of votes;
- an incremental QC round: only the synsets that received new votes form the chunk, and the rest of the crowd
  enters as `Totals`, the sums the worker model needs from every other task (per worker: answers, gold answers,
  soft counts under both fits, agreement moments; per fit: the summed posteriors behind the class share).

Every model quantity is a sum over tasks, so the totals of disjoint blocks of tasks add up: the incremental
round subtracts what the re-decided synsets contributed last time (from their old votes and the posteriors
`qc_pairs` stored for them) and adds what they contribute now. The Dawid-Skene fits then run on the block
alone with each worker's rest as extra pseudo-counts (`DawidSkene(prior_matrix=(W, 2, 2), class_counts=...)`):
the same fixed point a full fit reaches when the other tasks' posteriors do not move. What an incremental
round does not redo: the other synsets' posteriors under the updated worker model (they move when those
synsets get votes, or at the next full refit), and the agreement moments of the re-decided synsets under the
flags they were computed with (they are subtracted under the flags of the last round; workers whose flags
changed in between leave a small error in the prior until the next full refit).

The steps (as `AdaptiveConsensus` describes them): gold failures; fit A (every worker not failing gold, fixed
prior) -> worker table and flags; fit B (unflagged workers; calibrated: the crowd's prior, class share held if
it drifts, leave-one-out posterior); stopping rule. Array shapes: T tasks (the chunks' task codes are
0..T-1), W workers; labels are 0 = no, 1 = yes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.qc.dawid_skene import EPS, DawidSkene
from pipeline.qc.prior import AgreementStats, CrowdPrior, agreement_stats, fixed_prior, prior_from_stats
from pipeline.qc.workers import WORKER_COLUMNS, FlagRules, flag_reasons, wilson_upper

K = 2
DRIFT_LOG_ODDS = float(np.log(4.0))  # fitted class share this far (odds ratio 4) from the moments' share: held there


def logit(p: np.ndarray | float) -> Any:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return np.log(p / (1 - p))


# ----- chunks of integer-coded votes ------------------------------------------------------------------------
class Chunks:
    """Votes as chunks of (task, worker, label) arrays, each chunk holding all votes of its tasks; task codes
    are global (0..n_tasks-1). In memory (`Chunks.of`) or spilled to a folder (`SpilledChunks`)."""

    n_tasks: int
    n_workers: int

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:  # pragma: no cover - interface
        raise NotImplementedError

    def source(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return iter(self)

    def select(self, worker_mask: np.ndarray) -> Chunks:
        """The votes of the workers where `worker_mask` is True."""
        return _Selected(self, worker_mask)

    def per_task(self, weights: str | None = None) -> np.ndarray:
        """Votes per task (weights "label": yes votes per task)."""
        out = np.zeros(self.n_tasks)
        for t, _w, lab in self:
            out += np.bincount(t, weights=None if weights is None else lab.astype(np.float64), minlength=self.n_tasks)
        return out

    @staticmethod
    def of(task: np.ndarray, worker: np.ndarray, label: np.ndarray, n_tasks: int, n_workers: int) -> Chunks:
        return _InMemory([(np.asarray(task, np.int64), np.asarray(worker, np.int64), np.asarray(label, np.int64))],
                         n_tasks, n_workers)


class _InMemory(Chunks):
    def __init__(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_tasks: int, n_workers: int):
        self.parts, self.n_tasks, self.n_workers = parts, n_tasks, n_workers

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return iter(self.parts)

    def select(self, worker_mask: np.ndarray) -> Chunks:
        parts = []
        for t, w, lab in self.parts:
            m = worker_mask[w]
            parts.append((t, w, lab) if m.all() else (t[m], w[m], lab[m]))
        return _InMemory(parts, self.n_tasks, self.n_workers)


class _Selected(Chunks):
    def __init__(self, base: Chunks, worker_mask: np.ndarray):
        self.base, self.mask = base, worker_mask
        self.n_tasks, self.n_workers = base.n_tasks, base.n_workers

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for t, w, lab in self.base:
            m = self.mask[w]
            yield t[m], w[m], lab[m]


class SpilledChunks(Chunks):
    """Chunks written to a local folder (one .npy triple per chunk, task codes local to the chunk plus an
    offset), read back one at a time on every pass: memory holds one chunk, whatever the number of votes."""

    def __init__(self, folder: str | os.PathLike[str] | None = None):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="sf-qc-chunks-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.offsets: list[int] = []
        self.n_tasks, self.n_workers, self.n_votes = 0, 0, 0

    def add(self, task: np.ndarray, worker: np.ndarray, label: np.ndarray, n_tasks: int) -> None:
        """A chunk of `n_tasks` tasks (local codes 0..n_tasks-1), which get the next global codes."""
        i = len(self.offsets)
        np.save(self.folder / f"t{i:06d}.npy", np.asarray(task, np.int32))
        np.save(self.folder / f"w{i:06d}.npy", np.asarray(worker, np.int32))
        np.save(self.folder / f"l{i:06d}.npy", np.asarray(label, np.int8))
        self.offsets.append(self.n_tasks)
        self.n_tasks += int(n_tasks)
        self.n_votes += len(task)
        if len(worker):
            self.n_workers = max(self.n_workers, int(np.max(worker)) + 1)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for i, off in enumerate(self.offsets):
            t = np.load(self.folder / f"t{i:06d}.npy").astype(np.int64) + off
            yield t, np.load(self.folder / f"w{i:06d}.npy").astype(np.int64), np.load(self.folder / f"l{i:06d}.npy")


# ----- what the worker model needs from a block of tasks ----------------------------------------------------
@dataclass
class Totals:
    """Sums over a set of tasks: per worker (arrays indexed by worker code) and per fit (scalars).

    `all_yes` / `all_no`: the summed P(yes) of fit A over the worker's yes / no answers (every answer, failed
    workers' too: their sensitivity and specificity are read from them); `kept_yes` / `kept_no`: the same under
    fit B; `agree`: the agreement moments of the kept (unflagged) answers; `all_tasks` / `all_p` (and `kept_*`):
    how many tasks fit A (B) had votes on and their summed P(yes), the class share's sums."""

    n_votes: np.ndarray
    n_yes: np.ndarray
    gold_n: np.ndarray
    gold_correct: np.ndarray
    all_yes: np.ndarray
    all_no: np.ndarray
    kept_yes: np.ndarray
    kept_no: np.ndarray
    agree: AgreementStats
    all_tasks: float = 0.0
    all_p: float = 0.0
    kept_tasks: float = 0.0
    kept_p: float = 0.0

    WORKER_FIELDS = ("n_votes", "n_yes", "gold_n", "gold_correct", "all_yes", "all_no", "kept_yes", "kept_no")
    SCALARS = ("all_tasks", "all_p", "kept_tasks", "kept_p")

    @classmethod
    def zeros(cls, n_workers: int) -> Totals:
        z = lambda: np.zeros(n_workers)  # noqa: E731
        return cls(*(z() for _ in cls.WORKER_FIELDS), agree=AgreementStats(z(), z(), z(), z()))

    @property
    def n_workers(self) -> int:
        return len(self.n_votes)

    def resized(self, n_workers: int) -> Totals:
        if n_workers == self.n_workers:
            return self
        if n_workers < self.n_workers:
            raise ValueError("worker codes never shrink")
        pad = lambda a: np.concatenate([a, np.zeros(n_workers - len(a))])  # noqa: E731
        return Totals(*(pad(getattr(self, f)) for f in self.WORKER_FIELDS),
                      agree=AgreementStats(*(pad(a) for a in self.agree.arrays())),
                      **{s: getattr(self, s) for s in self.SCALARS})

    def _combine(self, other: Totals, sign: float) -> Totals:
        n = max(self.n_workers, other.n_workers)
        a, b = self.resized(n), other.resized(n)
        return Totals(*(getattr(a, f) + sign * getattr(b, f) for f in self.WORKER_FIELDS),
                      agree=AgreementStats(*(x + sign * y for x, y in zip(a.agree.arrays(), b.agree.arrays(), strict=True))),
                      **{s: getattr(a, s) + sign * getattr(b, s) for s in self.SCALARS})

    def __add__(self, other: Totals) -> Totals:
        return self._combine(other, 1.0)

    def __sub__(self, other: Totals) -> Totals:
        return self._combine(other, -1.0)

    def soft_counts(self, fit: str) -> np.ndarray:
        """(W, 2, 2) [observed, true] soft counts of fit "all" or "kept"."""
        yes_p, no_p = (self.all_yes, self.all_no) if fit == "all" else (self.kept_yes, self.kept_no)
        n_no = self.n_votes - self.n_yes
        out = np.empty((self.n_workers, K, K))
        out[:, 0, 0], out[:, 0, 1] = n_no - no_p, no_p
        out[:, 1, 0], out[:, 1, 1] = self.n_yes - yes_p, yes_p
        return np.clip(out, 0.0, None)  # sums of subtracted blocks can undershoot by rounding

    def class_counts(self, fit: str) -> np.ndarray:
        tasks, p = (self.all_tasks, self.all_p) if fit == "all" else (self.kept_tasks, self.kept_p)
        return np.clip(np.array([tasks - p, p]), 0.0, None)

    def to_frame(self) -> pd.DataFrame:
        cols = {f: getattr(self, f) for f in self.WORKER_FIELDS}
        cols.update({f"agree_{n}": a for n, a in zip(("n", "s1", "s2", "yes"), self.agree.arrays(), strict=True)})
        return pd.DataFrame(cols)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, scalars: dict[str, float]) -> Totals:
        """Rows in worker-code order (as `to_frame` wrote them)."""
        arr = lambda c: frame[c].to_numpy(np.float64)  # noqa: E731
        return cls(*(arr(f) for f in cls.WORKER_FIELDS), agree=AgreementStats(*(arr(f"agree_{n}") for n in
                                                                                ("n", "s1", "s2", "yes"))),
                   **{s: float(scalars.get(s, 0.0)) for s in cls.SCALARS})


def counts_totals(chunks: Chunks, gold: np.ndarray) -> Totals:
    """Answers, yes answers and gold answers per worker (the parts of Totals that need no posterior)."""
    out = Totals.zeros(chunks.n_workers)
    wn = chunks.n_workers
    for t, w, lab in chunks:
        out.n_votes += np.bincount(w, minlength=wn)
        out.n_yes += np.bincount(w, weights=lab.astype(np.float64), minlength=wn)
        g = gold[t]
        is_g = g >= 0
        out.gold_n += np.bincount(w[is_g], minlength=wn)
        out.gold_correct += np.bincount(w[is_g], weights=(lab[is_g] == g[is_g]).astype(np.float64), minlength=wn)
    return out


def soft_totals(chunks: Chunks, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Summed P(yes) over each worker's yes answers and over their no answers."""
    wn = chunks.n_workers
    yes_p, no_p = np.zeros(wn), np.zeros(wn)
    for t, w, lab in chunks:
        pt = p[t]
        yes = lab == 1
        yes_p += np.bincount(w[yes], weights=pt[yes], minlength=wn)
        no_p += np.bincount(w[~yes], weights=pt[~yes], minlength=wn)
    return yes_p, no_p


def agreement_totals(chunks: Chunks) -> AgreementStats:
    """Agreement moments per worker; each chunk holds whole tasks, so per-chunk sums add up."""
    wn = chunks.n_workers
    z = np.zeros(wn)
    total = AgreementStats(z, z.copy(), z.copy(), z.copy())
    for t, w, lab in chunks:
        if len(t):
            lo = int(t.min())
            total = total + agreement_stats(t - lo, w, lab, n_workers=wn, n_tasks=int(t.max()) - lo + 1)
    return total


def block_totals(chunks: Chunks, gold: np.ndarray, p_all: np.ndarray, p_kept: np.ndarray, keep_w: np.ndarray,
                 in_all: np.ndarray, in_kept: np.ndarray) -> Totals:
    """Everything a block of tasks contributes to the worker model, from its votes, its per-task posteriors of
    both fits and which tasks each fit had votes on (what `qc_pairs` stores, so a later round can subtract it)."""
    out = counts_totals(chunks, gold)
    out.all_yes, out.all_no = soft_totals(chunks, p_all)
    out.kept_yes, out.kept_no = soft_totals(chunks, p_kept)
    out.agree = agreement_totals(chunks.select(keep_w))
    out.all_tasks, out.all_p = float(in_all.sum()), float(p_all[in_all].sum())
    out.kept_tasks, out.kept_p = float(in_kept.sum()), float(p_kept[in_kept].sum())
    return out


# ----- the model ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    accept_at: float = 0.99
    reject_at: float = 0.01
    max_votes: int = 10
    initial_votes: int = 2
    max_batch: int | None = None
    budget_per_group: int | None = None
    prior_accuracy: float = 0.8
    prior_strength: float = 4.0
    n_iter: int = 100
    tol: float = 1e-6
    rules: FlagRules = field(default_factory=FlagRules)
    class_prior_strength: float = 2.0
    calibrated: bool = True
    prior_min_workers: int = 20

    def fixed(self, reason: str = "") -> CrowdPrior:
        return fixed_prior(self.prior_accuracy, self.prior_strength, reason)


@dataclass
class Fit:
    """Per task (length T): n_votes, n_yes, n_ok / n_ok_yes (votes of workers not failing gold: what the ds, mv
    and confidence-table methods use), n_kept (votes of unflagged workers), in_all / in_kept (the fit had votes
    on it), p_all (fit A's P(yes): the ds method's posterior), p_kept (fit B's), p (the adaptive rule's: fit B
    leave-one-out when calibrated). Per worker: totals (block + rest), failed, table (the workers table rows,
    in code order, with n_votes > 0). Scalars: prior, class_note, prior_yes (fit B's class share), step."""

    n_votes: np.ndarray
    n_yes: np.ndarray
    n_ok: np.ndarray
    n_ok_yes: np.ndarray
    n_kept: np.ndarray
    in_all: np.ndarray
    in_kept: np.ndarray
    p_all: np.ndarray
    p_kept: np.ndarray
    p: np.ndarray
    totals: Totals
    block: Totals
    failed: np.ndarray
    table: pd.DataFrame
    prior: CrowdPrior
    class_note: str
    prior_yes: float
    step: float
    prior_all: float = 0.5  # fit A's class share


def _class_share(counts: np.ndarray, strength: float) -> float:
    """The class prior a Dawid-Skene fit would give with no votes of its own: the rest's sums."""
    return float((counts[1] + strength) / (counts.sum() + 2 * strength)) if counts.sum() + strength > 0 else 0.5


def fit_model(chunks: Chunks, gold: np.ndarray, params: Params, rest: Totals | None = None,
              names: Sequence[str] | None = None) -> Fit:
    """Fit the worker model on the chunks' tasks, the rest of the crowd given as `rest` (None: nothing else).
    `gold`: per task -1 (no known answer), 0 or 1. `names`: worker names by code (for the table)."""
    w_n = chunks.n_workers
    rest = (rest or Totals.zeros(w_n)).resized(w_n)
    gold = np.asarray(gold, dtype=np.int64)
    block = counts_totals(chunks, gold)
    n_votes, n_yes = chunks.per_task(), chunks.per_task("label")
    r = params.rules
    gold_n, gold_correct = rest.gold_n + block.gold_n, rest.gold_correct + block.gold_correct
    failed = (gold_n >= r.min_gold) & (wilson_upper(gold_correct, gold_n) < r.gold_min_accuracy)

    # fit A: every worker not failing gold, the fixed prior
    ok = chunks.select(~failed)
    n_ok, n_ok_yes = ok.per_task(), ok.per_task("label")
    in_all = n_ok > 0
    base_a = params.fixed().matrix(K)
    p_all, prior_all = _dawid_skene(ok, gold, in_all, base_a[None] + rest.soft_counts("all"), rest.class_counts("all"),
                                    params, None)
    block.all_yes, block.all_no = soft_totals(chunks, p_all)
    block.all_tasks, block.all_p = float(in_all.sum()), float(p_all[in_all].sum())
    partial = rest + block  # counts and fit A so far
    table = worker_table_from_totals(partial, params, names)
    keep_w = table["votes_used"].to_numpy(bool)

    # fit B: unflagged workers; calibrated: the crowd's prior, class share held when it drifts, leave-one-out
    kept = chunks.select(keep_w)
    n_kept = kept.per_task()
    in_kept = n_kept > 0
    block.agree = agreement_totals(kept)
    agree = rest.agree + block.agree
    keep_total = float(((rest.n_votes + block.n_votes) * keep_w).sum())
    if not params.calibrated:
        prior = params.fixed("calibrated is off")
    elif keep_total == 0:
        prior = params.fixed("no answers yet")
    else:
        prior = prior_from_stats(AgreementStats(*(a * keep_w for a in agree.arrays())), params.prior_accuracy,
                                 params.prior_strength, min_workers=params.prior_min_workers)
    base_b = prior.matrix(K)
    pseudo_b = base_b[None] + rest.soft_counts("kept")
    class_counts_b = rest.class_counts("kept")
    p_kept, prior_yes, ds = _dawid_skene(kept, gold, in_kept, pseudo_b, class_counts_b, params, None, with_model=True)
    class_note = "fitted"
    if prior.source == "crowd" and keep_total > 0:
        if abs(float(logit(prior_yes)) - float(logit(prior.yes_share))) > DRIFT_LOG_ODDS:
            # weak votes leave the class share nearly unconstrained, and EM can slide to "every image is bad"
            # (each worker's yes-rate then fits one column of their matrix): hold it at the moments
            fitted = prior_yes
            p_kept, prior_yes, ds = _dawid_skene(kept, gold, in_kept, pseudo_b, class_counts_b, params,
                                                 prior.yes_share, with_model=True)
            class_note = f"held at the crowd's estimate {prior.yes_share:.3f} (the fit drifted to {fitted:.3f})"
    if keep_total == 0:
        prior_yes = 0.5
    block.kept_yes, block.kept_no = soft_totals(chunks, p_kept)
    block.kept_tasks, block.kept_p = float(in_kept.sum()), float(p_kept[in_kept].sum())
    totals = rest + block
    p = p_kept.copy()
    if params.calibrated and in_kept.any():
        pinned = (gold >= 0) & in_kept
        p = loo_posterior(kept, p_kept, totals.soft_counts("kept") * keep_w[:, None, None], base_b,
                          np.array([1 - prior_yes, prior_yes]) if ds is None else ds.priors_array_, pinned)
        p = np.where(in_kept, p, prior_yes)
    p = np.where(in_kept, p, prior_yes)
    # what one more vote from a typical (vote-weighted) unflagged worker adds, in log-odds
    kn = totals.n_votes * keep_w
    correct = (totals.kept_yes + (totals.n_votes - totals.n_yes) - totals.kept_no) * keep_w
    acc = float(correct.sum() / kn.sum()) if kn.sum() > 0 else params.prior_accuracy
    step = float(logit(min(max(acc, 0.6), 0.95)))
    return Fit(n_votes=n_votes.astype(np.int64), n_yes=n_yes.astype(np.int64), n_ok=n_ok.astype(np.int64),
               n_ok_yes=n_ok_yes.astype(np.int64), n_kept=n_kept.astype(np.int64), in_all=in_all, in_kept=in_kept,
               p_all=p_all, p_kept=p_kept, p=p, totals=totals, block=block, failed=failed, table=table, prior=prior,
               class_note=class_note, prior_yes=float(prior_yes), step=step, prior_all=float(prior_all))


def _dawid_skene(chunks: Chunks, gold: np.ndarray, present: np.ndarray, pseudo: np.ndarray, class_counts: np.ndarray,
                 params: Params, held: float | None, with_model: bool = False) -> Any:
    """P(yes) per task of a binary Dawid-Skene fit on `chunks` (tasks without votes in it: the class share),
    gold tasks with votes pinned; and the class share (and the fitted model, or None without votes)."""
    t_n = chunks.n_tasks
    if not present.any():
        share = held if held is not None else _class_share(class_counts, params.class_prior_strength)
        out = (np.full(t_n, share), share)
        return (*out, None) if with_model else out
    ds = DawidSkene(n_iter=params.n_iter, tol=params.tol, labels=(0, 1),
                    class_prior_strength=params.class_prior_strength, prior_matrix=pseudo,
                    class_prior=None if held is None else (1.0 - held, held), class_counts=class_counts)
    g = np.flatnonzero((gold >= 0) & present)
    ds.fit_stream(chunks.source, t_n, chunks.n_workers, K, true_labels=(g, gold[g]) if len(g) else None)
    share = float(ds.priors_array_[1])
    p = np.where(present, ds.probas_array_[:, 1], share)
    return (p, share, ds) if with_model else (p, share)


def loo_posterior(chunks: Chunks, p: np.ndarray, counts: np.ndarray, pseudo: np.ndarray, priors: np.ndarray,
                  pinned: np.ndarray | None = None) -> np.ndarray:
    """P(yes) per task, each vote weighed by its worker's matrix estimated without that task: `counts` (W, 2, 2)
    [observed, true] are the worker's soft counts over all their tasks under the posteriors `p`, the task's own
    share is taken out, `pseudo` ((2, 2) or (W, 2, 2)) added. Tasks in `pinned` (gold) keep `p`."""
    pseudo = np.asarray(pseudo, dtype=np.float64)
    col = counts.sum(axis=1) + (pseudo.sum(axis=-2) if pseudo.ndim == 3 else pseudo.sum(axis=0)[None, :])
    pri = np.clip(np.asarray(priors, dtype=np.float64), EPS, None)
    lo = np.full(chunks.n_tasks, np.log(pri[1]) - np.log(pri[0]))
    for t, w, lab in chunks:
        p1 = p[t]
        pt = np.column_stack([1.0 - p1, p1])
        cell = counts[w, lab, :] - pt + (pseudo[w, lab, :] if pseudo.ndim == 3 else pseudo[lab, :])
        err = np.clip(cell, EPS, None) / np.clip(col[w] - pt, EPS, None)
        lo += np.bincount(t, weights=np.log(err[:, 1]) - np.log(err[:, 0]), minlength=chunks.n_tasks)
    out = 1.0 / (1.0 + np.exp(-lo))
    if pinned is not None and pinned.any():
        out[pinned] = p[pinned]
    return out


def worker_table_from_totals(totals: Totals, params: Params, names: Sequence[str] | None = None) -> pd.DataFrame:
    """The `workers` table (WORKER_COLUMNS, one row per worker code, in code order) from fit A's totals:
    sensitivity and specificity from the soft counts with prior_strength / 4 pseudo-answers per cell."""
    n = totals.n_votes
    n_yes = totals.n_yes
    n_no = n - n_yes
    ps = params.prior_strength / 4 or 1e-3
    yes_good, no_good = totals.all_yes, totals.all_no
    yes_bad, no_bad = n_yes - yes_good, n_no - no_good
    sens = (yes_good + ps) / (yes_good + no_good + 2 * ps)
    spec = (no_bad + ps) / (no_bad + yes_bad + 2 * ps)
    est = (yes_good + no_bad) / np.maximum(n, 1)
    yes_rate = n_yes / np.maximum(n, 1)
    gold_n, gold_correct = totals.gold_n, totals.gold_correct
    reasons = flag_reasons(n, sens, spec, yes_rate, gold_n, gold_correct, params.rules, est)
    with np.errstate(invalid="ignore", divide="ignore"):
        gold_acc = np.where(gold_n > 0, gold_correct / np.maximum(gold_n, 1), np.nan)
    from pipeline.qc.workers import KEEP_VOTES

    w = np.asarray(names, dtype=object).astype(str) if names is not None else np.arange(len(n)).astype(str)
    return pd.DataFrame({
        "worker": w, "n_votes": np.rint(n).astype(np.int64), "n_yes": np.rint(n_yes).astype(np.int64),
        "yes_rate": yes_rate, "gold_n": np.rint(gold_n).astype(np.int64),
        "gold_correct": np.rint(gold_correct).astype(np.int64), "gold_accuracy": gold_acc,
        "estimated_accuracy": est, "sensitivity": sens, "specificity": spec, "spammer_score": sens + spec - 1.0,
        "flagged": np.array([x is not None for x in reasons], dtype=bool), "flag_reason": reasons,
        "votes_used": np.array([x in KEEP_VOTES for x in reasons], dtype=bool),
    }, columns=WORKER_COLUMNS)


# ----- the stopping rule -------------------------------------------------------------------------------------
DECISION_COLUMNS = ["group", "n_votes", "n_yes", "n_used", "p_yes", "status", "n_more", "reason"]


def adaptive_decisions(index: pd.Index, groups: np.ndarray, n_votes: np.ndarray, n_yes: np.ndarray,
                       n_used: np.ndarray, p_yes: np.ndarray, params: Params, step: float) -> pd.DataFrame:
    """Accept at P(yes) >= accept_at, reject at <= reject_at, else ask k more votes (the log-odds still missing
    over `step`, at least 1, at most max_batch, never past max_votes); the per-group budget last."""
    status = np.where(p_yes >= params.accept_at, "accepted", np.where(p_yes <= params.reject_at, "rejected", "pending"))
    status = np.where(n_used == 0, "pending", status)  # the class prior alone never decides an image
    lo = logit(p_yes)
    gap = np.where(lo >= 0, logit(params.accept_at) - lo, lo - logit(params.reject_at))
    room = np.maximum(params.max_votes - n_votes, 0)
    need = np.maximum(np.ceil(gap / step), 1).astype(np.int64)
    need = np.where(n_votes == 0, params.initial_votes, need)
    if params.max_batch:
        need = np.minimum(need, params.max_batch)
    need = np.minimum(need, room)
    pending = status == "pending"
    reason = np.where(~pending, "decided", np.where(room == 0, "cap", np.where(n_votes == 0, "new", "uncertain")))
    dec = pd.DataFrame({"group": groups, "n_votes": n_votes.astype(np.int64), "n_yes": n_yes.astype(np.int64),
                        "n_used": n_used.astype(np.int64), "p_yes": p_yes, "status": status,
                        "n_more": np.where(pending, need, 0).astype(np.int64), "reason": reason}, index=index,
                       columns=DECISION_COLUMNS)
    if params.budget_per_group is not None:
        dec = apply_budget(dec, params.budget_per_group)
    return dec


def apply_budget(dec: pd.DataFrame, budget: int) -> pd.DataFrame:
    """Within each group, give what is left of `budget` votes to the pending tasks closest to a decision (fewest
    votes asked first); the others get n_more 0 and reason "budget". `dec` has DECISION_COLUMNS."""
    dec = dec.copy()
    spent = dec.groupby("group", sort=False)["n_votes"].transform("sum")
    order = dec.assign(_k=dec["n_more"], _t=dec.index.astype(str)).sort_values(["group", "_k", "_t"])
    cum = order.groupby("group", sort=False)["n_more"].cumsum()
    over = cum > (budget - spent.reindex(order.index))
    cut = order.index[over & (order["n_more"] > 0)]
    dec.loc[cut, "n_more"] = 0
    dec.loc[cut, "reason"] = "budget"
    return dec


def fit_fields() -> list[str]:
    return [f.name for f in fields(Fit)]
