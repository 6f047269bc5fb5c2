"""The challenge database (SQLAlchemy 2): SQLite in the data folder by default, PostgreSQL for a deployment.

Every write that must be atomic (a submission against its team's limit) runs in `write_session`: on PostgreSQL
it locks the team's row (`SELECT ... FOR UPDATE`), so concurrent uploads of one team queue behind each other and
each counts what the previous ones committed; on SQLite the transaction starts with `BEGIN IMMEDIATE`, which
takes the database's write lock up front (WAL mode keeps readers going meanwhile). Times are stored as naive UTC.

    >>> engine = make_engine("sqlite://")
    >>> with write_session(engine) as s:
    ...     s.add(Team(name="demo"))
    >>> with read_session(engine) as s:
    ...     s.scalars(select(Team.name)).all()
    ['demo']
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

DB_ENV = "SYNSETFORGE_CHALLENGE_DB"

__all__ = ["select"]


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


class Base(DeclarativeBase):
    pass


class Challenge(Base):
    __tablename__ = "challenges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    release: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(8))
    public_fraction: Mapped[float] = mapped_column(Float, default=0.5)
    partition_salt: Mapped[str] = mapped_column(String(64))  # secret: which test images are public
    ladder: Mapped[bool] = mapped_column(Boolean, default=False)
    final_selections: Mapped[int] = mapped_column(Integer, default=2)
    bootstrap_rounds: Mapped[int] = mapped_column(Integer, default=1000)
    confidence: Mapped[float] = mapped_column(Float, default=0.999)
    max_upload_bytes: Mapped[int] = mapped_column(Integer, default=64 << 20)
    score_decimals: Mapped[int] = mapped_column(Integer, default=5)
    near_identical: Mapped[float] = mapped_column(Float, default=0.95)
    truth_digest: Mapped[str] = mapped_column(String(64))
    n_test: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Phase(Base):
    __tablename__ = "phases"
    __table_args__ = (UniqueConstraint("challenge_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    challenge_id: Mapped[int] = mapped_column(ForeignKey("challenges.id"))
    name: Mapped[str] = mapped_column(String(64))
    opens_at: Mapped[datetime] = mapped_column(DateTime)
    closes_at: Mapped[datetime] = mapped_column(DateTime)
    per_day: Mapped[int | None] = mapped_column(Integer, nullable=True)
    per_week: Mapped[int | None] = mapped_column(Integer, nullable=True)
    per_phase: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    is_baseline: Mapped[bool] = mapped_column(Boolean, default=False)  # an organisers' baseline, marked on boards
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Member(Base):
    __tablename__ = "members"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Token(Base):
    """An API token, kept as its sha256 only (the token itself is shown once, when it is made)."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # team | organiser
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class WebSession(Base):
    """A signed-in browser: the cookie is a random id kept as its sha256; `csrf` goes into every form."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id"))
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class Submission(Base):
    __tablename__ = "submissions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    challenge_id: Mapped[int] = mapped_column(ForeignKey("challenges.id"), index=True)
    phase_id: Mapped[int] = mapped_column(ForeignKey("phases.id"), index=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    sha256: Mapped[str] = mapped_column(String(64))  # of the uploaded bytes
    content_digest: Mapped[str] = mapped_column(String(64), index=True)  # of what it says (format-independent)
    n_bytes: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(String(200), default="")
    public_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    private_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    full_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    headline: Mapped[str] = mapped_column(Text)  # JSON of pipeline.evaluate's result on all test images
    evaluation: Mapped[bytes] = mapped_column(LargeBinary)  # scoring.Evaluation.to_bytes()
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    ladder_accepted: Mapped[bool] = mapped_column(Boolean, default=False)
    ladder_score: Mapped[float | None] = mapped_column(Float, nullable=True)  # the team's public score after it
    final: Mapped[bool] = mapped_column(Boolean, default=False)


class Rejection(Base):
    """An upload that was refused (problems in it, over the limit, phase closed): kept, never counted."""

    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    challenge_id: Mapped[int] = mapped_column(ForeignKey("challenges.id"))
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)


class Flag(Base):
    """Two teams' submissions that are identical or nearly so: for the organisers to look at."""

    __tablename__ = "flags"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    challenge_id: Mapped[int] = mapped_column(ForeignKey("challenges.id"), index=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"))
    other_id: Mapped[int] = mapped_column(ForeignKey("submissions.id"))
    kind: Mapped[str] = mapped_column(String(16))  # identical | near-identical
    agreement: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Snapshot(Base):
    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("challenge_id", "phase_id", "board", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    challenge_id: Mapped[int] = mapped_column(ForeignKey("challenges.id"))
    phase_id: Mapped[int] = mapped_column(ForeignKey("phases.id"))
    board: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(300))
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


def default_url(store_url: str) -> str:
    """The embedded default: SQLite in the data folder (the local store's root)."""
    env = os.environ.get(DB_ENV)
    if env:
        return env
    if "://" in store_url and not store_url.startswith("file://"):
        from challenge.truth import ChallengeError

        raise ChallengeError(f"the store {store_url} is not a local folder: give the challenge database with --db URL "
                             f"or {DB_ENV} (e.g. postgresql+psycopg2://user@host/db)")
    root = Path(store_url[7:] if store_url.startswith("file://") else store_url)
    (root / "challenge").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'challenge' / 'challenge.db').resolve()}"


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, *, create: bool = True) -> Engine:
    """An engine for `url` (sqlite:///path, sqlite:// in memory, postgresql+psycopg2://...), tables created."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        memory = u.database in (None, "", ":memory:")
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60},
                               **({"poolclass": StaticPool} if memory else {"pool_size": 20, "max_overflow": 40}))

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, record):  # noqa: ANN001 - DBAPI objects
            dbapi_conn.isolation_level = None  # SQLAlchemy's own BEGIN below, not pysqlite's
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=40)
    if create:
        Base.metadata.create_all(engine)
    return engine


@contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A transaction that commits at the end (rolls back on an exception); on SQLite it holds the write lock
    from its first statement."""
    with Session(engine.execution_options(immediate=True), expire_on_commit=False) as session, session.begin():
        yield session


@contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def lock_team(session: Session, team_id: int) -> Team:
    """The team's row, locked until the transaction ends (PostgreSQL: FOR UPDATE; SQLite: the write lock)."""
    team = session.scalars(select(Team).where(Team.id == team_id).with_for_update()).one_or_none()
    if team is None:
        raise LookupError(f"team {team_id} does not exist")
    return team
