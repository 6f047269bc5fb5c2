"""`synsetforge challenge create|team|token|serve|submit|leaderboard|close|flags|analysis`.

The database is `--db URL`, else SYNSETFORGE_CHALLENGE_DB, else SQLite in the data folder
(<store>/challenge/challenge.db). Tokens are printed once, when they are made; the server keeps their hash.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import UserError

TOKEN_ENV = "SYNSETFORGE_CHALLENGE_TOKEN"


def _service(args: argparse.Namespace, settings: Settings) -> Any:
    from challenge.service import open_service

    return open_service(str(settings.store.url), args.db)


def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    from challenge.service import parse_phase

    svc = _service(args, settings)
    phases = []
    for text in args.phase:
        p = parse_phase(text)
        p.update(per_day=args.per_day, per_week=args.per_week, per_phase=args.per_phase, unlimited=args.unlimited)
        phases.append(p)
    ch = svc.create_challenge(args.name, args.release, args.task, phases, title=args.title, ladder=args.ladder,
                              public_fraction=args.public_fraction, final_selections=args.finals,
                              bootstrap_rounds=args.rounds, max_upload_bytes=int(args.max_upload_mb * (1 << 20)))
    print(f"challenge {ch.slug}: release {ch.release}, task {ch.task}, {ch.n_test} test images "
          f"({ch.public_fraction:g} of them score the public board){', Ladder' if ch.ladder else ''}")
    for p in svc.phases(ch):
        lim = ", ".join(f"{getattr(p, 'per_' + k)} per {k}" for k in ("day", "week", "phase")
                        if getattr(p, "per_" + k) is not None) or "no limit"
        print(f"  phase {p.name}: {p.opens_at:%Y-%m-%d %H:%M} to {p.closes_at:%Y-%m-%d %H:%M} UTC, {lim}")
    return 0


def _member(text: str) -> tuple[str, str | None]:
    if "<" in text and text.endswith(">"):
        name, email = text[:-1].split("<", 1)
        return name.strip(), email.strip()
    return text.strip(), None


def cmd_team(args: argparse.Namespace, settings: Settings) -> int:
    svc = _service(args, settings)
    team, token = svc.add_team(args.team, [_member(m) for m in args.member], baseline=args.baseline)
    print(f"team {team.name} (id {team.id}){' (organisers baseline)' if team.is_baseline else ''}")
    print(f"token (shown once, keep it; the server stores only its hash): {token}")
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    svc = _service(args, settings)
    token = svc.add_organiser_token() if args.organiser else svc.new_team_token(args.team, revoke_others=args.revoke)
    print(f"token (shown once): {token}")
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from challenge.db import DB_ENV, default_url, make_engine, safe_url
    from challenge.web import STORE_ENV

    url = args.db or default_url(str(settings.store.url))
    make_engine(url)  # tables created once, before the workers start
    os.environ[STORE_ENV] = str(settings.store.url)
    os.environ[DB_ENV] = url
    if args.secure_cookies:
        os.environ["SYNSETFORGE_CHALLENGE_SECURE_COOKIES"] = "1"
    if args.workers > 1 and url.startswith("sqlite"):
        print("note: several workers on SQLite share one write lock; use PostgreSQL for a deployment", file=sys.stderr)
    print(f"challenge server on http://{args.host}:{args.port} (database {safe_url(url)}, store {settings.store.url})",
          flush=True)
    uvicorn.run("challenge.web:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level="info", access_log=True)
    return 0


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    data = Path(args.file).read_bytes()
    if args.baseline:
        svc = _service(args, settings)
        r = svc.submit(args.name, svc.team_id(args.baseline), data, description=args.description or "")
        print(f"baseline {args.baseline}: submission {r.submission_id}, public {r.metric} {r.shown_score}")
        return 0
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise UserError(f"set {TOKEN_ENV} to your team's token (or --baseline TEAM as an organiser)")
    req = urllib.request.Request(f"{args.server.rstrip('/')}/api/c/{args.name}/submissions", data=data, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "X-Description": args.description or "",
                                          "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            out = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            out = json.loads(exc.read() or b"{}")
        except ValueError:  # not the server's JSON (a proxy's error page, say)
            out = {}
        problems = "".join(f"\n  {p['kind']} ({p['count']}): {'; '.join(p['examples'])}" for p in out.get("problems", []))
        raise UserError(f"{exc.code}: {out.get('error', exc.reason)}{problems}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach the challenge server at {args.server}: {reason}") from None
    print(f"submission {out['id']}: public {out['metric']} {out['score']}"
          + (f" ({'moved' if out['moved'] else 'unchanged: not better by the Ladder test'})" if out.get("ladder") else "")
          + (f"; {out['left']} left in this window" if out.get("left") is not None else ""))
    return 0


def cmd_leaderboard(args: argparse.Namespace, settings: Settings) -> int:
    from challenge.boards import build_board, snapshot

    svc = _service(args, settings)
    kind = "private" if args.private else "public"
    if args.snapshot:
        snap = snapshot(svc, args.name, kind, args.phase, preview=args.preview)
        board = snap["board"]
    else:
        board = build_board(svc, args.name, kind, args.phase, preview=args.preview)
    print(board.text())
    if args.snapshot:
        print(f"snapshot v{snap['version']}: {svc.store.url}/{snap['key']}")
    return 0


def cmd_close(args: argparse.Namespace, settings: Settings) -> int:
    from challenge.boards import build_board

    svc = _service(args, settings)
    p = svc.close(args.name, args.phase)
    print(f"phase {p.name} of {args.name} closed at {p.closes_at:%Y-%m-%d %H:%M} UTC; boards snapshotted")
    print(build_board(svc, args.name, "private", p.name).text())
    return 0


def cmd_flags(args: argparse.Namespace, settings: Settings) -> int:
    svc = _service(args, settings)
    flags = svc.flags(args.name)
    for f in flags:
        print(f"{f['kind']}: submission {f['submission']} ({f['team']}) and {f['other']} ({f['other_team']}), "
              f"agreement {f['agreement']:.4f}")
    print(f"{len(flags)} flags")
    return 0


def cmd_analysis(args: argparse.Namespace, settings: Settings) -> int:
    from challenge.analysis import analysis_for

    a = analysis_for(_service(args, settings), args.name, args.phase, args.top, plots=False)
    cols = ["wnid", "images", "boxes", "scale", "instances", "cpl", "accuracy"]
    print(a.classes[cols].to_markdown(index=False) if hasattr(a.classes, "to_markdown") else a.classes[cols])
    for k, c in a.correlations.items():
        print(f"accuracy vs {k}: Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f} over {c['classes']} classes")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("challenge", help="run an ILSVRC-style challenge on a release with hidden test labels")
    p.add_argument("--db", help="database URL (default SYNSETFORGE_CHALLENGE_DB, else SQLite in the data folder)")
    sub = p.add_subparsers(dest="challenge_command", metavar="ACTION", required=True)

    c = sub.add_parser("create", help="a challenge on a release built with `release build --challenge`")
    c.add_argument("name", help="short name, e.g. 2026-cls")
    c.add_argument("--release", required=True)
    c.add_argument("--task", choices=["cls", "loc", "det"], required=True)
    c.add_argument("--phase", action="append", required=True,
                   help="NAME/OPENS/CLOSES in ISO time (UTC unless an offset is given), repeatable")
    c.add_argument("--title")
    c.add_argument("--per-day", type=int)
    c.add_argument("--per-week", type=int, help="default 2 (ILSVRC) when no limit is given")
    c.add_argument("--per-phase", type=int)
    c.add_argument("--unlimited", action="store_true", help="no limit at all")
    c.add_argument("--ladder", action="store_true", help="public scores follow the parameter-free Ladder")
    c.add_argument("--public-fraction", type=float, default=0.5, help="share of test images on the public board")
    c.add_argument("--finals", type=int, default=2, help="final submissions a team may choose")
    c.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds (>= 1000)")
    c.add_argument("--max-upload-mb", type=float, default=64)
    c.set_defaults(func=cmd_create)

    t = sub.add_parser("team", help="add a team (prints its token once)")
    t.add_argument("team")
    t.add_argument("--member", action="append", default=[], help='"Name <email>", repeatable')
    t.add_argument("--baseline", action="store_true", help="an organisers' baseline, marked on the boards")
    t.set_defaults(func=cmd_team)

    k = sub.add_parser("token", help="a new token for a team, or an organiser token")
    k.add_argument("team", nargs="?")
    k.add_argument("--organiser", action="store_true")
    k.add_argument("--revoke", action="store_true", help="revoke the team's other tokens")
    k.set_defaults(func=cmd_token)

    s = sub.add_parser("serve", help="the evaluation server (uvicorn)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--secure-cookies", action="store_true", help="behind HTTPS: mark cookies Secure")
    s.set_defaults(func=cmd_serve)

    u = sub.add_parser("submit", help=f"upload a submission (team token in {TOKEN_ENV})")
    u.add_argument("name")
    u.add_argument("file")
    u.add_argument("--server", default="http://127.0.0.1:8000")
    u.add_argument("--description")
    u.add_argument("--baseline", metavar="TEAM", help="organisers: record it directly as baseline TEAM")
    u.set_defaults(func=cmd_submit)

    lb = sub.add_parser("leaderboard", help="print a board with its intervals")
    lb.add_argument("name")
    lb.add_argument("--phase")
    lb.add_argument("--private", action="store_true")
    lb.add_argument("--preview", action="store_true", help="organisers: the private board before the phase closes")
    lb.add_argument("--snapshot", action="store_true", help="also write it as a new Parquet version in the store")
    lb.set_defaults(func=cmd_leaderboard)

    cl = sub.add_parser("close", help="close the phase now, snapshot and print the private board")
    cl.add_argument("name")
    cl.add_argument("--phase")
    cl.set_defaults(func=cmd_close)

    f = sub.add_parser("flags", help="identical or near-identical submissions of different teams")
    f.add_argument("name")
    f.set_defaults(func=cmd_flags)

    a = sub.add_parser("analysis", help="per-class accuracy against scale, instances and CPL (closed phase)")
    a.add_argument("name")
    a.add_argument("--phase")
    a.add_argument("--top", type=int, default=5)
    a.set_defaults(func=cmd_analysis)
