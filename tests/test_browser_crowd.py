"""An annotator's real work in headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
log in as a provisioned annotator, open the verification labeling stream, see the image load and the
lemmas and gloss, answer once by click and once by hotkey, submit; the next pull holds exactly those votes
under that annotator's pseudonym."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import wait_until as _wait
from fixtures_labelstudio import SYNSETS, browser_login, make_images, write_synsets

from crowd.provision import image_dir_of, provision
from crowd.pull import pseudonym, pull
from crowd.push import push
from crowd.simulate import ensure_user

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _image_loaded(driver) -> int:
    """naturalWidth of the task image once it has loaded (0 while loading or broken)."""
    # Label Studio fetches the URL itself and shows it through a blob: URL.
    return driver.execute_script(
        "const im=[...document.querySelectorAll('img')].filter(i=>i.src.startsWith('blob:')||i.src.includes('local-files'));"
        "return im.length && im.every(i=>i.complete) ? Math.max(...im.map(i=>i.naturalWidth)) : 0;")


def _task_id(driver) -> int | None:
    """The task number the labeling stream shows at the bottom ("#87")."""
    import re

    from selenium.webdriver.common.by import By

    m = re.search(r"^#?(\d+)\s*\n\s*\d+ of \d+", driver.find_element(By.TAG_NAME, "body").text, re.M)
    return int(m.group(1)) if m else None


def test_annotator_verifies_in_chromium(labelstudio, browser, artifacts_dir):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    store = labelstudio.new_store()
    images = make_images(store, 2, seed=77, size=(320, 240), fish=True)
    write_synsets(store)
    settings = labelstudio.settings(store, gold_rate=0.0)
    admin = labelstudio.admin()
    pid = provision(admin, settings, overlap=1, image_dir=image_dir_of(store))["verify"]
    plan = pd.DataFrame({"image_id": images["image_id"], "wnid": SYNSETS[0]["wnid"], "n_more": 1})
    assert push(store, admin, settings, project_id=pid, plan=plan)["pushed"] == 2

    email, password = "annotator-browser@synsetforge.local", "verify-pass-2026"
    ensure_user(admin, email, password)
    d = browser
    browser_login(d, labelstudio.url, email, password)

    d.get(f"{labelstudio.url}/projects/{pid}/data?labeling=1")
    width = _wait(lambda: _image_loaded(d), what="task image to load")
    assert width == 320
    body = d.find_element(By.TAG_NAME, "body").text
    syn = SYNSETS[0]
    assert ", ".join(syn["lemmas"]) in body and syn["gloss"] in body
    assert "There was an issue loading URL" not in body
    d.save_screenshot(str(artifacts_dir / "annotator-verify.png"))
    shutil.copy(artifacts_dir / "annotator-verify.png", artifacts_dir / "docs" / "annotator-verify.png")

    first = _wait(lambda: _task_id(d), what="task number")
    # Answer 1: click "yes", then Submit.
    yes = d.find_element(By.XPATH, "//label[starts-with(normalize-space(), 'yes')]")
    yes.click()
    d.save_screenshot(str(artifacts_dir / "annotator-verify-clicked.png"))
    d.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()
    second = _wait(lambda: (t := _task_id(d)) and t != first and _image_loaded(d) and t, what="next task")
    # Answer 2: hotkey 2 ("no"), then Ctrl+Enter submits.
    d.find_element(By.TAG_NAME, "body").send_keys("2")
    _wait(lambda: d.execute_script(
        "return [...document.querySelectorAll('input[type=radio],input[type=checkbox]')].some(i=>i.checked)"),
        what="hotkey selection")
    d.save_screenshot(str(artifacts_dir / "annotator-verify-hotkey.png"))
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, Keys.ENTER)

    def two_votes():
        pull(store, admin, settings, project_ids=[pid])
        votes = store.read_table("votes", missing_ok=True).to_pandas()
        return (votes,) if len(votes) == 2 else None

    [votes] = _wait(two_votes, what="both annotations to reach the server")
    d.save_screenshot(str(artifacts_dir / "annotator-verify-done.png"))
    answers = dict(zip(votes["task_id"], votes["answer"], strict=True))
    assert answers == {first: "yes", second: "no"}
    assert set(votes["worker"]) == {pseudonym(email, b"test-pseudonym-key")}
    assert pull(store, admin, settings, project_ids=[pid])["new_votes"] == 0
