"""Leaderboards: public (scored on the public part of the test set) and private (the rest, shown once the
phase has closed), with ILSVRC's bootstrap intervals and significance (Russakovsky et al., IJCV 2015, sec. 6.2).

Public board: each team's best public score (under the Ladder: the score the Ladder last released). Private
board: each team's final submissions (those it selected, up to the challenge's `final_selections`; without a
choice, the submission behind its public score), its best private score among them. Each row gets a 99.9 %
interval from `bootstrap_rounds` resamples (with replacement) of the board's test images, every row scored on
the same resamples; a row is significantly better than the row below when the 99.9 % interval of their paired
difference excludes zero. Organisers' baselines are shown in place, marked, and not ranked.

`snapshot` writes a board as Parquet to challenges/<challenge>/<release>/<phase>/<board>-vNNNN.parquet in the
store (versions numbered per release, phase and board; never overwritten) and records it in the database.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import func, select

from challenge.db import Phase, Snapshot, Submission, Team, naive_utc, read_session, utcnow, write_session
from challenge.scoring import METRIC, bootstrap, interval, significantly_better
from challenge.service import ChallengeService, NotRevealed
from pipeline.store import KeyExists


@dataclass
class Row:
    rank: int | None
    team: str
    baseline: bool
    submission_id: int
    score: float
    low: float
    high: float
    better_than_next: bool | None
    n_submissions: int
    submitted_at: datetime


@dataclass
class Board:
    challenge: str
    release: str
    task: str
    phase: str
    kind: str
    metric: str
    lower_is_better: bool
    ladder: bool
    confidence: float
    rounds: int
    n_images: int
    closes_at: datetime
    rows: list[Row] = field(default_factory=list)

    def table(self) -> pa.Table:
        rows = [asdict(r) for r in self.rows]
        meta = {"challenge": self.challenge, "release": self.release, "task": self.task, "phase": self.phase,
                "board": self.kind, "metric": self.metric}
        cols = {k: [r[k] for r in rows] for k in Row.__dataclass_fields__}
        t = pa.table({**{k: pa.array(v, pa.string()) for k, v in meta.items() for v in [[v] * len(rows)]},
                      "rank": pa.array(cols["rank"], pa.int32()), "team": pa.array(cols["team"], pa.string()),
                      "baseline": pa.array(cols["baseline"], pa.bool_()),
                      "submission_id": pa.array(cols["submission_id"], pa.int64()),
                      "score": pa.array(cols["score"], pa.float64()), "ci_low": pa.array(cols["low"], pa.float64()),
                      "ci_high": pa.array(cols["high"], pa.float64()),
                      "better_than_next": pa.array(cols["better_than_next"], pa.bool_()),
                      "n_submissions": pa.array(cols["n_submissions"], pa.int32()),
                      "submitted_at": pa.array(cols["submitted_at"], pa.timestamp("us"))})
        return t.replace_schema_metadata({"confidence": str(self.confidence), "bootstrap_rounds": str(self.rounds),
                                          "n_images": str(self.n_images)})

    def text(self, decimals: int = 4) -> str:
        """The board as a Markdown table (what `synsetforge challenge leaderboard` prints)."""
        pct = f"{self.confidence * 100:g} %"
        out = [f"{self.challenge} ({self.release}, {self.task}) phase {self.phase}: {self.kind} board, "
               f"{self.metric} on {self.n_images} test images, {pct} bootstrap intervals ({self.rounds} rounds)"
               + (", Ladder" if self.ladder else ""),
               f"| rank | team | {self.metric} | {pct} interval | better than next | submissions |",
               "|---:|---|---:|---|---|---:|"]
        for r in self.rows:
            name = f"{r.team} (baseline)" if r.baseline else r.team
            sig = "" if r.better_than_next is None else ("yes" if r.better_than_next else "no")
            out.append(f"| {r.rank or '-'} | {name} | {r.score:.{decimals}f} | [{r.low:.{decimals}f}, "
                       f"{r.high:.{decimals}f}] | {sig} | {r.n_submissions} |")
        if not self.rows:
            out.append("| | (no submissions yet) | | | | |")
        return "\n".join(out)


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "big")


def build_board(svc: ChallengeService, slug: str, kind: str = "public", phase: str | None = None, *,
                now: datetime | None = None, preview: bool = False) -> Board:
    """The `kind` (public or private) board of a phase. The private one raises NotRevealed while the phase is open,
    unless `preview` (organisers only)."""
    if kind not in ("public", "private"):
        raise ValueError(kind)
    now = naive_utc(now or utcnow())
    ch = svc.challenge(slug)
    ph = svc.phase(ch, phase, now)
    if kind == "private" and ph.closes_at > now and not preview:
        raise NotRevealed(f"the private leaderboard of {slug!r} phase {ph.name!r} is shown when the phase closes "
                          f"({ph.closes_at:%Y-%m-%d %H:%M} UTC)")
    with read_session(svc.engine) as s:  # everything a board is computed from: submissions are never changed
        # after their insert but for `final`, so their count, the last id and which ones are finals decide it
        state = s.execute(select(func.count(Submission.id), func.max(Submission.id))
                          .where(Submission.phase_id == ph.id)).one()
        finals = tuple(s.scalars(select(Submission.id).where(Submission.phase_id == ph.id, Submission.final)
                                 .order_by(Submission.id)))
    key = (ch.id, ph.id, kind, tuple(state), finals, ph.closes_at <= now)
    cached = svc._boards.get(key)
    if cached is not None:
        return cached
    board = _compute(svc, ch, ph, kind)
    if len(svc._boards) > 256:  # a worker that never takes an upload itself never clears its cache otherwise
        svc._boards.clear()
    svc._boards[key] = board
    return board


def _compute(svc: ChallengeService, ch: Any, ph: Phase, kind: str) -> Board:
    svc.held_out(ch.release)
    public = svc.public_mask(ch)
    subset = public if kind == "public" else ~public
    lower = svc.lower_is_better(ch)
    sign = 1.0 if lower else -1.0
    with read_session(svc.engine) as s:
        subs = s.scalars(select(Submission).where(Submission.phase_id == ph.id).order_by(Submission.id)).all()
        teams = {t.id: t for t in s.scalars(select(Team))}
    by_team: dict[int, list[Submission]] = {}
    for x in subs:
        by_team.setdefault(x.team_id, []).append(x)
    chosen: list[tuple[int, Submission, float]] = []
    for team_id, xs in by_team.items():
        if ch.ladder:
            accepted = [x for x in xs if x.ladder_accepted]
            best_public = accepted[-1] if accepted else xs[0]
            public_score = best_public.ladder_score
        else:
            best_public = min(xs, key=lambda x: (sign * x.public_score, x.id))
            public_score = round(best_public.public_score, ch.score_decimals)
        if kind == "public":
            chosen.append((team_id, best_public, public_score))
        else:
            finals = [x for x in xs if x.final][: ch.final_selections] or [best_public]
            best = min(finals, key=lambda x: (sign * x.private_score, x.id))
            chosen.append((team_id, best, round(best.private_score, ch.score_decimals)))
    chosen.sort(key=lambda c: (sign * c[2], c[1].created_at, c[1].id))
    board = Board(ch.slug, ch.release, ch.task, ph.name, kind, METRIC[ch.task], lower, ch.ladder, ch.confidence,
                  ch.bootstrap_rounds, int(subset.sum()), ph.closes_at)
    if not chosen:
        return board
    evals = [svc.evaluation(x) for _, x, _ in chosen]
    boot = bootstrap(evals, subset, ch.bootstrap_rounds, seed=_seed(ch.partition_salt, ph.id, kind))
    rank = 0
    for j, (team_id, x, score) in enumerate(chosen):
        team = teams[team_id]
        lo, hi = interval(boot[:, j], ch.confidence)
        nxt = j + 1 if j + 1 < len(chosen) else None
        better = significantly_better(boot[:, j], boot[:, nxt], lower, ch.confidence) if nxt is not None else None
        if not team.is_baseline:
            rank += 1
        board.rows.append(Row(None if team.is_baseline else rank, team.name, team.is_baseline, x.id, score,
                              _r(lo, ch.score_decimals), _r(hi, ch.score_decimals), better, len(by_team[team_id]),
                              x.created_at))
    return board


def _r(v: float, decimals: int) -> float:
    return v if math.isnan(v) else round(v, decimals)


def snapshot_key(slug: str, release: str, phase: str, kind: str, version: int) -> str:
    return f"challenges/{slug}/{release}/{phase}/{kind}-v{version:04d}.parquet"


def snapshot(svc: ChallengeService, slug: str, kind: str = "public", phase: str | None = None, *,
             now: datetime | None = None, preview: bool = False) -> dict[str, Any]:
    """Write the board as a new Parquet version in the store and record it; returns key, version, rows."""
    if svc.store is None:
        raise NotRevealed("no store to write snapshots to")
    board = build_board(svc, slug, kind, phase, now=now, preview=preview)
    ch = svc.challenge(slug)
    ph = svc.phase(ch, board.phase)
    buf = io.BytesIO()
    pq.write_table(board.table(), buf, compression="zstd")
    data = buf.getvalue()
    for _ in range(20):
        with read_session(svc.engine) as s:
            version = (s.scalar(select(func.max(Snapshot.version)).where(
                Snapshot.challenge_id == ch.id, Snapshot.phase_id == ph.id, Snapshot.board == kind)) or 0) + 1
        key = snapshot_key(slug, ch.release, ph.name, kind, version)
        try:
            svc.store.put(key, data, exclusive=True)
        except KeyExists:
            continue
        with write_session(svc.engine) as s:
            s.add(Snapshot(challenge_id=ch.id, phase_id=ph.id, board=kind, version=version, key=key,
                           sha256=hashlib.sha256(data).hexdigest(), rows=len(board.rows)))
        return {"key": key, "version": version, "rows": len(board.rows), "board": board}
    raise RuntimeError("could not find a free snapshot version")
