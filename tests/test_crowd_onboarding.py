"""Getting a team in and a loop that knows it.

Without a server: QC's plan never asks a pair for more votes than the team can still give, a pair nobody left can
vote on says so (needs_new_annotator) and is decided at the small-team bar or left pending by the setting; votes QC
ignores (repeats) are counted apart, the same way in crowd status, the workers tables and the release report;
`crowd serve` refuses to start without the pseudonym key.

With the real Label Studio (slow): `crowd serve` prints the admin login and where it is kept and stops on Ctrl-C;
`crowd invite` prints the invite link and creates named accounts whose printed passwords log in; `crowd loop` runs
rounds and stops cleanly on SIGINT; in headless Chromium at 1366x768 the project instructions open before labeling
and the yes / no answer, the whole photo and Submit are on screen without scrolling for a portrait and a landscape
photo, and every grid cell's tick sits at the same height whatever the photo's shape.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_settings
from pipeline.qc.team import NEEDS_NEW_ANNOTATOR, active_team, apply_team, vote_accounting
from pipeline.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
WNID = "n02084071"
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def votes_frame(rows: list[tuple[str, str, str]], *, start: datetime = T0, wnid: str = WNID) -> pd.DataFrame:
    """A votes table from (image, worker, answer) rows, one annotation each, a second apart."""
    return pd.DataFrame([{"annotation_id": k + 1, "task_id": k + 1, "image_id": i, "wnid": wnid, "worker": w,
                          "answer": a, "is_gold": False, "lead_time_s": 2.0,
                          "submitted_at": start + timedelta(seconds=k)} for k, (i, w, a) in enumerate(rows)])


def image(n: int) -> str:
    return f"{n:064x}"


# -- the plan knows its team -------------------------------------------------------------------------------------
def test_the_plan_never_asks_a_pair_more_than_the_active_team_can_give(tmp_path):
    """Two active annotators (a third voted 40 days before the newest vote): a pair both have answered is asked
    nothing more, a pair one has answered at most one more vote, however unsure QC is. Without the team QC asks
    more (checked on the same votes through `aggregate`, which knows nothing of the team)."""
    from pipeline.qc.stage import aggregate, run_qc

    rows = []
    for n in range(30):  # plenty of history: both active workers are reliable
        rows += [(image(n), "w-a", "yes" if n % 3 else "no"), (image(n), "w-b", "yes" if n % 3 else "no")]
    rows += [(image(100), "w-a", "yes"), (image(100), "w-b", "no")]  # a disagreement: QC would want more
    rows += [(image(101), "w-a", "yes")]  # one vote so far
    old = votes_frame([(image(200), "w-old", "yes"), (image(100), "w-old", "no")], start=T0 - timedelta(days=40))
    old["annotation_id"] += 1000
    votes = pd.concat([old, votes_frame(rows)], ignore_index=True)
    store = LocalStore(tmp_path / "s")
    store.write_table("votes", votes)
    pairs = pd.DataFrame({"image_id": [image(102)], "wnid": [WNID]})  # ingested, nobody voted yet
    settings = load_settings(env={})

    _, _, untouched, _ = aggregate(votes, pd.DataFrame(), pairs, settings.qc)
    assert untouched.set_index("image_id").loc[image(100), "n_more"] > 0  # QC alone would ask for more

    summary = run_qc(store, settings, pairs=pairs)
    plan = store.read_table("push_plan").to_pandas().set_index("image_id")
    labels = store.read_table("labels").to_pandas().set_index("image_id")
    assert summary["team"] == 2 and summary["team_source"] == "window"
    voters = votes[votes["worker"].isin(["w-a", "w-b"])].groupby("image_id")["worker"].nunique()
    for image_id, row in plan.iterrows():
        assert row["n_more"] <= 2 - voters.get(image_id, 0), (image_id, row.to_dict())
    assert plan.loc[image(101), "n_more"] == 1 and plan.loc[image(102), "n_more"] == 2
    # the disagreement: both active workers voted, so it is decided at the small-team bar or needs someone new
    if image(100) in plan.index:
        assert plan.loc[image(100), "n_more"] == 0 and plan.loc[image(100), "reason"] == NEEDS_NEW_ANNOTATOR
        assert labels.loc[image(100), "status"] == "pending" and summary["needs_new_annotator"] >= 1
        assert "need a new annotator" in summary["team_note"]
    else:
        assert labels.loc[image(100), "method"].endswith("/small-team")
    assert "2 active annotator(s) (voted within 14 days of the newest vote)" in summary["team_note"]
    assert summary["push_pairs"] == int((plan["n_more"] > 0).sum())  # rows with n_more 0 ask nothing


def _case(qc_overrides: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """apply_team on a hand-made plan: three pairs both team members voted on (posteriors 0.95, 0.5 and 0.1), one
    pair only one of them has (0.6)."""
    qc = load_settings(env={}, overrides={"qc": {"team": ["w-a", "w-b"], **qc_overrides}}).qc
    votes = votes_frame([(image(1), "w-a", "yes"), (image(1), "w-b", "yes"), (image(2), "w-a", "yes"),
                         (image(2), "w-b", "no"), (image(3), "w-a", "no"), (image(3), "w-b", "no"),
                         (image(5), "w-a", "yes")])
    workers = pd.DataFrame({"worker": ["w-a", "w-b"], "flagged": False, "votes_used": True})
    ids = [image(n) for n in (1, 2, 3, 5)]
    conf = [0.95, 0.5, 0.1, 0.6]
    labels = pd.DataFrame({"image_id": ids, "wnid": WNID, "status": "pending", "n_votes": [2, 2, 2, 1],
                           "n_yes": [2, 1, 0, 1], "confidence": conf, "method": "adaptive-ds"})
    plan = pd.DataFrame({"image_id": ids, "wnid": WNID, "n_more": [1, 3, 1, 4], "reason": "uncertain",
                         "n_votes": [2, 2, 2, 1], "confidence": conf})
    return apply_team(labels, plan, votes, workers, qc)


def test_small_team_bars_decide_or_leave_pending_as_set():
    labels, plan, summary = _case({})
    status = labels.set_index("image_id")["status"].to_dict()
    method = labels.set_index("image_id")["method"].to_dict()
    assert status[image(1)] == "accepted" and method[image(1)] == "adaptive-ds/small-team"  # 0.95 >= 0.9
    assert status[image(3)] == "rejected" and method[image(3)] == "adaptive-ds/small-team"  # 0.1 <= 0.25
    assert status[image(2)] == "pending" and method[image(2)] == "adaptive-ds"  # 0.5: between the bars
    p = plan.set_index("image_id")
    assert p.loc[image(2), "reason"] == NEEDS_NEW_ANNOTATOR and p.loc[image(2), "n_more"] == 0
    assert p.loc[image(5), "n_more"] == 1 and p.loc[image(5), "reason"] == "uncertain"  # w-b can still vote
    assert image(1) not in p.index and image(3) not in p.index
    assert (summary["small_team_accepted"], summary["small_team_rejected"], summary["needs_new_annotator"]) == (1, 1, 1)
    assert (summary["push_pairs"], summary["push_votes"], summary["team_capped_votes"]) == (1, 1, 1 + 3 + 1 + 3)
    assert "listed in qc.team" in summary["team_note"] and "decided at the small-team bar" in summary["team_note"]

    off, plan_off, summary_off = _case({"small_team_decide": False})
    assert (off["status"] == "pending").all() and not off["method"].str.endswith("/small-team").any()
    assert set(plan_off.loc[plan_off["reason"] == NEEDS_NEW_ANNOTATOR, "image_id"]) == {image(n) for n in (1, 2, 3)}
    assert summary_off["needs_new_annotator"] == 3 and "qc.small_team_decide is false" in summary_off["team_note"]

    # a posterior no counted vote stands behind (only a flagged worker voted) is never decided at the lower bar
    qc = load_settings(env={}, overrides={"qc": {"team": ["w-x"]}}).qc
    lone = votes_frame([(image(9), "w-x", "yes")])
    flagged = pd.DataFrame({"worker": ["w-x"], "flagged": [True], "votes_used": [False]})
    lab = pd.DataFrame({"image_id": [image(9)], "wnid": WNID, "status": "pending", "n_votes": [1], "n_yes": [1],
                        "confidence": [0.97], "method": "adaptive-ds"})
    pl = lab[["image_id", "wnid"]].assign(n_more=2, reason="uncertain", n_votes=1, confidence=0.97)
    lab2, pl2, summ = apply_team(lab, pl, lone, flagged, qc)
    assert lab2["status"].tolist() == ["pending"] and pl2["reason"].tolist() == [NEEDS_NEW_ANNOTATOR]
    assert summ["team"] == 0 and summ["team_flagged"] == 1


def test_the_active_team_is_a_window_or_the_list():
    qc = load_settings(env={}).qc
    votes = pd.concat([votes_frame([(image(1), "w-a", "yes")], start=T0 - timedelta(days=20)),
                       votes_frame([(image(2), "w-b", "yes"), (image(3), "w-c", "no")])], ignore_index=True)
    workers = pd.DataFrame({"worker": ["w-a", "w-b", "w-c"], "flagged": [False, False, True]})
    team = active_team(votes, workers, qc)
    assert (team.members, team.source, team.flagged) == (frozenset({"w-b"}), "window", 1)
    wide = load_settings(env={"SYNSETFORGE__QC__ACTIVE_DAYS": "30"}).qc
    assert active_team(votes, workers, wide).members == frozenset({"w-a", "w-b"})
    listed = load_settings(env={"SYNSETFORGE__QC__TEAM": "w-a,w-new"}).qc
    assert active_team(votes, workers, listed).members == frozenset({"w-a", "w-new"})
    unknown = active_team(votes.iloc[:0], workers, qc)
    assert not unknown.known and "unknown" in unknown.describe()


def test_small_team_bars_must_lie_inside_the_normal_ones():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="small-team bars"):
        load_settings(env={"SYNSETFORGE__QC__SMALL_TEAM_ACCEPT_AT": "0.995"})


# -- honest accounting -------------------------------------------------------------------------------------------
def test_repeats_are_counted_apart_and_every_count_agrees(tmp_path, capsys):
    """A worker answering a pair again (the same photo pushed twice) is one vote QC uses and one repeat it ignores:
    crowd status, `crowd workers`' table, QC's workers table and the release report say the same per worker, and
    votes per accepted image counts only the votes QC used."""
    from crowd.status import status, workers_report
    from pipeline.cli import main
    from pipeline.qc.stage import run_qc
    from pipeline.release.build import build_release
    from pipeline.release.facts import collect
    from pipeline.release.report import build_report
    from pipeline.release.synthetic import make_fixture

    store = LocalStore(tmp_path / "store")
    make_fixture(store, n_classes=3, per_class=8, box_fraction=0.0, seed=7)
    votes = store.read_table("votes").to_pandas()
    rng = np.random.default_rng(1)
    again = votes.iloc[rng.choice(len(votes), 9, replace=False)].copy()  # nine pairs answered a second time
    again["annotation_id"] = votes["annotation_id"].max() + 1 + np.arange(len(again))
    again["submitted_at"] = again["submitted_at"] + pd.Timedelta(hours=1)
    again["answer"] = np.where(np.arange(len(again)) % 2, again["answer"], np.where(again["answer"] == "yes", "no", "yes"))
    all_votes = pd.concat([votes, again], ignore_index=True)
    store.write_table("votes", all_votes)
    planted = again["worker"].value_counts().to_dict()
    settings = load_settings(env={"SYNSETFORGE__STORE__URL": str(store.root)})

    run_qc(store, settings)
    build_release(store, "v1", val_per_class=2, test_per_class=1, neardup=False, force=True)
    build_report(store, "v1", thumbs_per_class=0)

    qc = store.read_table("workers").to_pandas().set_index("worker")["n_votes"].to_dict()
    counted = all_votes.drop_duplicates(["image_id", "wnid", "worker"]).groupby("worker").size().to_dict()
    assert qc == counted and sum(qc.values()) == len(votes)  # the repeats are not in QC's count

    acc = vote_accounting(all_votes).set_index("worker")
    assert acc["n_votes"].to_dict() == qc and acc["n_repeats"][acc["n_repeats"] > 0].to_dict() == planted

    st = status(store, None, [], settings)
    w = st["workers"].set_index("worker")
    assert w["n_votes"].to_dict() == qc and w["n_repeats"][w["n_repeats"] > 0].to_dict() == planted
    assert (st["votes_counted"], st["repeats"], st["votes_pulled"]) == (len(votes), 9, len(all_votes))
    rep = workers_report(store, None, settings).set_index("worker")
    assert rep["n_votes"].to_dict() == qc and int(rep["n_repeats"].sum()) == 9

    d = collect(store, "v1", thumbs_per_class=0)
    cost = d.cost["votes"]
    assert (cost["n_votes"], cost["n_repeats"], cost["n_pulled"]) == (len(votes), 9, len(all_votes))
    assert cost["workers_with_repeats"] == len(planted)
    assert cost["votes_per_image"] == pytest.approx(len(votes) / cost["accepted_images"])
    assert d.vote_counts.set_index("worker")["n_votes"].to_dict() == qc
    page = (store.root / "releases" / "v1" / "report.html").read_text()
    assert re.search(r"<td>repeats QC ignored</td><td>9</td>", page)
    assert re.search(rf"<td>verification votes QC counted</td><td>{len(votes)}</td>", page)

    assert main(["--store", str(store.root), "crowd", "status"]) == 0
    out = capsys.readouterr().out
    assert f"votes: {len(votes)} counted by QC (one per worker and pair) of {len(all_votes)} pulled; 9 repeat(s)" in out


# -- getting in ----------------------------------------------------------------------------------------------------
def test_crowd_serve_refuses_to_start_without_the_pseudonym_key(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.delenv("SYNSETFORGE__CROWD__PSEUDONYM_KEY", raising=False)
    data = tmp_path / "ls"
    assert main(["--store", str(tmp_path / "s"), "crowd", "serve", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "SYNSETFORGE__CROWD__PSEUDONYM_KEY" in err and "openssl rand" in err
    assert not (data / "label_studio.sqlite3").exists()  # nothing was started


def _crowd_env(ls, store_root: Path, prefix: str) -> dict[str, str]:
    return {**os.environ, "NLTK_DATA": str(ROOT / ".nltk_data"), "PYTHONUNBUFFERED": "1",
            "SYNSETFORGE__CROWD__URL": ls.url, "SYNSETFORGE__CROWD__TOKEN": ls.token,
            "SYNSETFORGE__CROWD__PSEUDONYM_KEY": "onboarding-key", "SYNSETFORGE__CROWD__FILES_ROOT": str(ls.files_root),
            "SYNSETFORGE__CROWD__PROJECT_PREFIX": prefix, "SYNSETFORGE__STORE__URL": str(store_root)}


class Lines:
    """A subprocess's output, read line by line by a thread (a pipe read through Python's buffer does not wake a
    selector for lines already buffered)."""

    def __init__(self, proc: subprocess.Popen):
        import threading

        self.proc, self.seen = proc, []
        self.thread = threading.Thread(target=lambda: [self.seen.append(ln.rstrip("\n")) for ln in proc.stdout],
                                       daemon=True)
        self.thread.start()

    def wait_for(self, pattern: str, timeout: float) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((ln for ln in list(self.seen) if rx.search(ln)), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None and not self.thread.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} (exit {self.proc.poll()}); output: {self.seen[-30:]}")

    def finish(self, timeout: float = 120.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout)
        self.thread.join(10)
        return rc


@pytest.mark.slow
def test_crowd_serve_prints_the_admin_login_keeps_it_and_stops_on_ctrl_c(tmp_path, artifacts_dir):
    from crowd.simulate import login_token

    data = tmp_path / "ls-data"
    env = {**os.environ, "SYNSETFORGE__CROWD__PSEUDONYM_KEY": "serve-key", "PYTHONUNBUFFERED": "1"}
    env.pop("SYNSETFORGE__CROWD__ADMIN_PASSWORD", None)
    env.pop("SYNSETFORGE__CROWD__TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--store", str(tmp_path / "store"), "crowd", "serve",
                             "--data-dir", str(data), "--timeout", "300"], env=env, cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Lines(proc)
    try:
        up = out.wait_for(r"^Label Studio is up at", 360)
        login = out.wait_for(r"^admin login:", 30)
        kept = out.wait_for(r"password is kept in", 30)
        out.wait_for(r"Ctrl-C stops the server", 30)
        url = re.search(r"(http://127\.0\.0\.1:\d+)", up).group(1)
        pid = int(re.search(r"PID (\d+)", up).group(1))
        email, password = re.search(r"email (\S+)\s+password (\S+)", login).groups()
        password_file = data / "admin-password"
        assert str(password_file) in kept and password_file.read_text() == password
        assert oct(password_file.stat().st_mode & 0o777) == "0o600"
        assert login_token(url, email, password)  # the printed login works through the web form
        with pytest.raises(Exception):  # noqa: B017 - the server refuses a wrong one (a 401, or no session)
            login_token(url, email, password + "x")
    finally:
        rc = out.finish()
        (artifacts_dir / "crowd-serve.log").write_text("\n".join(out.seen))
    assert rc == 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat")
        if not state.exists() or state.read_text().split(") ", 1)[1].startswith(("Z", "X")):
            break  # gone (or a zombie waiting for its reaper: it runs no more)
        time.sleep(0.5)
    else:
        raise AssertionError(f"Label Studio (PID {pid}) still runs after Ctrl-C")


@pytest.mark.slow
def test_crowd_invite_prints_the_link_and_creates_accounts_that_log_in(labelstudio, monkeypatch, capsys):
    from crowd.pull import pseudonym
    from crowd.simulate import login_token
    from pipeline.cli import main

    ls = labelstudio
    for k, v in {"URL": ls.url, "TOKEN": ls.token, "PSEUDONYM_KEY": "invite-key"}.items():
        monkeypatch.setenv(f"SYNSETFORGE__CROWD__{k}", v)
    admin = ls.admin()
    assert main(["crowd", "invite"]) == 0
    out = capsys.readouterr().out
    token = admin.get_json("/api/invite")["token"]
    assert f"{ls.url}/user/signup/?token={token}" in out

    email = f"alice-{os.getpid()}-{int(time.time())}@example.org"
    assert main(["crowd", "invite", "--create", email]) == 0
    out = capsys.readouterr().out
    password = re.search(rf"{re.escape(email)}\s+password (\S+)", out).group(1)
    assert pseudonym(email, b"invite-key") in out
    assert login_token(ls.url, email, password)  # the printed one-time password logs in
    assert admin.get_json("/api/invite")["token"] == token  # creating an account keeps the link people hold

    assert main(["crowd", "invite", "--create", email]) == 0
    again = capsys.readouterr().out
    assert "already has an account" in again and password not in again
    assert main(["crowd", "invite", "--reset"]) == 0
    fresh = capsys.readouterr().out
    new = admin.get_json("/api/invite")["token"]
    assert new != token and new in fresh and token not in fresh
    assert main(["crowd", "invite", "--create", "not-an-email"]) == 2


@pytest.mark.slow
def test_crowd_loop_runs_rounds_and_stops_cleanly_on_ctrl_c(labelstudio, artifacts_dir):
    from fixtures_labelstudio import SYNSETS, make_images, write_synsets

    from crowd.provision import find_project

    ls = labelstudio
    store = ls.new_store()
    images = make_images(store, 5, seed=515)
    write_synsets(store)
    store.write_table("image_links", pd.DataFrame({
        "image_id": images["image_id"], "wnid": SYNSETS[0]["wnid"], "url": images["first_url"], "source": "test",
        "rank": 1, "n_urls": 1, "n_synsets": 1, "multi_synset": False, "near_duplicate_of": None}))
    prefix = f"loop{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "crowd", "loop", "--interval", "1"],
                            env=_crowd_env(ls, store.root, prefix), cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = Lines(proc)
    try:
        first = out.wait_for(r"^round 1 ", 240)
        team = out.wait_for(r"^  team: ", 30)
        out.wait_for(r"^round 2 ", 120)  # it goes on by itself
    finally:
        rc = out.finish()
        (artifacts_dir / "crowd-loop.log").write_text("\n".join(out.seen))
    text = "\n".join(out.seen)
    assert rc == 0, text[-3000:]
    assert "crowd loop stopped after" in text and "Traceback" not in text and "interrupted" not in text
    assert "pushed 5 task(s)" in first and "team unknown until the first votes" in team
    assert len(store.read_table("tasks")) == 5  # the second round pushed nothing twice
    proj = ls.admin().get_json(f"/api/projects/{find_project(ls.admin(), f'{prefix} verify')['id']}/")
    assert proj["show_instruction"] and SYNSETS[0]["gloss"] in proj["expert_instruction"]


# -- what an annotator sees at 1366x768 ----------------------------------------------------------------------------
def _photos(store) -> pd.DataFrame:
    """A portrait and a landscape photograph (scikit-image's bundled ones), then four more of each shape for the grid."""
    import hashlib
    import io

    from pipeline.demo_corpus import load_photo
    from pipeline.schemas import arrow_schema

    astro, coffee = load_photo("astronaut.png"), load_photo("coffee.png")
    shots = [astro.crop((100, 0, 380, 512)).resize((420, 768)), coffee.resize((1200, 800))]
    for k in range(4):
        shots += [astro.crop((60 + 20 * k, 0, 300 + 20 * k, 480)), coffee.crop((20 * k, 0, 500 + 20 * k, 330))]
    rows = []
    for k, img in enumerate(shots):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=88)
        data = buf.getvalue()
        rows.append({"image_id": hashlib.sha256(data).hexdigest(), "width": img.width, "height": img.height,
                     "format": "JPEG", "n_bytes": len(data), "phash": None, "storage_key": store.put_content(data, ".jpg"),
                     "first_url": f"http://example.org/layout/{k}.jpg", "status": "accepted", "reject_reason": None})
    df = pd.DataFrame(rows)
    for f in arrow_schema("images"):
        if f.name not in df.columns:
            df[f.name] = None
    store.write_table("images", df)
    return df


RECTS = """
const r = e => { const b = e.getBoundingClientRect(); return {top: b.top, bottom: b.bottom, left: b.left, right: b.right}; };
const imgs = [...document.querySelectorAll('img')].filter(i => i.src.startsWith('blob:') || i.src.includes('local-files'));
return {height: innerHeight, width: innerWidth,
        images: imgs.map(i => ({...r(i), natural: [i.naturalWidth, i.naturalHeight], complete: i.complete})),
        answers: [...document.querySelectorAll('input[type=radio], input[type=checkbox]')].map(i => r(i.closest('label') || i)),
        submit: [...document.querySelectorAll('button')].filter(b => b.innerText.trim() == 'Submit').map(r)};
"""


def _task_number(driver) -> int | None:
    """The task number the labeling stream shows at the bottom ("#87")."""
    m = re.search(r"^#?(\d+)\s*\n\s*\d+ of \d+", driver.find_element("tag name", "body").text, re.M)
    return int(m.group(1)) if m else None


def _on_screen(rect: dict, height: float, width: float) -> bool:
    return rect["top"] >= 0 and rect["left"] >= 0 and rect["bottom"] <= height and rect["right"] <= width


@pytest.mark.slow
def test_annotator_sees_instructions_and_every_answer_without_scrolling_at_1366x768(labelstudio, artifacts_dir):
    import shutil

    from conftest import make_browser, wait_for_text, wait_until
    from fixtures_labelstudio import SYNSETS, browser_login, write_synsets
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from crowd.cli import ensure_instructions
    from crowd.provision import image_dir_of, provision
    from crowd.pull import pull
    from crowd.push import push
    from crowd.status import create_account

    ls = labelstudio
    store = ls.new_store()
    photos = _photos(store)
    write_synsets(store)
    settings = ls.settings(store, gold_rate=0.0)
    admin = ls.admin()
    wnid = SYNSETS[0]["wnid"]
    ids = photos["image_id"].tolist()
    pids = provision(admin, settings, kinds=["verify", "grid"], overlap=1, image_dir=image_dir_of(store))
    for kind, chosen in (("verify", ids[:2]), ("grid", ids)):
        assert ensure_instructions(admin, store, settings, pids[kind], kind)
        assert not ensure_instructions(admin, store, settings, pids[kind], kind)  # unchanged: no update
        push(store, admin, settings, project_id=pids[kind], kind=kind,
             plan=pd.DataFrame({"image_id": chosen, "wnid": wnid, "n_more": 1}))
    email, password = f"layout-{os.getpid()}@example.org", "layout-pass-2026"
    create_account(admin, email, password)

    d = make_browser(1366, 768)
    try:
        browser_login(d, ls.url, email, password)
        # what the open-source edition cannot hide from an annotator (no roles): the README says so
        d.get(f"{ls.url}/projects/")
        wait_until(lambda: d.find_elements(By.CSS_SELECTOR, "button[aria-label='Create new project']"), 60,
                   "the Create (project) button")
        d.get(f"{ls.url}/projects/{pids['verify']}/data")
        wait_for_text(d, "Import", "Export")
        d.save_screenshot(str(artifacts_dir / "annotator-sees-import-export.png"))
        # verify: the instructions first, then two photos, one portrait and one landscape
        d.get(f"{ls.url}/projects/{pids['verify']}/data?labeling=1")
        page = wait_for_text(d, "Labeling Instructions", "Counts as yes", "Counts as no", SYNSETS[0]["gloss"])
        assert "1 yes" in page and "2 no" in page and "Settings" in page
        d.save_screenshot(str(artifacts_dir / "docs" / "annotator-instructions.png"))
        d.find_element(By.CSS_SELECTOR, "button[aria-label='Close modal']").click()
        shapes = []
        for step in range(2):
            m = wait_until(lambda: (x := d.execute_script(RECTS))["images"] and all(i["complete"] for i in x["images"])
                           and x["answers"] and x["submit"] and x, 120, "the task to render")
            time.sleep(1)  # let the layout settle after the image decoded
            m = d.execute_script(RECTS)
            number = _task_number(d)
            [img] = m["images"]
            shapes.append("portrait" if img["natural"][1] > img["natural"][0] else "landscape")
            for rect in [*m["answers"], *m["submit"], img]:  # yes, no, Submit and the whole photo
                assert _on_screen(rect, m["height"], m["width"]), (shapes[-1], rect, m["height"])
            assert img["bottom"] <= m["submit"][0]["top"]  # the photo ends above the bottom bar
            d.save_screenshot(str(artifacts_dir / f"layout-verify-{shapes[-1]}.png"))
            d.find_element(By.TAG_NAME, "body").send_keys("1")
            wait_until(lambda: d.execute_script(
                "return [...document.querySelectorAll('input[type=radio]')].some(i=>i.checked)"), 30, "the tick")
            d.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, Keys.ENTER)
            if step == 0:
                wait_until(lambda before=number: (n := _task_number(d)) is not None and n != before, 60, "the next task")
        assert sorted(shapes) == ["landscape", "portrait"]

        # grid: every cell's tick at the same height in its row, the first two rows and Submit on screen
        d.get(f"{ls.url}/projects/{pids['grid']}/data?labeling=1")
        wait_for_text(d, "Labeling Instructions", "Counts as yes")
        d.find_element(By.CSS_SELECTOR, "button[aria-label='Close modal']").click()
        m = wait_until(lambda: (x := d.execute_script(RECTS))["images"] and len(x["images"]) == len(ids) and
                       all(i["complete"] for i in x["images"]) and len(x["answers"]) == len(ids) and x, 120,
                       "every grid photo")
        time.sleep(1)
        m = d.execute_script(RECTS)
        rows: dict[int, list[dict]] = {}
        for img, tick in zip(m["images"], m["answers"], strict=True):
            rows.setdefault(round(img["top"]), []).append({"tick": tick, "portrait": img["natural"][1] > img["natural"][0]})
        tops = sorted(rows)
        assert len(tops) >= 2
        for top in tops[:2]:
            cells = rows[top]
            assert {c["portrait"] for c in cells} == {True, False}  # both shapes in each row
            assert len({round(c["tick"]["top"]) for c in cells}) == 1  # one tick line whatever the shape
            assert all(_on_screen(c["tick"], m["height"], m["width"]) for c in cells)
        assert _on_screen(m["submit"][0], m["height"], m["width"])
        d.save_screenshot(str(artifacts_dir / "docs" / "annotator-grid-layout.png"))
        d.find_element(By.TAG_NAME, "body").send_keys("2")  # Label Studio's own number for the second box
        wait_until(lambda: [b.is_selected() for b in d.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")][:3]
                   == [False, True, False], 30, "the second box ticked by its key")
        d.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, Keys.ENTER)

        def all_votes():
            pull(store, admin, settings, project_ids=list(pids.values()))
            v = store.read_table("votes", missing_ok=True).to_pandas()
            return (v,) if len(v) == 2 + len(ids) else None

        [votes] = wait_until(all_votes, 90, "the answers to reach the server")
    finally:
        d.quit()
    grid = votes[votes["task_id"] == votes["task_id"].max()]
    order = [im["image_id"] for im in admin.get_json(f"/api/tasks/{int(grid['task_id'].iloc[0])}")["data"]["images"]]
    assert dict(zip(grid["image_id"], grid["answer"], strict=True)) == {i: ("yes" if k == 1 else "no")
                                                                       for k, i in enumerate(order)}
    shutil.copy(artifacts_dir / "docs" / "annotator-instructions.png", artifacts_dir / "annotator-instructions.png")
