"""A team's first real project, end to end, as the README's "Your first real project" tells it: a data engineer with
a folder of 16 photos in two synsets (three of them misfiled) and attribution sidecars, two annotators working in
headless Chromium at 1366x768 (one careful, with the keys; one careless, clicking at random), the real Label Studio,
and the commands a user types: vocab -> collect -> ingest -> crowd invite -> crowd loop (a subprocess, stopped with
Ctrl-C) -> crowd status -> release plan / build / export.

With two annotators QC can tell who is right on a disagreement only from controls, so the engineer gives a gold seed
file (one known positive per synset and four cross-synset known negatives, which cost no label; gold adds two more
from the positives) and the config a new team needs (`qc.team`, `qc.min_votes_to_flag = 10`, `crowd.gold_rate =
0.4`). The careless annotator's answers are a fixed pseudo-random draw per pair (a hash of the pair), so the run is
the same every time. (Offline, QC run on these pairs and controls for 41 draws of the careless answers rejected all
three misfiled photos every time and never decided a pair wrongly; some draws leave true photos pending.)

Checked: every misfiled photo rejected and none accepted; no true photo rejected; the pairs the two could not settle
at the usual bar decided at the small-team bar (labels.method .../small-team) or left pending as needs_new_annotator;
the votes each worker gave counted the same in `crowd status`, QC's workers table, `crowd workers` and the release
report; the release's train / val / test per class; attribution from the sidecars (and the --license default for the
one file they do not name), with no absolute path anywhere in the release.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageOps

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
TABBY, ESPRESSO = "n02123045", "n07920052"
KEY = "first-project-pseudonym-key"
CC0 = ("CC0 1.0", "https://creativecommons.org/publicdomain/zero/1.0/")
PDM = ("Public Domain Mark 1.0", "https://creativecommons.org/publicdomain/mark/1.0/")
SKIMAGE = "https://scikit-image.org/docs/stable/api/skimage.data.html#skimage.data."


def _view(photo: Image.Image, rect: tuple[int, int, int, int], scale: float = 1.0, mirror: bool = False) -> Image.Image:
    out = photo.crop(rect)
    if scale != 1.0:
        out = out.resize((round(out.width * scale), round(out.height * scale)), Image.Resampling.LANCZOS)
    return ImageOps.mirror(out) if mirror else out


def make_photo_folder(root: Path) -> dict[str, dict]:
    """photos/<wnid>/*.jpg from scikit-image's bundled photographs, an attribution sidecar in each folder (CSV for
    tabby, JSON for espresso; one espresso file left out of it on purpose), and the truth: file name -> folder, the
    class it really shows, misfiled, creator, license. Distinct views (crops at other places and scales, mirrors,
    portrait crops), so ingest finds no near copies among them."""
    from pipeline.demo_corpus import load_photo

    cat, coffee = load_photo("chelsea.png"), load_photo("coffee.png")
    astronaut, rocket = load_photo("astronaut.png"), load_photo("rocket.jpg")
    cat_by, coffee_by = ("Stefan van der Walt", "chelsea"), ("Rachel Michetti", "coffee")
    plan = {  # folder -> [(file, image, true class, (creator, photo), licence)]
        TABBY: [
            ("cat-whole.jpg", _view(cat, (0, 0, 451, 300)), TABBY, cat_by, CC0),
            ("cat-face.jpg", _view(cat, (100, 60, 260, 200), 1.8), TABBY, cat_by, CC0),
            ("cat-ear.jpg", _view(cat, (270, 0, 451, 180), 1.4), TABBY, cat_by, CC0),
            ("cat-paws.jpg", _view(cat, (170, 170, 360, 300), 1.6), TABBY, cat_by, CC0),
            ("cat-mirrored.jpg", _view(cat, (0, 0, 451, 300), mirror=True), TABBY, cat_by, CC0),
            ("cat-portrait.jpg", _view(cat, (130, 0, 330, 300), 1.5), TABBY, cat_by, CC0),
            ("cat-face-mirrored.jpg", _view(cat, (60, 20, 300, 240), 1.2, mirror=True), TABBY, cat_by, CC0),
            ("astronaut.jpg", _view(astronaut, (110, 0, 330, 240), 1.5), "astronaut", ("NASA", "astronaut"), PDM),
            ("cup-close.jpg", _view(coffee, (180, 10, 420, 150), 1.3), ESPRESSO, coffee_by, CC0),
        ],
        ESPRESSO: [
            ("cup-whole.jpg", _view(coffee, (0, 0, 600, 400)), ESPRESSO, coffee_by, CC0),
            ("cup-crema.jpg", _view(coffee, (190, 70, 410, 200), 1.6), ESPRESSO, coffee_by, CC0),
            ("cup-table.jpg", _view(coffee, (120, 0, 480, 320), 0.75), ESPRESSO, coffee_by, CC0),
            ("cup-mirrored.jpg", _view(coffee, (0, 0, 600, 400), mirror=True), ESPRESSO, coffee_by, CC0),
            ("cup-portrait.jpg", _view(coffee, (200, 0, 440, 400)), ESPRESSO, coffee_by, CC0),
            ("cup-saucer.jpg", _view(coffee, (60, 150, 560, 400), 1.0, mirror=True), ESPRESSO, coffee_by, CC0),
            ("rocket.jpg", _view(rocket, (240, 100, 400, 427), 1.5), "rocket", ("SpaceX", "rocket"), PDM),
        ],
    }
    truth: dict[str, dict] = {}
    for wnid, files in plan.items():
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for name, img, cls, (creator, photo), (lic, lic_url) in files:
            img.convert("RGB").save(folder / name, "JPEG", quality=90)
            truth[name] = {"folder": wnid, "class": cls, "misfiled": cls != wnid, "creator": creator,
                           "license": lic, "photo": photo}
            if name == "cup-saucer.jpg":
                truth[name]["unlisted"] = True
                continue  # the sidecar does not name it: collect's --license cc0 / --creator "Rachel Michetti" apply
            rows.append({"file": name, "license": lic, "license_url": lic_url, "creator": creator,
                         "title": f"{photo} ({name})", "source_url": SKIMAGE + photo})
        if wnid == TABBY:
            with open(folder / "attribution.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        else:
            (folder / "attribution.json").write_text(json.dumps(rows, indent=1))
    return truth


# -- the annotators ------------------------------------------------------------------------------------------------
def _image_loaded(driver) -> int:
    """naturalWidth of the task image once it has loaded (0 while loading)."""
    return driver.execute_script(
        "const im=[...document.querySelectorAll('img')].filter(i=>i.src.startsWith('blob:')||i.src.includes('local-files'));"
        "return im.length && im.every(i=>i.complete) ? Math.max(...im.map(i=>i.naturalWidth)) : 0;")


def _task_id(driver) -> int | None:
    """The task number the labeling stream shows at the bottom ("#87")."""
    from selenium.webdriver.common.by import By

    m = re.search(r"^#?(\d+)\s*\n\s*\d+ of \d+", driver.find_element(By.TAG_NAME, "body").text, re.M)
    return int(m.group(1)) if m else None


def annotate(url: str, email: str, password: str, pid: int, admin, n_tasks: int, answer, *, keys: bool,
             shots: Path | None = None) -> dict[int, str]:
    """One annotator's session in headless Chromium at 1366x768: log in, open the labeling stream, read the
    instructions (they name both classes' definitions), close them, then answer `n_tasks` tasks: with the keys
    (1 / 2, Ctrl+Enter) or by clicking (the answer's label, then Submit). `answer(image_id, wnid) -> yes|no`.
    Returns task id -> answer given."""
    from conftest import make_browser, wait_for_text, wait_until
    from fixtures_labelstudio import browser_login
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = make_browser(1366, 768)
    given: dict[int, str] = {}
    try:
        browser_login(d, url, email, password)
        d.get(f"{url}/projects/{pid}/data?labeling=1")
        page = wait_for_text(d, "Labeling Instructions", "Counts as yes", timeout=90)
        assert "tabby" in page and "espresso" in page, "the instructions list the project's classes"
        if shots is not None:
            d.save_screenshot(str(shots / "first-project-instructions.png"))
        d.find_element(By.CSS_SELECTOR, "button[aria-label='Close modal']").click()
        last = None

        def next_shown(after: int | None) -> int | None:
            t = _task_id(d)
            return t if t is not None and t != after and _image_loaded(d) else None

        for _ in range(n_tasks):
            tid = wait_until(lambda after=last: next_shown(after), 120, f"the next task for {email}")
            data = admin.get_json(f"/api/tasks/{tid}")["data"]
            ans = answer(data["image_id"], data["wnid"])
            if keys:
                d.find_element(By.TAG_NAME, "body").send_keys("1" if ans == "yes" else "2")
                wait_until(lambda: d.execute_script(
                    "return [...document.querySelectorAll('input[type=radio]')].some(i=>i.checked)"), 30, "the key's tick")
                d.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, Keys.ENTER)
            else:
                d.find_element(By.XPATH, f"//label[starts-with(normalize-space(), '{ans}')]").click()
                d.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()
            given[tid] = ans
            last = tid
        wait_until(lambda: _task_id(d) != last or "/data" not in d.current_url or not _image_loaded(d) or
                   len(admin.get_json(f"/api/tasks/{last}/annotations/")) > 0, 60, "the last answer to be saved")
        return given
    finally:
        d.quit()


class Loop:
    """`synsetforge crowd loop` as a subprocess, its output collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.lines: list[str] = []
        self.log = log
        self.proc = subprocess.Popen(argv, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as fh:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                fh.write(line)
                fh.flush()

    def wait_for(self, pattern: str, timeout: float = 300.0) -> str:
        from conftest import wait_until

        rx = re.compile(pattern)
        return wait_until(lambda: next((ln for ln in list(self.lines) if rx.search(ln)), None) or
                          (self.proc.poll() is not None and pytest.fail(f"crowd loop exited: {self.lines[-20:]}")),
                          timeout, f"a crowd loop line matching {pattern!r}")

    def interrupt(self, timeout: float = 120.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        return rc


def markdown_table(text: str, first_header: str = "worker") -> list[dict[str, str]]:
    """The rows of the first Markdown table in `text` whose header starts with `first_header`, as dicts."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} "))
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[start:]]
    header, rows = cells[0], []
    for row in cells[2:]:
        if len(row) != len(header) or not lines[start + 2 + len(rows)].startswith("|"):
            break
        rows.append(dict(zip(header, row, strict=True)))
    return rows


def test_first_real_project_from_a_folder_of_photos_to_a_release(labelstudio, monkeypatch, capsys, artifacts_dir):
    from crowd.provision import find_project
    from crowd.pull import pseudonym
    from pipeline.cli import main
    from pipeline.release.facts import collect
    from pipeline.release.manifest import read_manifest, read_release_table
    from pipeline.store import LocalStore

    ls = labelstudio
    work = ls.files_root / f"first-project-{os.getpid()}-{int(time.time())}"
    photos = work / "photos"
    truth = make_photo_folder(photos)
    assert len(truth) == 16 and sum(t["misfiled"] for t in truth.values()) == 3
    (work / "wnids.txt").write_text(f"{TABBY}\n{ESPRESSO}\n")
    prefix = f"first{os.getpid()}"
    config = work / "project.toml"

    def write_config(team: list[str]) -> None:
        config.write_text(f"""[store]
url = "{work / 'data'}"
[collect]
sources = ["local_dir"]
local_dir = "{photos}"
[qc]
min_votes_to_flag = 10
team = {json.dumps(team)}
[crowd]
url = "{ls.url}"
files_root = "{ls.files_root}"
project_prefix = "{prefix}"
gold_seed_file = "{work / 'known.csv'}"
gold_rate = 0.4
[release]
val_per_class = 0.2
test_per_class = 0.2
""")

    write_config([])
    env = {"SYNSETFORGE__CROWD__TOKEN": ls.token, "SYNSETFORGE__CROWD__PSEUDONYM_KEY": KEY}
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def cli(*args: str) -> str:
        code = main(["--config", str(config), *args])
        out = capsys.readouterr()
        assert code == 0, f"synsetforge {' '.join(args)} exited {code}: {out.err[-2000:]}"
        return out.out

    # 1. vocabulary, collect (sidecars + --license / --creator for the file they do not name), ingest
    cli("vocab", "--wnid-file", str(work / "wnids.txt"))
    cli("collect", "--license", "cc0", "--creator", "Rachel Michetti")
    cli("ingest", "--no-progress")
    store = LocalStore(work / "data")
    images = store.read_table("images").to_pandas()
    links = store.read_table("image_links").to_pandas()
    assert (images["status"] == "accepted").sum() == 16 and links["near_duplicate_of"].isna().all()
    image_of = {Path(u).name: i for u, i in zip(images["first_url"], images["image_id"], strict=True)}
    cls = {image_of[n]: t["class"] for n, t in truth.items()}

    # 2. the engineer's known answers: one known positive per synset, four cross-synset known negatives (gold adds
    # two more itself: each known positive asked about the synset of the other subtree)
    known = [("cat-whole.jpg", TABBY, "yes"), ("cup-whole.jpg", ESPRESSO, "yes")]
    known += [(n, ESPRESSO, "no") for n in ("cat-face.jpg", "cat-ear.jpg")]
    known += [(n, TABBY, "no") for n in ("cup-crema.jpg", "cup-table.jpg")]
    pd.DataFrame([{"url": (photos / truth[n]["folder"] / n).as_uri(), "wnid": w, "answer": a} for n, w, a in known]
                 ).to_csv(work / "known.csv", index=False)

    # 3. the team: an invite link, and two named accounts with printed passwords and pseudonyms
    out = cli("crowd", "invite")
    assert ls.admin().get_json("/api/invite")["token"] in out
    out = cli("crowd", "invite", "--create", f"careful-{prefix}@example.org", "--create", f"careless-{prefix}@example.org")
    accounts = dict(re.findall(r"^\s+(\S+@example\.org)\s+password (\S+)", out, re.M))
    assert len(accounts) == 2
    careful, careless = sorted(accounts)  # careful-... sorts first
    team = [pseudonym(careful, KEY.encode()), pseudonym(careless, KEY.encode())]
    assert all(w in out for w in team)
    write_config(team)  # the engineer lists the team in qc.team

    # 4. the loop, as a user without Airflow runs it
    loop_env = {**os.environ, **env, "NLTK_DATA": str(ROOT / ".nltk_data"), "PYTHONUNBUFFERED": "1"}
    loop = Loop([sys.executable, "-m", "pipeline.cli", "--config", str(config), "crowd", "loop", "--interval", "2"],
                loop_env, artifacts_dir / "first-project-loop.log")
    try:
        loop.wait_for(r"^round 1 .*pushed 22 task\(s\) \(8 gold\)", 300)  # 14 pairs + 8 controls
        admin = ls.admin()
        pid = int(find_project(admin, f"{prefix} verify")["id"])
        tasks = store.read_table("tasks").to_pandas()
        assert len(tasks) == 22 and int(tasks["is_gold"].sum()) == 8
        gold_table = store.read_table("gold").to_pandas()
        assert {(r.image_id, r.wnid) for r in gold_table.itertuples()} >= {
            (image_of["cat-whole.jpg"], ESPRESSO), (image_of["cup-whole.jpg"], TABBY)}  # built from the positives

        def right(image_id: str, wnid: str) -> str:
            return "yes" if cls[image_id] == wnid else "no"

        def at_random(image_id: str, wnid: str) -> str:  # a fixed draw per pair: the same every run
            return "yes" if random.Random(f"careless|{image_id}|{wnid}").random() < 0.5 else "no"

        shots = artifacts_dir
        annotate(ls.url, careful, accounts[careful], pid, admin, 22, right, keys=True, shots=shots)
        annotate(ls.url, careless, accounts[careless], pid, admin, 22, at_random, keys=False)
        loop.wait_for(r"\(44 in all\)", 300)
        loop.wait_for(r"^  team: .*decided at the small-team bar", 120)  # the round after the last votes says so
    finally:
        rc = loop.interrupt()
    assert rc == 0 and any("crowd loop stopped after" in ln for ln in loop.lines), loop.lines[-10:]
    assert "Traceback" not in "\n".join(loop.lines)

    # 5. the labels: every misfiled photo rejected, no true photo rejected
    labels = store.read_table("labels").to_pandas()
    labels["truth"] = [("yes" if cls[i] == w else "no") for i, w in zip(labels["image_id"], labels["wnid"], strict=True)]
    assert len(labels) == 14  # the two known positives are controls, not labels
    misfiled = labels[labels["truth"] == "no"]
    assert len(misfiled) == 3 and (misfiled["status"] == "rejected").all(), misfiled
    good = labels[labels["truth"] == "yes"]
    assert not (good["status"] == "rejected").any() and (good["status"] == "accepted").sum() >= 8
    small = labels[labels["method"].str.endswith("/small-team")]
    assert len(small) and set(small["status"]) <= {"accepted", "rejected"}
    plan = store.read_table("push_plan").to_pandas()
    assert (plan["n_more"] == 0).all()  # nothing left the team can give
    pending = labels[labels["status"] == "pending"]
    stuck = plan[plan["reason"] == "needs_new_annotator"]
    assert set(zip(pending["image_id"], pending["wnid"], strict=True)) == \
        set(zip(stuck["image_id"], stuck["wnid"], strict=True))

    # 6. the workers: the same counts everywhere (crowd status, QC's workers table, crowd workers, the report)
    qc_workers = store.read_table("workers").to_pandas().set_index("worker")
    assert qc_workers["n_votes"].to_dict() == {team[0]: 22, team[1]: 22}
    assert bool(qc_workers.loc[team[1], "flagged"]) and not bool(qc_workers.loc[team[0], "flagged"])
    status = cli("crowd", "status")
    rows = {r["worker"]: r for r in markdown_table(status)}
    assert {w: int(r["n_votes"]) for w, r in rows.items()} == {team[0]: 22, team[1]: 22}
    assert {w: int(r["n_repeats"]) for w, r in rows.items()} == {team[0]: 0, team[1]: 0}  # no repeats
    assert "votes: 44 counted by QC (one per worker and pair) of 44 pulled; 0 repeat(s) ignored" in status
    assert "## Team" in status and "active annotator(s) (listed in qc.team)" in status
    assert "decided at the small-team bar" in status
    workers_out = cli("crowd", "workers")
    assert {r["worker"]: int(r["n_votes"]) for r in markdown_table(workers_out)} == {team[0]: 22, team[1]: 22}
    gold = store.read_table("worker_gold").to_pandas().set_index("worker")
    assert gold.loc[team[0], "gold_accuracy"] == 1.0 and gold.loc[team[1], "gold_accuracy"] < 1.0

    # 7. the release: plan, build (fractions from the config), splits per class, attribution, no local path
    plan_out = cli("release", "plan")
    assert TABBY in plan_out and ESPRESSO in plan_out
    cli("release", "build", "--version", "2026.1")
    manifest = read_manifest(store, "2026.1")
    rel = read_release_table(store, "2026.1", "labels").to_pandas()
    assert set(rel["image_id"]) == set(labels.loc[labels["status"] == "accepted", "image_id"])
    assert not set(rel["image_id"]) & set(misfiled["image_id"])
    for wnid in (TABBY, ESPRESSO):
        per = rel[rel["wnid"] == wnid]["split"].value_counts().to_dict()
        assert per.get("train", 0) >= 1 and per.get("val", 0) >= 1 and per.get("test", 0) >= 1, (wnid, per)
        assert manifest["classes"][wnid]["val"] == per["val"] and manifest["classes"][wnid]["test"] == per["test"]
    assert rel["image_id"].is_unique
    assert "adaptive-ds/small-team" in manifest["qc_methods"]
    rimg = read_release_table(store, "2026.1", "images").to_pandas()
    name_of = {i: n for n, i in image_of.items()}
    for r in rimg.itertuples():
        t = truth[name_of[r.image_id]]
        if t.get("unlisted"):
            assert (r.license, r.creator) == ("cc0", "Rachel Michetti")
        else:
            assert r.creator == t["creator"] and r.license == {"CC0 1.0": "cc0", "Public Domain Mark 1.0": "pdm"}[t["license"]]
            assert r.page_url == SKIMAGE + t["photo"]
        assert not r.first_url.startswith(("/", "file:")) and str(work) not in r.first_url
    for path in (store.root / "releases" / "2026.1").rglob("*"):
        if path.is_file():
            assert str(photos).encode() not in path.read_bytes(), f"{path} holds the local photo folder's path"
    export = work / "devkit"
    cli("release", "export", "2026.1", "--format", "devkit", "--out", str(export), "--no-images")
    attribution = pd.read_csv(next(export.rglob("ATTRIBUTION.csv")))
    assert len(attribution) == len(rimg) and set(attribution["creator"]) <= {t["creator"] for t in truth.values()}

    # 8. the report counts the votes as QC does and shows repeats apart
    d = collect(store, "2026.1", thumbs_per_class=0)
    assert (d.cost["votes"]["n_votes"], d.cost["votes"]["n_repeats"]) == (44, 0)
    assert d.vote_counts.set_index("worker")["n_votes"].to_dict() == {team[0]: 22, team[1]: 22}
    assert d.cost["votes"]["votes_per_image"] == pytest.approx(44 / len(rel))
    page = (store.root / "releases" / "2026.1" / "report.html").read_text()
    assert "repeats QC ignored" in page and "adaptive-ds/small-team" in page
