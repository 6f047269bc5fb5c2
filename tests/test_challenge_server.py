"""The challenge server as it runs: uvicorn on loopback over SQLite and a PostgreSQL 15 started here.

Parallel clients against the real server never push a team past its limit and lose nothing; a walk over every
route (anonymous, as a team by session and by token) finds no test label and no other team's submission;
form posts without the session's CSRF token are refused; tokens never reach the server's log.
"""

from __future__ import annotations

import http.cookiejar
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from challenge.audit import find_test_labels
from challenge.service import open_service
from challenge.web import create_app
from pipeline.release.build import build_release
from pipeline.release.synthetic import make_fixture
from pipeline.services import free_port, start_service
from pipeline.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres(artifacts_dir):
    from challenge.postgres import start_postgres

    pg = start_postgres(artifacts_dir / "postgres")
    yield pg
    pg.stop()
    assert pg.process.poll() is not None


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_parallel_uploads_never_exceed_a_teams_limit(database, request, tmp_path):
    from benchmarks.challenge import concurrent_uploads

    url = request.getfixturevalue("postgres").url if database == "postgresql" else None
    r = concurrent_uploads(url, tmp_path, teams=5, per_team=5, limit=2)
    assert r["answers"] == 25 and r["statuses"] == [201, 429]
    assert r["lost"] == 0 and r["accepted"] == 10 and r["limited"] == 15
    assert r["per_team"] == {t: 2 for t in range(5)}


class Client:
    """A browser-like client with its own cookies (no redirects followed, so 303s are seen)."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        return self._do(urllib.request.Request(self.base + path, headers=headers or {}))

    def post(self, path: str, fields: dict, headers: dict | None = None) -> tuple[int, bytes]:
        data = urllib.parse.urlencode(fields).encode()
        return self._do(urllib.request.Request(self.base + path, data=data, headers=headers or {}, method="POST"))

    def _do(self, req) -> tuple[int, bytes]:
        try:
            with self.opener.open(req, timeout=120) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def sign_in(self, token: str) -> None:
        status, page = self.get("/signin")
        pre = re.search(rb'name="pre" value="([^"]+)"', page).group(1).decode()
        status, _ = self.post("/signin", {"pre": pre, "token": token})
        assert status == 303


@pytest.fixture
def running(tmp_path, artifacts_dir):
    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    make_fixture(store, n_classes=4, per_class=14, seed=11, box_fraction=0.8)
    build_release(store, "w1", val_per_class=2, test_per_class=5, neardup=False, challenge=True)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    svc = open_service(str(store_dir), db)
    now = datetime.utcnow()
    svc.create_challenge("walk", "w1", "cls", [dict(name="main", opens_at=now - timedelta(hours=1),
                                                    closes_at=now + timedelta(days=2), per_week=3)])
    _, token_a = svc.add_team("alpha")
    _, token_b = svc.add_team("bravo")
    organiser = svc.add_organiser_token()
    port = free_port()
    log = artifacts_dir / f"challenge-server-{port}.log"
    server = start_service("challenge", [str(ROOT / ".venv/bin/synsetforge"), "--store", str(store_dir), "challenge",
                                         "--db", db, "serve", "--port", str(port)],
                           url=f"http://127.0.0.1:{port}", ready_path="/healthz", log_path=log)
    yield {"url": server.url, "svc": svc, "a": token_a, "b": token_b, "organiser": organiser, "log": log,
           "held": svc.held_out("w1"), "store": str(store_dir)}
    server.stop()
    assert server.process.poll() is not None


def _upload(url: str, token: str, data: bytes, desc: str = "") -> tuple[int, bytes]:
    req = urllib.request.Request(f"{url}/api/c/walk/submissions", data=data, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "X-Description": desc})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_every_route_hides_test_labels_and_other_teams_submissions(running):
    url, held, svc = running["url"], running["held"], running["svc"]
    import json

    truth = "".join(f"{t}\n" for t in held.truth).encode()  # team bravo's perfect submission
    status, body = _upload(url, running["b"], truth, "bravo-secret-marker")
    assert status == 201
    b_id = json.loads(body)["id"]
    status, body = _upload(url, running["a"], "".join(f"{t % 4 + 1}\n" for t in held.truth).encode(), "alpha run")
    a_id = json.loads(body)["id"]
    b_sha = svc.team_submissions("walk", svc.team_id("bravo"))[0]["sha256"]

    anonymous, alpha = Client(url), Client(url)
    alpha.sign_in(running["a"])
    bearer = {"Authorization": f"Bearer {running['a']}"}
    app = create_app(svc)
    seen = 0
    for route in app.routes:
        if "GET" not in (route.methods or set()):
            continue
        for sub_id in (a_id, b_id):
            path = route.path.replace("{slug}", "walk").replace("{sub_id}", str(sub_id))
            for who, client, headers in (("anonymous", anonymous, {}), ("alpha", alpha, {}),
                                         ("alpha-token", anonymous, bearer)):
                status, body = client.get(path, headers)
                seen += 1
                assert status < 500, (path, who, body[:300])
                assert find_test_labels(body, held, f"{who} GET {path}") == []
                # nothing of bravo's submission: not its file, its hash or its description
                assert truth not in body and b_sha.encode() not in body and b"bravo-secret-marker" not in body, \
                    (who, path)
                if "{sub_id}" in route.path and sub_id == b_id:
                    assert status in (303, 401, 404), (who, path, status)
    assert seen > 40
    # alpha does see its own submission and the leaderboard; the private board stays closed
    status, page = alpha.get(f"/c/walk/submissions/{a_id}")
    assert status == 200 and b"alpha" in page
    status, page = alpha.get("/c/walk/private")
    assert status == 403 and b"shown when the phase closes" in page
    status, _ = anonymous.get("/api/c/walk/leaderboard?board=private")
    assert status == 403
    # organisers see flags through the API; teams do not
    assert anonymous.get("/api/c/walk/flags", bearer)[0] == 403
    assert anonymous.get("/api/c/walk/flags", {"Authorization": f"Bearer {running['organiser']}"})[0] == 200


class Bravo:
    """Team bravo's perfect submission (the test labels in order) and everything that identifies it."""

    def __init__(self, running):
        import json

        self.truth = "".join(f"{t}\n" for t in running["held"].truth).encode()
        status, body = _upload(running["url"], running["b"], self.truth, "bravo-secret-marker")
        assert status == 201
        self.id = json.loads(body)["id"]
        svc = running["svc"]
        self.sha = svc.team_submissions("walk", svc.team_id("bravo"))[0]["sha256"].encode()

    def check(self, body: bytes, held, what: str) -> None:
        assert find_test_labels(body, held, what) == [], what
        assert self.truth not in body and self.sha not in body and b"bravo-secret-marker" not in body, what


def _multipart(fields: dict, file: bytes | None = None) -> tuple[bytes, dict]:
    boundary = "sfboundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in fields.items()]
    if file is not None:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.txt\"\r\n"
                     "Content-Type: text/plain\r\n\r\n".encode() + file + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _csrf(client: Client) -> str:
    status, page = client.get("/c/walk/submit")
    assert status == 200
    return re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()


def test_post_answers_and_the_pages_after_the_close_show_no_test_label_nor_another_teams_submission(running):
    """The route walk above covers GET while the phase is open; this one every POST route's answers (accepted,
    refused, invalid, over the limit) and, once the phase has closed, every GET route again: the private board and
    the analysis now show."""
    import json

    url, held, svc = running["url"], running["held"], running["svc"]
    bravo = Bravo(running)
    wrong = "".join(f"{t % 4 + 1}\n" for t in held.truth).encode()
    status, body = _upload(url, running["a"], wrong, "alpha run")
    a_id = json.loads(body)["id"]
    anonymous, alpha = Client(url), Client(url)
    alpha.sign_in(running["a"])
    bearer = {"Authorization": f"Bearer {running['a']}"}
    answers: list[tuple[str, int, bytes]] = []

    def post(client, path, data: bytes, headers=None):
        req = urllib.request.Request(url + path, data=data, method="POST", headers=headers or {})
        status, body = client._do(req)
        answers.append((path, status, body))
        return status

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    enc = urllib.parse.urlencode
    # sign-in: forged, wrong token, right token (a fresh client)
    assert post(anonymous, "/signin", enc({"pre": "x", "token": running["a"]}).encode(), form) == 403
    walker = Client(url)
    _, page = walker.get("/signin")
    pre = re.search(rb'name="pre" value="([^"]+)"', page).group(1).decode()
    assert post(walker, "/signin", enc({"pre": pre, "token": "sfc_wrong"}).encode(), form) == 401
    assert post(walker, "/signin", enc({"pre": pre, "token": running["a"]}).encode(), form) == 303
    assert post(anonymous, "/signout", b"", form) == 403
    # the upload form: anonymous, without CSRF, invalid, accepted
    csrf = _csrf(alpha)
    assert post(anonymous, "/c/walk/submit", *_multipart({}, wrong)) == 401
    assert post(alpha, "/c/walk/submit", *_multipart({}, wrong)) == 403
    assert post(alpha, "/c/walk/submit", *_multipart({"csrf": csrf}, b"9\n" * 3)) == 422
    assert post(alpha, "/c/walk/submit", *_multipart({"csrf": csrf, "description": "form"}, wrong[:-2] + b"2\n")) == 201
    # finals: anonymous, another team's submission, its own
    assert post(anonymous, "/c/walk/finals", enc({"final": a_id}).encode(), form) == 401
    assert post(alpha, "/c/walk/finals", enc({"csrf": csrf, "final": bravo.id}).encode(), form) == 400
    assert post(alpha, "/c/walk/finals", enc({"csrf": csrf, "final": a_id}).encode(), form) == 303
    # the API: no token, invalid, accepted, over the limit (3 a week), finals
    assert post(anonymous, "/api/c/walk/submissions", wrong) == 401
    assert post(anonymous, "/api/c/walk/submissions", b"1\n", bearer) == 422
    assert post(anonymous, "/api/c/walk/submissions", wrong[:-2] + b"3\n", bearer) == 201
    assert post(anonymous, "/api/c/walk/submissions", wrong, bearer) == 429
    assert post(anonymous, "/api/c/walk/finals", json.dumps({"ids": [bravo.id]}).encode(), bearer) == 403
    assert post(anonymous, "/api/c/walk/finals", b"not json", bearer) == 400
    assert post(anonymous, "/api/c/walk/finals", json.dumps({"ids": [a_id]}).encode(), bearer) == 200
    post_routes = {r.path.replace("{slug}", "walk") for r in create_app(svc).routes if "POST" in (r.methods or set())}
    assert {p for p, _, _ in answers} == post_routes  # every POST route answered
    for path, status, body in answers:
        assert status < 500, (path, body[:300])
        bravo.check(body, held, f"POST {path} -> {status}")

    svc.close("walk")  # the phase closes (the server reads the same database)
    seen = set()
    for route in create_app(svc).routes:
        if "GET" not in (route.methods or set()):
            continue
        for sub_id in (a_id, bravo.id):
            path = route.path.replace("{slug}", "walk").replace("{sub_id}", str(sub_id))
            for who, client, headers in (("anonymous", anonymous, {}), ("alpha", alpha, {}),
                                         ("alpha-token", anonymous, bearer)):
                status, body = client.get(path, headers)
                assert status < 500, (path, who, body[:300])
                bravo.check(body, held, f"{who} GET {path} after the close")
                seen.add((path, status))
    assert ("/c/walk/private", 200) in seen and ("/c/walk/analysis", 200) in seen
    assert ("/api/c/walk/leaderboard", 200) in seen
    status, page = anonymous.get("/c/walk/private")
    assert b"bravo" in page and b"alpha" in page  # the private board is there, with both teams' scores only
    status, page = anonymous.get("/c/walk/analysis")
    assert status == 200 and b"<svg" in page
    status, body = anonymous.get("/api/c/walk/leaderboard?board=private")
    assert status == 200 and {r["team"] for r in json.loads(body)["rows"]} == {"alpha", "bravo"}
    bravo.check(body, held, "private board API after the close")


def test_signing_out_needs_the_sessions_csrf_token(running):
    url = running["url"]
    alpha, bravo = Client(url), Client(url)
    alpha.sign_in(running["a"])
    bravo.sign_in(running["b"])
    csrf = _csrf(alpha)
    cookie = next(c.value for c in alpha.jar if c.name == "sf_session")
    assert alpha.post("/signout", {})[0] == 403
    assert alpha.post("/signout", {"csrf": "forged"})[0] == 403
    assert bravo.post("/signout", {"csrf": csrf})[0] == 403  # another session's token does not sign bravo out
    assert Client(url).post("/signout", {"csrf": csrf})[0] == 403  # nor anyone without the cookie
    assert alpha.get("/c/walk/submit")[0] == 200 and bravo.get("/c/walk/submit")[0] == 200  # both still in
    assert running["svc"].session(cookie) is not None
    status, _ = alpha.post("/signout", {"csrf": csrf})
    assert status == 303 and running["svc"].session(cookie) is None  # the session is gone on the server
    assert alpha.get("/c/walk/submit")[0] == 303  # sent to the sign-in page
    assert Client(url).get("/c/walk/submit", {"Cookie": f"sf_session={cookie}"})[0] == 303  # replayed: nobody
    assert bravo.get("/c/walk/submit")[0] == 200


def test_a_participant_submits_from_the_command_line_with_its_token(running, monkeypatch, capsys, tmp_path):
    from challenge.cli import TOKEN_ENV
    from pipeline.cli import main

    url, held, svc = running["url"], running["held"], running["svc"]
    good = tmp_path / "predictions.txt"
    good.write_text("".join(f"{t}\n" for t in held.truth))
    cmd = ["--store", running["store"], "challenge", "submit", "walk"]
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main([*cmd, str(good), "--server", url]) == 2
    assert TOKEN_ENV in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, running["a"])
    assert main([*cmd, str(good), "--server", url, "--description", "from the command line"]) == 0
    out = capsys.readouterr().out
    m = re.fullmatch(r"submission (\d+): public top5_error 0\.0; 2 left in this window\n", out)
    assert m, out
    mine = svc.team_submissions("walk", svc.team_id("alpha"))
    assert [(s["id"], s["description"]) for s in mine] == [(int(m.group(1)), "from the command line")]
    bad = tmp_path / "bad.txt"
    bad.write_text("9\n7 1\n")
    assert main([*cmd, str(bad), "--server", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 422: The submission was not scored and does not count against your limit.")
    assert re.search(r"\n  line count \(1\): .+", err) and re.search(r"\n  index out of range \(\d\): .+", err)
    assert svc.quota("walk", svc.team_id("alpha"))[0].used == 1  # the refused one did not count
    monkeypatch.setenv(TOKEN_ENV, "sfc_" + "x" * 40)
    assert main([*cmd, str(good), "--server", url]) == 2
    assert "401: a team token is needed" in capsys.readouterr().err
    monkeypatch.setenv(TOKEN_ENV, running["a"])
    assert main([*cmd, str(good), "--server", f"http://127.0.0.1:{free_port()}"]) == 2  # nobody listening
    err = capsys.readouterr().err
    assert "cannot reach the challenge server" in err and running["a"] not in err


def test_form_posts_need_the_sessions_csrf_token_and_tokens_stay_out_of_logs(running):
    url = running["url"]
    alpha = Client(url)
    alpha.sign_in(running["a"])
    boundary = "sfboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../../etc/x.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n1\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(url + "/c/walk/submit", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    status, page = alpha._do(req)
    assert status == 403 and b"CSRF" in page  # no csrf field: refused before anything is read as a submission
    assert running["svc"].quota("walk", running["svc"].team_id("alpha"))[0].used == 0
    status, _ = alpha.post("/c/walk/finals", {"final": "1"})
    assert status == 403
    # with the form's CSRF token the upload is scored; the client's file name is never used for anything
    status, page = alpha.get("/c/walk/submit")
    csrf = re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()
    held = running["held"]
    evil = Path("/tmp") / f"sf-evil-{held.digest[:12]}.txt"
    content = "".join(f"{t}\n" for t in held.truth)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../../../..{evil}\"\r\n"
            f"Content-Type: text/plain\r\n\r\n{content}\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(url + "/c/walk/submit", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    status, page = alpha._do(req)
    assert status == 201 and b"Scored: submission" in page
    assert not evil.exists()
    import hashlib

    kept = running["svc"].store.list("private/challenges/walk/submissions")
    assert kept == [f"private/challenges/walk/submissions/{hashlib.sha256(content.encode()).hexdigest()}"]
    # sign-in without the pre-session cookie's value is refused too (login CSRF)
    status, _ = Client(url).post("/signin", {"pre": "forged", "token": running["a"]})
    assert status == 403
    # an upload larger than the cap is cut off while it arrives
    svc = running["svc"]
    from challenge.db import Challenge, write_session

    with write_session(svc.engine) as s:
        s.query(Challenge).filter(Challenge.slug == "walk").update({"max_upload_bytes": 1000})
    status, _ = _upload(url, running["a"], b"1\n" * 5000)
    assert status == 413
    log = Path(running["log"]).read_text()
    assert "/c/walk/submit" in log  # the access log is there
    for token in (running["a"], running["b"], running["organiser"]):
        assert token not in log and token[4:20] not in log


def test_boards_finals_ladder_and_snapshots_on_postgresql(postgres, tmp_path):
    from challenge.boards import build_board, snapshot
    from challenge.db import make_engine
    from challenge.service import ChallengeService

    store = LocalStore(tmp_path / "store")
    make_fixture(store, n_classes=4, per_class=14, seed=12, box_fraction=0.5)
    build_release(store, "p1", val_per_class=2, test_per_class=5, neardup=False, challenge=True)
    engine = make_engine(postgres.url)
    svc = ChallengeService(engine, store)
    now = datetime(2026, 12, 1, 12)
    svc.create_challenge("pg-cls", "p1", "cls", [dict(name="main", opens_at=now - timedelta(days=1),
                                                      closes_at=now + timedelta(days=9), per_day=3)], ladder=True)
    held = svc.held_out("p1")
    team, _ = svc.add_team("pg team")
    other, _ = svc.add_team("pg other")
    wrong = "".join(f"{t % 4 + 1}\n" for t in held.truth).encode()
    right = "".join(f"{t}\n" for t in held.truth).encode()
    first = svc.submit("pg-cls", team.id, wrong, now=now)
    second = svc.submit("pg-cls", team.id, right, now=now)
    assert first.ladder_moved and second.ladder_moved and second.shown_score == 0.0
    again = svc.submit("pg-cls", team.id, right, now=now)
    assert again.ladder_moved is False and again.shown_score == 0.0 and again.quota[0].left == 0
    svc.submit("pg-cls", other.id, wrong, now=now)
    svc.select_finals("pg-cls", team.id, [first.submission_id], now=now)
    board = build_board(svc, "pg-cls", now=now)
    assert [r.team for r in board.rows] == ["pg team", "pg other"] and board.rows[0].better_than_next
    svc.close("pg-cls", now=now + timedelta(days=1))
    private = build_board(svc, "pg-cls", "private", now=now + timedelta(days=1))
    assert {r.team: r.submission_id for r in private.rows}["pg team"] == first.submission_id
    assert snapshot(svc, "pg-cls", "public", now=now + timedelta(days=1))["version"] == 2
    engine.dispose()
