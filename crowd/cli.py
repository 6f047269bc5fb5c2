"""`synsetforge crowd serve|invite|push|pull|loop|status|gold|workers`.

`serve` starts a local Label Studio and prints the admin login (kept in its data dir); `invite` prints the sign-up
link or creates named annotator accounts; `loop` runs pull -> QC -> push on an interval for a team without
Airflow (the crowd DAG's steps, Ctrl-C stops it between steps)."""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from crowd.client import CrowdClient, CrowdError
from crowd.kinds import KINDS
from pipeline.errors import UserError
from pipeline.store import store_from_settings


def _user_error(msg: str) -> Exception:
    return UserError(msg)


def admin_client(settings: Any) -> CrowdClient:
    cs = settings.crowd
    if not cs.url:
        raise _user_error("crowd.url is not set: export SYNSETFORGE__CROWD__URL (e.g. http://127.0.0.1:8080; "
                          "`synsetforge crowd serve` starts a local server)")
    if cs.token is None:
        raise _user_error("crowd.token is not set: export SYNSETFORGE__CROWD__TOKEN (an admin API token; "
                          "`synsetforge crowd serve` writes one to <data dir>/admin-token)")
    return CrowdClient(cs.url, cs.token.get_secret_value(), retries=cs.retries)


def _read_plan(path: str | None) -> pd.DataFrame | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise _user_error(f"plan file {p} does not exist")
    try:
        return pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except Exception as exc:  # noqa: BLE001
        raise _user_error(f"plan file {p} is not readable as {'Parquet' if p.suffix == '.parquet' else 'CSV'}: {exc}") from None


def project_ids(client: CrowdClient, settings: Any, kinds: list[str]) -> list[int]:
    from crowd.provision import find_project, project_title

    ids = []
    for k in kinds:
        proj = find_project(client, project_title(settings.crowd.project_prefix, k))
        if proj is not None:
            ids.append(int(proj["id"]))
    return ids


def cmd_push(args: argparse.Namespace, settings: Any) -> int:
    from crowd.provision import cors_origin, ensure_bucket_cors
    from crowd.push import PlanError, push

    client = admin_client(settings)
    store = store_from_settings(settings)
    plan = _read_plan(args.plan)
    try:
        ensure_bucket_cors(store, cors_origin(settings, client))
        # each request goes to a project of its overlap (n_more, or --overlap), opened by push when needed
        out = push(store, client, settings, kind=args.kind, plan=plan, overlap=args.overlap)
        for pid in out["projects"]:
            ensure_instructions(client, store, settings, pid, args.kind)
    except (PlanError, CrowdError) as exc:
        raise _user_error(str(exc)) from None
    print(out["message"])
    return 0


def cmd_pull(args: argparse.Namespace, settings: Any) -> int:
    from crowd.pull import PseudonymKeyMissing, pull

    client = admin_client(settings)
    try:
        ids = project_ids(client, settings, args.kind)
        out = pull(store_from_settings(settings), client, settings, project_ids=ids)
    except (PseudonymKeyMissing, CrowdError) as exc:
        raise _user_error(str(exc)) from None
    print(f"pulled {out['new_votes']} new vote(s), quarantined {out['quarantined']}, total {out['total_votes']}")
    return 0


def cmd_status(args: argparse.Namespace, settings: Any) -> int:
    from crowd.status import status

    store = store_from_settings(settings)
    client = admin_client(settings) if settings.crowd.url and settings.crowd.token else None
    try:
        ids = project_ids(client, settings, list(KINDS)) if client else []
        out = status(store, client, ids, settings)
    except CrowdError as exc:
        raise _user_error(str(exc)) from None
    print("## Synsets\n")
    print(out["synsets"].to_markdown(index=False) if len(out["synsets"]) else "(no tasks pushed yet)")
    print("\n## Workers\n")
    w = out["workers"]
    print(w.to_markdown(index=False, floatfmt=".3f") if len(w) else "(no votes pulled yet)")
    print(f"\nvotes: {out['votes_counted']} counted by QC (one per worker and pair) of {out['votes_pulled']} pulled; "
          f"{out['repeats']} repeat(s) ignored (a worker answering a pair again: QC keeps the latest answer)")
    if out["team"] is not None:
        print(f"\n## Team\n\n{out['team']['team_note']}")
    print(f"\nquarantined annotations: {out['quarantined']}")
    print(f"gold controls: {out['gold']}" + ("" if out["gold"] else " (none yet: pushes carry no controls; "
                                                                   "`synsetforge crowd gold --refresh` builds them)"))
    return 0


def cmd_gold(args: argparse.Namespace, settings: Any) -> int:
    from crowd.gold import GoldSeedError, refresh_gold

    store = store_from_settings(settings)
    if args.refresh:
        try:
            out = refresh_gold(store, settings)
        except GoldSeedError as exc:
            raise _user_error(str(exc)) from None
        print(f"gold: {out['gold']} control(s), {out['positives']} known positive(s) and {out['negatives']} known "
              f"negative(s) ({out.get('seed', 0)} from the seed file); {out['added']} added, {out['dropped']} dropped")
        if out.get("note"):
            print(f"note: {out['note']}")
        if out.get("seed_rows_unused"):
            print(f"{out['seed_rows_unused']} seed row(s) name an image the store does not hold or a synset outside "
                  "the vocabulary: left out")
        if out["added"] or out["dropped"]:
            print("the next `synsetforge qc` (or crowd DAG run) leaves the new controls out of the labels")
    from crowd.gold import gold_summary

    summary = gold_summary(store)
    if summary.empty:
        print("no gold controls yet: pushes carry none and QC runs without them; they are built from confident "
              "labels (`--refresh`, or the crowd DAG's refresh_gold) or taken from crowd.gold_seed_file")
        return 0
    print(summary.to_markdown(index=False, floatfmt=".3f"))
    return 0


def cmd_workers(args: argparse.Namespace, settings: Any) -> int:
    from crowd.pull import PseudonymKeyMissing
    from crowd.status import set_blocked, workers_report

    client = admin_client(settings)
    try:
        for who, blocked in ((args.block, True), (args.unblock, False)):
            if who:
                out = set_blocked(client, settings, who, blocked)
                verb = "blocked" if blocked else "unblocked"
                print(f"{verb} {out['worker']} (Label Studio account {out['user_id']})"
                      + ("" if out["changed"] else f": it was {verb} already"))
                if not blocked and settings.crowd.auto_block and out["worker"] not in settings.crowd.block_exempt:
                    print(f"note: crowd.auto_block is on; if {out['worker']} is still flagged, the next crowd run "
                          "blocks it again unless crowd.block_exempt lists it")
        if args.block or args.unblock:
            return 0
        table = workers_report(store_from_settings(settings), client, settings)
    except (PseudonymKeyMissing, CrowdError) as exc:
        raise _user_error(str(exc)) from None
    if table.empty:
        print("(no workers yet: nobody's votes have been pulled)")
        return 0
    if not args.emails:
        table = table.drop(columns="email")
    if settings.crowd.admin_password is None:
        print("blocked: unknown (set SYNSETFORGE__CROWD__ADMIN_PASSWORD to see who is blocked)\n")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    return 0


def require_pseudonym_key(settings: Any) -> None:
    """`crowd serve` and `crowd loop` refuse to start without the pseudonym key: every pull needs it, and a key
    chosen later would give every annotator a second pseudonym."""
    secret = settings.crowd.pseudonym_key
    if secret is None or not secret.get_secret_value():
        raise _user_error(
            "crowd.pseudonym_key is not set: export SYNSETFORGE__CROWD__PSEUDONYM_KEY first, a long random secret "
            "(e.g. `export SYNSETFORGE__CROWD__PSEUDONYM_KEY=$(openssl rand -hex 32)`) kept with your other secrets. "
            "Pull hashes each annotator's email with it before anything is stored, and it must stay the same: "
            "a new key gives every annotator a new pseudonym")


def cmd_serve(args: argparse.Namespace, settings: Any) -> int:
    from crowd.server import start_labelstudio

    require_pseudonym_key(settings)
    data_dir = Path(args.data_dir or settings.crowd.data_dir).resolve()
    token_file = data_dir / "admin-token"
    password_file = data_dir / "admin-password"
    token = settings.crowd.token.get_secret_value() if settings.crowd.token else None
    if token is None and token_file.exists():
        token = token_file.read_text().strip()
    # The admin account is created on the first start only, so its password is kept for the next ones (blocking
    # workers logs in to Label Studio's /admin/ site with it).
    fresh = not (data_dir / "label_studio.sqlite3").exists()
    password = password_file.read_text().strip() if password_file.exists() else None
    if password is None and settings.crowd.admin_password is not None:
        password = settings.crowd.admin_password.get_secret_value()
    files_root = settings.crowd.files_root or (settings.store.url if "://" not in settings.store.url else None)
    try:
        srv = start_labelstudio(data_dir, port=args.port, token=token, password=password,
                                files_root=Path(files_root) if files_root else None, timeout=args.timeout)
    except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
        raise _user_error(str(exc)) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    for path, secret in ((token_file, srv.token), (password_file, srv.password if (fresh or password) else None)):
        if secret is not None:
            path.write_text(secret)
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    public = (settings.crowd.public_url or srv.url).rstrip("/")
    print(f"Label Studio is up at {srv.url} (PID {srv.pid}; data and log in {data_dir})")
    if password_file.exists():
        print(f"admin login: {public}/user/login/   email {srv.username}   password {srv.password}")
        print(f"  (the password is kept in {password_file}, the API token in {token_file}; both readable by you only)")
    else:
        print(f"admin login: {public}/user/login/   email {srv.username}   password: set by an earlier start and not "
              f"kept in {data_dir}; blocking workers needs it in SYNSETFORGE__CROWD__ADMIN_PASSWORD")
    print(f"export SYNSETFORGE__CROWD__URL={srv.url}")
    print(f"export SYNSETFORGE__CROWD__TOKEN=$(cat {token_file})")
    if password_file.exists():
        print(f"export SYNSETFORGE__CROWD__ADMIN_PASSWORD=$(cat {password_file})")
    print("annotators: `synsetforge crowd invite` prints the sign-up link; `synsetforge crowd invite --create EMAIL` "
          "makes an account and prints its password. Ctrl-C stops the server.")
    sys.stdout.flush()
    if args.detach:
        return 0
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    srv.stop()
    return 0


def cmd_invite(args: argparse.Namespace, settings: Any) -> int:
    import secrets as secrets_mod

    from crowd.status import create_account, invite_link

    client = admin_client(settings)
    base = settings.crowd.public_url or client.url
    try:
        if not args.create:
            link = invite_link(client, base, reset=args.reset)
            print(f"{'new ' if args.reset else ''}invite link (anyone holding it can make an annotator account on "
                  f"this server; `--reset` replaces it):\n{link}")
            return 0
        made = []
        for email in args.create:
            if "@" not in email:
                raise _user_error(f"--create {email!r}: give the annotator's email address")
            password = secrets_mod.token_urlsafe(12)
            uid, created = create_account(client, email, password)
            made.append((email, uid, password if created else None))
        if args.reset:
            invite_link(client, base, reset=True)
    except CrowdError as exc:
        raise _user_error(str(exc)) from None
    from crowd.pull import pseudonym

    key = settings.crowd.pseudonym_key.get_secret_value().encode() if settings.crowd.pseudonym_key else None
    print(f"log in at {base.rstrip('/')}/user/login/ (passwords are printed once and kept nowhere; Label Studio's "
          "open-source edition has no page for changing one, the admin can set a new one at /admin/):")
    for email, uid, password in made:
        who = f"   pseudonym {pseudonym(email, key)}" if key else ""
        print(f"  {email}   password {password}   (account {uid}){who}" if password else
              f"  {email}   already has an account ({uid}); its password is unchanged{who}")
    if key:
        print("the pseudonyms are what votes, QC and `crowd workers` call them; list them in qc.team to tell QC who "
              "the team is")
    return 0


def ensure_instructions(client: CrowdClient, store: Any, settings: Any, project_id: int, kind: str) -> bool:
    """Set the project's instructions (`crowd.kinds.instructions_html`: what counts as yes, the keys, each synset's
    definition and accepted examples) when they differ from what the server holds; True when they changed."""
    from crowd.kinds import instructions_html
    from crowd.push import PlanError, accepted_examples, image_url_resolver

    if not store.has_table("synsets") or kind not in ("verify", "grid"):
        return False
    synsets = store.read_table("synsets").to_pandas().to_dict("records")
    examples: dict[str, list[str]] = {}
    if store.has_table("images"):
        images = store.read_table("images").to_pandas()
        images = images[images["image_id"].notna() & images["storage_key"].notna()]
        try:
            resolve = image_url_resolver(store, images, files_root=settings.crowd.files_root,
                                         expiry_s=settings.crowd.image_url_expiry_s)
            examples = accepted_examples(store, resolve)
        except PlanError:
            examples = {}
    text = instructions_html(kind, synsets, examples)
    proj = client.get_json(f"/api/projects/{project_id}/")
    if proj.get("show_instruction") and _shown(proj.get("expert_instruction") or "") == _shown(text):
        return False  # Label Studio re-serialises the HTML it keeps (bleach): compare what a reader sees
    client.call(f"set the instructions of project {project_id}", client.sdk.projects.update, id=project_id,
                expert_instruction=text, show_instruction=True)
    return True


def _shown(markup: str) -> tuple[str, tuple[str, ...]]:
    """What instructions show: their text (entities decoded, whitespace collapsed) and the images' sources."""
    import html as html_mod
    import re

    srcs = tuple(html_mod.unescape(m) for m in re.findall(r'src="([^"]*)"', markup))
    text = html_mod.unescape(re.sub(r"<[^>]+>", " ", markup))
    return " ".join(text.split()), srcs


def cmd_loop(args: argparse.Namespace, settings: Any) -> int:
    """pull -> QC -> refresh gold (while QC asks for votes) and block flagged workers (crowd.auto_block) -> push,
    every --interval seconds, as the crowd DAG does. The first Ctrl-C stops the loop after the step in progress (each
    step can be rerun), a second one at once."""
    import threading
    from datetime import datetime

    require_pseudonym_key(settings)
    client = admin_client(settings)
    store = store_from_settings(settings)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("stopping after the step in progress (Ctrl-C again stops at once) ...", flush=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    rounds = 0
    try:
        print(f"crowd loop: pull -> qc -> push every {args.interval:g} s on {store.url} (kind {args.kind}, "
              f"Label Studio {client.url}); Ctrl-C stops it", flush=True)
        told = None
        while not stop.is_set():
            rounds += 1
            said = loop_round(client, store, settings, args.kind, method=args.method, stop=stop)
            print(f"round {rounds} ({datetime.now().strftime('%H:%M:%S')}): {said['line']}", flush=True)
            if said["team"] and said["team"] != told:  # the team's situation, when it changes
                print(f"  {said['team']}", flush=True)
                told = said["team"]
            if args.rounds and rounds >= args.rounds:
                break
            stop.wait(args.interval)
    except CrowdError as exc:
        raise _user_error(str(exc)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"crowd loop stopped after {rounds} round(s); `synsetforge crowd loop` picks up where it left off", flush=True)
    return 0


def loop_round(client: CrowdClient, store: Any, settings: Any, kind: str, *, method: str | None = None,
               stop: Any = None) -> dict[str, str | None]:
    """One round of the crowd loop (the crowd DAG's tasks in order); returns what happened in words (`line`) and the
    team's situation (`team`, QC's team_note). Between steps it returns early once `stop` (a threading.Event) is
    set."""
    from crowd.gold import refresh_gold
    from crowd.provision import cors_origin, ensure_bucket_cors
    from crowd.pull import pull
    from crowd.push import push
    from crowd.status import block_flagged
    from pipeline.qc.stage import run_qc

    said: list[str] = []
    out: dict[str, str | None] = {"line": "", "team": None}

    def done() -> dict[str, str | None]:
        out["line"] = "; ".join(said)
        return out

    ids = project_ids(client, settings, [kind])
    pulled = pull(store, client, settings, project_ids=ids) if ids else {"new_votes": 0, "total_votes": 0}
    said.append(f"pulled {pulled['new_votes']} new vote(s) ({pulled['total_votes']} in all)")
    if stop is not None and stop.is_set():
        return done()
    qc = run_qc(store, settings, method=method)
    said.append(f"qc: {qc['pairs']} pair(s), {qc['accepted']} accepted, {qc['rejected']} rejected, {qc['pending']} "
                f"pending; {qc['push_pairs']} pair(s) to ask ({qc['push_votes']} vote(s))")
    out["team"] = qc.get("team_note")
    if stop is not None and stop.is_set():
        return done()
    gold = refresh_gold(store, settings, grow=qc["push_pairs"] > 0)
    if gold.get("added") or gold.get("dropped"):
        said.append(f"gold: {gold['gold']} control(s) ({gold['added']} added, {gold['dropped']} dropped)")
    if settings.crowd.auto_block:
        blocked = block_flagged(store, client, settings)
        if blocked["blocked"]:
            said.append(f"blocked {len(blocked['blocked'])} flagged worker(s)")
    if stop is not None and stop.is_set():
        return done()
    if qc["push_pairs"]:
        ensure_bucket_cors(store, cors_origin(settings, client))
        pushed = push(store, client, settings, kind=kind)  # to projects of each request's overlap
        for pid in pushed["projects"]:
            ensure_instructions(client, store, settings, pid, kind)
        said.append(f"pushed {pushed['pushed']} task(s) ({pushed['gold']} gold)" if pushed["pushed"] else
                    "pushed nothing new: the pairs QC asks about are still open in Label Studio")
    else:
        said.append("nothing to push: settled" if not qc.get("needs_new_annotator") else
                    "nothing to push: settled for this team (see the pairs that need a new annotator)")
    return done()


def cmd_boxes_sync(args: argparse.Namespace, settings: Any) -> int:
    import json

    from crowd.boxes import sync

    summary = sync(store_from_settings(settings), settings, steps=args.steps)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("crowd", help="Label Studio: serve, push tasks, pull votes, status")
    sub = p.add_subparsers(dest="crowd_command", metavar="ACTION", required=True)
    push = sub.add_parser("push", help="push the QC push plan as tasks (provisions the project first)")
    push.add_argument("--plan", help="a plan file (Parquet or CSV: image_id, wnid, n_more) instead of the push_plan table")
    push.add_argument("--kind", default="verify", choices=sorted(KINDS))
    push.add_argument("--overlap", type=int, help="annotations per task for every request of this push (default: each "
                      "plan row's n_more); they go to a project of that overlap, never changing a pushed task's")
    push.set_defaults(func=cmd_push)
    pull = sub.add_parser("pull", help="append new annotations to the votes table")
    pull.add_argument("--kind", action="append", default=None, choices=sorted(KINDS))
    pull.set_defaults(func=lambda a, s: cmd_pull(argparse.Namespace(**{**vars(a), "kind": a.kind or ["verify"]}), s))
    st = sub.add_parser("status", help="per synset open/done tasks, workers and gold accuracy")
    st.set_defaults(func=cmd_status)
    gd = sub.add_parser("gold", help="the gold controls per synset; --refresh rebuilds them from confident labels "
                                     "and crowd.gold_seed_file")
    gd.add_argument("--refresh", action="store_true", help="rebuild the gold table first")
    gd.set_defaults(func=cmd_gold)
    wk = sub.add_parser("workers", help="workers with votes, gold accuracy, QC's estimate and flags, blocked or not; "
                                        "--block / --unblock one")
    one = wk.add_mutually_exclusive_group()
    one.add_argument("--block", metavar="W", help="block worker W (pseudonym w-..., or the account's email)")
    one.add_argument("--unblock", metavar="W", help="unblock worker W")
    wk.add_argument("--emails", action="store_true", help="show each worker's account email (admin eyes only)")
    wk.set_defaults(func=cmd_workers)
    iv = sub.add_parser("invite", help="print the link annotators sign up with, or create named annotator accounts")
    iv.add_argument("--create", action="append", metavar="EMAIL",
                    help="create an annotator account and print its password (repeatable)")
    iv.add_argument("--reset", action="store_true", help="replace the invite link (the old one stops working)")
    iv.set_defaults(func=cmd_invite)
    lp = sub.add_parser("loop", help="pull -> qc -> push on an interval, for a team without Airflow (Ctrl-C stops it)")
    lp.add_argument("--interval", type=float, default=60.0, help="seconds between rounds (default 60)")
    lp.add_argument("--kind", default="verify", choices=sorted(k for k in KINDS if k in ("verify", "grid")))
    lp.add_argument("--method", choices=["adaptive-ds", "ds", "mv", "confidence-table"],
                    help="QC method (default: the qc.method setting)")
    lp.add_argument("--rounds", type=int, help="stop after this many rounds (default: until Ctrl-C)")
    lp.set_defaults(func=cmd_loop)
    sv = sub.add_parser("serve", help="start a local Label Studio and print its admin login (Ctrl-C stops it)")
    sv.add_argument("--data-dir", help="server data dir (default crowd.data_dir)")
    sv.add_argument("--port", type=int)
    sv.add_argument("--timeout", type=float, default=180.0)
    sv.add_argument("--detach", action="store_true", help="leave it running and return (stop it by its PID)")
    sv.set_defaults(func=cmd_serve)
    boxes = subparsers.choices.get("boxes")  # registered by pipeline.boxes (the stage's own commands)
    if boxes is not None:
        bs = boxes.subcommands.add_parser("sync", help="one reconcile step against Label Studio: pull answers, "
                                                       "plan, push next tasks")
        bs.add_argument("--steps", type=int, default=1, help="repeat pull -> plan -> push this many times")
        bs.set_defaults(func=cmd_boxes_sync)
