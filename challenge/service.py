"""The challenge's operations over its database and the store: what the CLI, the web app and the demo call.

Limits: a phase allows `per_day`, `per_week` (default 2, as ILSVRC) and `per_phase` scored submissions per team,
counted in windows anchored at the phase's opening (day k of the phase is [opens + k days, opens + k + 1 days)).
`submit` validates and scores outside any lock, then, in one transaction holding the team's lock, counts what
the team has in each window and inserts, or refuses with the window's reset time; a submission with problems,
one over the limit or one outside the phase is recorded as a rejection and never counted.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from challenge import db
from challenge.db import (
    Challenge,
    Flag,
    Member,
    Phase,
    Rejection,
    Submission,
    Team,
    Token,
    WebSession,
    lock_team,
    naive_utc,
    read_session,
    utcnow,
    write_session,
)
from challenge.scoring import (
    LOWER_IS_BETTER,
    TASKS,
    Evaluation,
    SubmissionProblems,
    agreement,
    canonical_digest,
    evaluate_submission,
    ladder_step,
    read_submission,
    signature,
)
from challenge.truth import ChallengeError, HeldOut, load_held_out, partition
from pipeline.store import Store

TOKEN_PREFIX = "sfc_"
SESSION_HOURS = 12
NEAR_IDENTICAL_WINDOW = 500  # other teams' latest submissions a new one is compared with, image by image
WINDOWS = (("day", timedelta(days=1)), ("week", timedelta(days=7)), ("phase", None))


class InvalidSubmission(ChallengeError):
    def __init__(self, problems: list[dict[str, Any]]):
        self.problems = problems
        super().__init__(str(SubmissionProblems(problems)))


class LimitReached(ChallengeError):
    def __init__(self, window: str, limit: int, resets_at: datetime | None):
        self.window, self.limit, self.resets_at = window, limit, resets_at
        when = f"; the next one counts from {resets_at:%Y-%m-%d %H:%M} UTC" if resets_at else " (the phase's limit)"
        super().__init__(f"limit reached: {limit} submission{'s' if limit != 1 else ''} per {window}{when}")


class _Over(Exception):
    def __init__(self, window: Window):
        self.window = window


class PhaseNotOpen(ChallengeError):
    pass


class TooLarge(ChallengeError):
    pass


class NotRevealed(ChallengeError):
    """The private leaderboard is shown once the phase has closed."""


class Forbidden(ChallengeError):
    pass


@dataclass
class Principal:
    token_id: int
    role: str  # team | organiser
    team_id: int | None
    team_name: str | None


@dataclass
class Window:
    kind: str
    start: datetime
    end: datetime
    limit: int
    used: int = 0

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used)


@dataclass
class SubmitResult:
    submission_id: int
    shown_score: float | None
    metric: str
    ladder_moved: bool | None
    quota: list[Window]
    flags: list[dict[str, Any]] = field(default_factory=list)


def upload_key(slug: str, sha256: str) -> str:
    """Where an upload's bytes are kept: named by the challenge and the bytes' sha256 only."""
    if not all(c in "0123456789abcdef" for c in sha256) or len(sha256) != 64:
        raise ValueError("not a sha256")
    return f"private/challenges/{slug}/submissions/{sha256}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def phase_windows(phase: Phase, now: datetime) -> list[Window]:
    """The limit windows of `phase` that contain `now`."""
    out = []
    for kind, length in WINDOWS:
        limit = getattr(phase, f"per_{kind}")
        if limit is None:
            continue
        if length is None:
            start, end = phase.opens_at, phase.closes_at
        else:
            k = max(0, (now - phase.opens_at) // length)
            start = phase.opens_at + k * length
            end = min(start + length, phase.closes_at)
        out.append(Window(kind, start, end, int(limit)))
    return out


def parse_phase(text: str) -> dict[str, Any]:
    """NAME:OPENS:CLOSES with ISO times (UTC when no offset), e.g. main:2026-05-01T00:00:2026-06-01T00:00."""
    parts = text.split("/")
    if len(parts) != 3:
        raise ChallengeError(f"phase {text!r}: write NAME/OPENS/CLOSES, e.g. main/2026-05-01T00:00/2026-06-01T00:00")
    try:
        opens, closes = (naive_utc(datetime.fromisoformat(p)) for p in parts[1:])
    except ValueError as exc:
        raise ChallengeError(f"phase {text!r}: {exc}") from None
    return {"name": parts[0], "opens_at": opens, "closes_at": closes}


class ChallengeService:
    """One server's view: a database engine, the store holding the releases, cached hidden test sets."""

    def __init__(self, engine: Engine, store: Store | None):
        self.engine, self.store = engine, store
        self._held: dict[str, HeldOut] = {}
        self._masks: dict[int, np.ndarray] = {}
        self._evals: dict[int, Evaluation] = {}
        self._boards: dict[Any, Any] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ test sets
    def provide_held_out(self, release: str, held: HeldOut) -> None:
        """Use `held` as release `release`'s test set (benchmarks and tests that build one in memory)."""
        self._held[release] = held

    def held_out(self, release: str) -> HeldOut:
        with self._lock:
            if release not in self._held:
                if self.store is None:
                    raise ChallengeError(f"no store to read release {release!r} from")
                self._held[release] = load_held_out(self.store, release)
            return self._held[release]

    def public_mask(self, ch: Challenge) -> np.ndarray:
        with self._lock:
            if ch.id not in self._masks:
                held = self._held.get(ch.release)
                self._masks[ch.id] = partition(held.image_ids, ch.partition_salt, ch.public_fraction) if held else None
        if self._masks[ch.id] is None:
            self._masks.pop(ch.id)
            self.held_out(ch.release)
            return self.public_mask(ch)
        return self._masks[ch.id]

    def evaluation(self, sub: Submission) -> Evaluation:
        ev = self._evals.get(sub.id)
        if ev is None:
            ev = Evaluation.from_bytes(sub.evaluation)
            if len(self._evals) > 2000:
                self._evals.clear()
            self._evals[sub.id] = ev
        return ev

    # ------------------------------------------------------------------ organising
    def create_challenge(self, slug: str, release: str, task: str, phases: list[dict[str, Any]], *,
                         title: str | None = None, ladder: bool = False, public_fraction: float = 0.5,
                         final_selections: int = 2, bootstrap_rounds: int = 1000, confidence: float = 0.999,
                         max_upload_bytes: int = 64 << 20, score_decimals: int = 5,
                         near_identical: float = 0.95, partition_salt: str | None = None) -> Challenge:
        """A challenge on challenge release `release`. `partition_salt` decides which test images score the
        public board (and seeds the boards' bootstrap); leave it None (a random secret) for a real challenge:
        whoever knows it can tell the public images from the private ones."""
        if task not in TASKS:
            raise ChallengeError(f"task {task!r}: use one of {', '.join(TASKS)}")
        if not slug or not all(c.isalnum() or c in "-_." for c in slug) or len(slug) > 64:
            raise ChallengeError(f"challenge name {slug!r}: use letters, digits, '-', '_' or '.'")
        if not phases:
            raise ChallengeError("a challenge needs at least one phase")
        if bootstrap_rounds < 1000:
            raise ChallengeError("bootstrap_rounds must be at least 1,000 (ILSVRC's intervals use 1,000)")
        held = self.held_out(release)
        if task in ("loc", "det") and not len(held.boxes):
            raise ChallengeError(f"release {release!r} has no test boxes: only a cls challenge can be run on it")
        salt = secrets.token_hex(16) if partition_salt is None else partition_salt
        partition(held.image_ids, salt, public_fraction)  # checks the fraction
        with write_session(self.engine) as s:
            if s.scalar(select(Challenge.id).where(Challenge.slug == slug)) is not None:
                raise ChallengeError(f"challenge {slug!r} exists already")
            ch = Challenge(slug=slug, title=title or f"{release} {task}", release=release, task=task,
                           public_fraction=public_fraction, partition_salt=salt, ladder=ladder,
                           final_selections=final_selections, bootstrap_rounds=bootstrap_rounds,
                           confidence=confidence, max_upload_bytes=max_upload_bytes, score_decimals=score_decimals,
                           near_identical=near_identical, truth_digest=held.digest, n_test=held.n)
            s.add(ch)
            s.flush()
            for p in phases:
                if p["closes_at"] <= p["opens_at"]:
                    raise ChallengeError(f"phase {p['name']!r} closes before it opens")
                limits = {k: p.get(k) for k in ("per_day", "per_week", "per_phase")}
                if all(v is None for v in limits.values()) and not p.get("unlimited"):
                    limits["per_week"] = 2
                s.add(Phase(challenge_id=ch.id, name=p["name"], opens_at=naive_utc(p["opens_at"]),
                            closes_at=naive_utc(p["closes_at"]), **limits))
        return ch

    def add_team(self, name: str, members: list[tuple[str, str | None]] = (), *, baseline: bool = False
                 ) -> tuple[Team, str]:
        """A team and its first API token (returned once; only its hash is kept)."""
        name = name.strip()
        if not name or len(name) > 100:
            raise ChallengeError("a team name needs 1 to 100 characters")
        token = new_token()
        with write_session(self.engine) as s:
            if s.scalar(select(Team.id).where(Team.name == name)) is not None:
                raise ChallengeError(f"team {name!r} exists already")
            team = Team(name=name, is_baseline=baseline)
            s.add(team)
            s.flush()
            for m_name, email in members:
                s.add(Member(team_id=team.id, name=m_name, email=email))
            s.add(Token(digest=token_digest(token), role="team", team_id=team.id))
        return team, token

    def new_team_token(self, name: str, *, revoke_others: bool = False) -> str:
        token = new_token()
        with write_session(self.engine) as s:
            team = s.scalars(select(Team).where(Team.name == name)).one_or_none()
            if team is None:
                raise ChallengeError(f"no team {name!r}")
            if revoke_others:
                for t in s.scalars(select(Token).where(Token.team_id == team.id, Token.revoked_at.is_(None))):
                    t.revoked_at = utcnow()
            s.add(Token(digest=token_digest(token), role="team", team_id=team.id))
        return token

    def add_organiser_token(self) -> str:
        token = new_token()
        with write_session(self.engine) as s:
            s.add(Token(digest=token_digest(token), role="organiser"))
        return token

    def challenge(self, slug: str) -> Challenge:
        with read_session(self.engine) as s:
            ch = s.scalars(select(Challenge).where(Challenge.slug == slug)).one_or_none()
        if ch is None:
            raise ChallengeError(f"no challenge {slug!r}; `synsetforge challenge create` makes one")
        return ch

    def challenges(self) -> list[Challenge]:
        with read_session(self.engine) as s:
            return list(s.scalars(select(Challenge).order_by(Challenge.id)))

    def phases(self, ch: Challenge) -> list[Phase]:
        with read_session(self.engine) as s:
            return list(s.scalars(select(Phase).where(Phase.challenge_id == ch.id).order_by(Phase.opens_at)))

    def phase(self, ch: Challenge, name: str | None = None, now: datetime | None = None) -> Phase:
        """Phase `name`, or the open one, or the last one that opened (or the first)."""
        now = naive_utc(now or utcnow())
        phases = self.phases(ch)
        if name is not None:
            for p in phases:
                if p.name == name:
                    return p
            raise ChallengeError(f"challenge {ch.slug!r} has no phase {name!r}; it has {[p.name for p in phases]}")
        open_ = [p for p in phases if p.opens_at <= now < p.closes_at]
        started = [p for p in phases if p.opens_at <= now]
        return (open_ or started or phases)[-1 if (open_ or started) else 0]

    def close(self, slug: str, phase: str | None = None, now: datetime | None = None) -> Phase:
        """Close the phase now (if it is still open) and snapshot both of its boards."""
        now = naive_utc(now or utcnow())
        ch = self.challenge(slug)
        p = self.phase(ch, phase, now)
        with write_session(self.engine) as s:
            row = s.get(Phase, p.id)
            if row.closes_at > now:
                row.closes_at = now
            if row.opens_at > now:
                row.opens_at = now
            p = row
        self._boards.clear()
        from challenge.boards import snapshot

        for kind in ("public", "private"):
            snapshot(self, slug, kind, p.name, now=now)
        return p

    # ------------------------------------------------------------------ teams, tokens, sessions
    def authenticate(self, token: str | None) -> Principal | None:
        if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        with read_session(self.engine) as s:
            t = s.scalars(select(Token).where(Token.digest == token_digest(token),
                                              Token.revoked_at.is_(None))).one_or_none()
            if t is None:
                return None
            name = s.scalar(select(Team.name).where(Team.id == t.team_id)) if t.team_id else None
            return Principal(t.id, t.role, t.team_id, name)

    def start_session(self, token: str) -> tuple[str, str, Principal] | None:
        who = self.authenticate(token)
        if who is None:
            return None
        cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with write_session(self.engine) as s:
            s.add(WebSession(digest=token_digest(cookie), token_id=who.token_id, csrf=csrf,
                             expires_at=utcnow() + timedelta(hours=SESSION_HOURS)))
        return cookie, csrf, who

    def session(self, cookie: str | None) -> tuple[Principal, str] | None:
        if not cookie or len(cookie) > 100:
            return None
        with read_session(self.engine) as s:
            ws = s.scalars(select(WebSession).where(WebSession.digest == token_digest(cookie))).one_or_none()
            if ws is None or ws.expires_at <= utcnow():
                return None
            t = s.get(Token, ws.token_id)
            if t is None or t.revoked_at is not None:
                return None
            name = s.scalar(select(Team.name).where(Team.id == t.team_id)) if t.team_id else None
            return Principal(t.id, t.role, t.team_id, name), ws.csrf

    def end_session(self, cookie: str) -> None:
        with write_session(self.engine) as s:
            ws = s.scalars(select(WebSession).where(WebSession.digest == token_digest(cookie))).one_or_none()
            if ws is not None:
                s.delete(ws)

    def team_id(self, name: str) -> int:
        with read_session(self.engine) as s:
            tid = s.scalar(select(Team.id).where(Team.name == name))
        if tid is None:
            raise ChallengeError(f"no team {name!r}")
        return tid

    # ------------------------------------------------------------------ submitting
    def quota(self, slug: str, team_id: int, now: datetime | None = None) -> list[Window]:
        now = naive_utc(now or utcnow())
        ch = self.challenge(slug)
        p = self.phase(ch, None, now)
        with read_session(self.engine) as s:
            return self._count(s, p, team_id, now)

    @staticmethod
    def _count(s: Any, phase: Phase, team_id: int, now: datetime) -> list[Window]:
        wins = phase_windows(phase, now)
        for w in wins:
            w.used = s.scalar(select(func.count(Submission.id)).where(
                Submission.phase_id == phase.id, Submission.team_id == team_id,
                Submission.created_at >= w.start, Submission.created_at < w.end)) or 0
        return wins

    def _reject(self, ch: Challenge, team_id: int, reason: str, detail: str, now: datetime) -> None:
        with write_session(self.engine) as s:
            s.add(Rejection(challenge_id=ch.id, team_id=team_id, created_at=now, reason=reason, detail=detail[:4000]))

    def submit(self, slug: str, team_id: int, data: bytes, *, description: str = "", now: datetime | None = None
               ) -> SubmitResult:
        """Validate, score and record a submission of `team_id`, within its limits (see the module doc)."""
        now = naive_utc(now or utcnow())
        ch = self.challenge(slug)
        with read_session(self.engine) as s:
            team = s.get(Team, team_id)
        if team is None:
            raise ChallengeError(f"no team {team_id}")
        phase = self.phase(ch, None, now)
        if not phase.opens_at <= now < phase.closes_at:
            self._reject(ch, team_id, "phase_closed", f"phase {phase.name}", now)
            raise PhaseNotOpen(f"challenge {slug!r} takes no submissions now: phase {phase.name!r} runs from "
                               f"{phase.opens_at:%Y-%m-%d %H:%M} to {phase.closes_at:%Y-%m-%d %H:%M} UTC")
        if len(data) > ch.max_upload_bytes:
            self._reject(ch, team_id, "too_large", f"{len(data)} bytes", now)
            raise TooLarge(f"the upload has {len(data)} bytes; this challenge takes at most {ch.max_upload_bytes}")
        held = self.held_out(ch.release)
        try:
            parsed = read_submission(data, ch.task, held)
        except SubmissionProblems as exc:
            self._reject(ch, team_id, "invalid", json.dumps(exc.problems), now)
            raise InvalidSubmission(exc.problems) from None
        ev = evaluate_submission(parsed, held)
        public = self.public_mask(ch)
        scores = {"public": ev.score(public), "private": ev.score(~public), "full": ev.score(np.ones(held.n))}
        sig = signature(parsed, held.n)
        digest = canonical_digest(parsed)
        try:
            with write_session(self.engine) as s:
                lock_team(s, team_id)  # concurrent uploads of this team wait here, one at a time
                wins = self._count(s, phase, team_id, now)
                over = None if team.is_baseline else next((w for w in wins if w.used >= w.limit), None)
                if over is not None:
                    raise _Over(over)
                sub_id, moved, ladder_score = self._insert(s, ch, phase, team_id, now, data, parsed, ev, scores,
                                                           sig, digest, description)
        except _Over as exc:
            w = exc.window
            self._reject(ch, team_id, "limit", f"{w.used} of {w.limit} per {w.kind}", now)
            raise LimitReached(w.kind, w.limit, w.end if w.kind != "phase" else None) from None
        for w in wins:
            w.used += 1
        if self.store is not None:  # every upload kept, named by its sha256 (no client input in the key)
            key = upload_key(ch.slug, hashlib.sha256(data).hexdigest())
            if not self.store.exists(key):
                self.store.put(key, data)
        self._evals[sub_id] = ev
        self._boards.clear()
        flags = [] if team.is_baseline else self._flag(ch, sub_id, team_id, digest, sig)
        return SubmitResult(sub_id, ladder_score, ev.metric, moved, wins, flags)

    def _insert(self, s: Any, ch: Challenge, phase: Phase, team_id: int, now: datetime, data: bytes, parsed: Any,
                ev: Evaluation, scores: dict[str, float], sig: np.ndarray, digest: str, description: str
                ) -> tuple[int, bool | None, float | None]:
        """Inside the team's lock: the Ladder's decision and the row."""
        moved, ladder_score = None, None
        if ch.ladder:
            best = s.scalars(select(Submission).where(
                Submission.phase_id == phase.id, Submission.team_id == team_id, Submission.ladder_accepted)
                .order_by(Submission.id.desc()).limit(1)).one_or_none()
            moved = ladder_step(ev, self.evaluation(best) if best else None, self.public_mask(ch),
                                best.public_score if best else None, seed=team_id)
            ladder_score = round(scores["public"], ch.score_decimals) if moved else best.ladder_score
        else:
            ladder_score = round(scores["public"], ch.score_decimals)
        sub = Submission(challenge_id=ch.id, phase_id=phase.id, team_id=team_id, created_at=now,
                         sha256=hashlib.sha256(data).hexdigest(), content_digest=digest, n_bytes=len(data),
                         format=parsed.format, description=description[:200],
                         public_score=scores["public"], private_score=scores["private"],
                         full_score=scores["full"], headline=json.dumps(ev.headline, default=float),
                         evaluation=ev.to_bytes(), signature=sig.tobytes(), ladder_accepted=bool(moved),
                         ladder_score=ladder_score)
        s.add(sub)
        s.flush()
        return sub.id, moved, ladder_score

    def _flag(self, ch: Challenge, sub_id: int, team_id: int, digest: str, sig: np.ndarray) -> list[dict[str, Any]]:
        """Flag other teams' submissions that say the same (identical: any of them, by the indexed digest) or nearly
        the same (near-identical: per-image agreement >= the challenge's threshold, against the latest
        NEAR_IDENTICAL_WINDOW submissions of other teams)."""
        found: dict[int, dict[str, Any]] = {}
        others = (Submission.challenge_id == ch.id, Submission.team_id != team_id, Team.is_baseline.is_(False))
        with read_session(self.engine) as s:
            same = s.scalars(select(Submission.id).join(Team, Team.id == Submission.team_id)
                             .where(*others, Submission.content_digest == digest)).all()
            recent = s.execute(select(Submission.id, Submission.signature).join(Team, Team.id == Submission.team_id)
                               .where(*others).order_by(Submission.id.desc()).limit(NEAR_IDENTICAL_WINDOW)).all()
        for other_id in same:
            found[other_id] = {"other": other_id, "kind": "identical", "agreement": 1.0}
        for other_id, other_sig in recent:
            if other_id in found:
                continue
            a = agreement(sig, np.frombuffer(other_sig, dtype=np.uint64))
            if a >= ch.near_identical:
                found[other_id] = {"other": other_id, "kind": "near-identical", "agreement": a}
        if found:
            with write_session(self.engine) as s:
                for f in found.values():
                    s.add(Flag(challenge_id=ch.id, submission_id=sub_id, other_id=f["other"], kind=f["kind"],
                               agreement=f["agreement"]))
        return list(found.values())

    def flags(self, slug: str) -> list[dict[str, Any]]:
        ch = self.challenge(slug)
        with read_session(self.engine) as s:
            teams = dict(s.execute(select(Submission.id, Team.name).join(Team, Team.id == Submission.team_id)
                                   .where(Submission.challenge_id == ch.id)).all())
            return [{"submission": f.submission_id, "team": teams.get(f.submission_id), "other": f.other_id,
                     "other_team": teams.get(f.other_id), "kind": f.kind, "agreement": f.agreement,
                     "at": f.created_at} for f in s.scalars(select(Flag).where(Flag.challenge_id == ch.id)
                                                            .order_by(Flag.id))]

    def team_submissions(self, slug: str, team_id: int) -> list[dict[str, Any]]:
        """What a team may see of its own submissions (no private score before the phase closes)."""
        ch = self.challenge(slug)
        now = utcnow()
        with read_session(self.engine) as s:
            closed = {p.id: p.closes_at <= now for p in s.scalars(select(Phase).where(Phase.challenge_id == ch.id))}
            subs = s.scalars(select(Submission).where(Submission.challenge_id == ch.id, Submission.team_id == team_id)
                             .order_by(Submission.id.desc())).all()
        return [{"id": x.id, "at": x.created_at, "description": x.description, "sha256": x.sha256, "format": x.format,
                 "score": x.ladder_score, "moved": x.ladder_accepted if ch.ladder else None, "final": x.final,
                 "private_score": round(x.private_score, ch.score_decimals)
                 if closed.get(x.phase_id) and x.private_score is not None else None} for x in subs]

    def select_finals(self, slug: str, team_id: int, ids: list[int], now: datetime | None = None) -> list[int]:
        """Mark up to `final_selections` of the team's submissions of the open phase as its finals (the private
        board scores the best of them; without a choice, the team's best public submission)."""
        now = naive_utc(now or utcnow())
        ch = self.challenge(slug)
        phase = self.phase(ch, None, now)
        if not phase.opens_at <= now < phase.closes_at:
            raise PhaseNotOpen("final submissions can be chosen while the phase is open")
        ids = sorted(set(int(i) for i in ids))
        if len(ids) > ch.final_selections:
            raise ChallengeError(f"at most {ch.final_selections} final submissions")
        with write_session(self.engine) as s:
            lock_team(s, team_id)
            subs = s.scalars(select(Submission).where(Submission.phase_id == phase.id,
                                                      Submission.team_id == team_id)).all()
            mine = {x.id for x in subs}
            if not set(ids) <= mine:
                raise Forbidden("only your own submissions of this phase can be chosen")
            for x in subs:
                x.final = x.id in ids
        self._boards.clear()
        return ids

    def lower_is_better(self, ch: Challenge) -> bool:
        return LOWER_IS_BETTER[ch.task]


def open_service(store_url: str | None, db_url: str | None = None) -> ChallengeService:
    """A service on the store at `store_url` and the database `db_url` (default: SQLite in the data folder)."""
    from pipeline.store import open_store

    store = open_store(store_url) if store_url else None
    url = db_url or db.default_url(store_url or "data")
    return ChallengeService(db.make_engine(url), store)
