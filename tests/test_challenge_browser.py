"""A team in headless Chromium: signs in with its token, uploads, sees its score and the quota left, meets the
limit, cannot open the private board before the phase closes; afterwards the board and the analysis show.
Screenshots of the leaderboard and the upload page go to test-artifacts/docs/ for the README."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import wait_for_text
from selenium.webdriver.common.by import By

from challenge.service import open_service
from pipeline.release.build import build_release
from pipeline.release.synthetic import make_fixture
from pipeline.services import free_port, start_service
from pipeline.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture
def site(tmp_path, artifacts_dir):
    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    make_fixture(store, n_classes=5, per_class=24, seed=21, box_fraction=0.9)
    build_release(store, "2026.1", val_per_class=2, test_per_class=8, neardup=False, challenge=True)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    svc = open_service(str(store_dir), db)
    now = datetime.utcnow()
    svc.create_challenge("2026-cls", "2026.1", "cls", [dict(name="main", opens_at=now - timedelta(hours=2),
                                                            closes_at=now + timedelta(days=5), per_week=2)],
                         title="Synthetic things 2026: classification")
    held = svc.held_out("2026.1")
    base, _ = svc.add_team("organisers: colour baseline", baseline=True)
    svc.submit("2026-cls", base.id, "".join(f"{(t % 5) + 1} {t}\n" if i % 2 else f"{(t % 5) + 1}\n"
                                          for i, t in enumerate(held.truth)).encode())
    for name, share in (("Team Lumen", 0.8), ("Team Basalt", 0.55)):
        team, _ = svc.add_team(name)
        svc.submit("2026-cls", team.id, "".join(f"{t}\n" if (i * 7 % 10) < share * 10 else f"{t % 5 + 1}\n"
                                              for i, t in enumerate(held.truth)).encode())
    _, token = svc.add_team("Team Aurora", [("Ada", "ada@example.org")])
    port = free_port()
    server = start_service("challenge", [str(ROOT / ".venv/bin/synsetforge"), "--store", str(store_dir), "challenge",
                                         "--db", db, "serve", "--port", str(port)],
                           url=f"http://127.0.0.1:{port}", ready_path="/healthz",
                           log_path=artifacts_dir / f"challenge-browser-{port}.log")
    sub = tmp_path / "aurora.txt"
    sub.write_text("".join(f"{t} {t % 5 + 1}\n" if i % 4 else f"{t % 5 + 1} {t}\n" for i, t in enumerate(held.truth)))
    yield {"url": server.url, "token": token, "svc": svc, "file": sub, "held": held}
    server.stop()
    assert server.process.poll() is not None


def test_a_team_signs_in_uploads_meets_its_limit_and_waits_for_the_private_board(site, browser, artifacts_dir):
    url = site["url"]
    browser.get(url + "/c/2026-cls/submit")  # not signed in: sent to the sign-in page
    wait_for_text(browser, "Sign in with your team's token")
    browser.find_element(By.ID, "token").send_keys(site["token"])
    browser.find_element(By.ID, "signin").click()
    page = wait_for_text(browser, "Quota", "Team Aurora")
    assert "2 submissions left" in page
    for left in (1, 0):
        browser.find_element(By.ID, "file").send_keys(str(site["file"]))
        browser.find_element(By.ID, "upload").click()
        page = wait_for_text(browser, "Scored: submission")
        score = browser.find_element(By.ID, "score").text
        assert float(score) == pytest.approx(site["svc"].team_submissions("2026-cls", site["svc"].team_id(
            "Team Aurora"))[0]["score"])
        assert browser.find_element(By.ID, "left").text == str(left)
        if left == 1:
            browser.save_screenshot(str(artifacts_dir / "docs" / "challenge-submit.png"))
    browser.find_element(By.ID, "file").send_keys(str(site["file"]))
    browser.find_element(By.ID, "upload").click()
    page = wait_for_text(browser, "limit reached")
    assert "2 submissions per week" in page and "0 submissions left" in page
    browser.get(url + "/c/2026-cls/private")
    page = wait_for_text(browser, "Private leaderboard")
    assert "shown when the phase closes" in page and "Team Lumen" not in page
    browser.get(url + "/c/2026-cls")
    page = wait_for_text(browser, "Public leaderboard", "Team Aurora")
    assert "organisers' baseline" in page and "99.9 % interval" in page
    rows = browser.find_elements(By.CSS_SELECTOR, "#leaderboard tr")
    assert len(rows) == 5  # header, three teams and the baseline
    browser.save_screenshot(str(artifacts_dir / "docs" / "challenge-leaderboard.png"))
    site["svc"].close("2026-cls")
    browser.get(url + "/c/2026-cls/private")
    page = wait_for_text(browser, "Private leaderboard, phase main", "Team Lumen")
    browser.get(url + "/c/2026-cls/analysis")
    wait_for_text(browser, "Correlation with per-class accuracy")
    assert browser.find_elements(By.CSS_SELECTOR, "#plot-scale svg")
