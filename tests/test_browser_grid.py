"""An annotator's grid task in headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
log in as a provisioned annotator, open the grid project's labeling stream, see every grid image load and
the lemmas and gloss, tick two images by click, submit; the next pull holds exactly those two yes votes and
a no for every other image, under that annotator's pseudonym."""

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
N_IMAGES = 12


def _grid_images(driver) -> list[int]:
    """naturalWidth of every task image the grid shows (Label Studio fetches each URL and shows a blob:)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('img')]"
        ".filter(i=>i.src.startsWith('blob:')||i.src.includes('local-files')).map(i=>i.complete?i.naturalWidth:0);")


def test_annotator_ticks_two_grid_images_in_chromium(labelstudio, browser, artifacts_dir):  # noqa: F811
    from selenium.webdriver.common.by import By

    store = labelstudio.new_store()
    images = make_images(store, N_IMAGES, seed=78, size=(320, 240), fish=True)
    write_synsets(store)
    settings = labelstudio.settings(store, gold_rate=0.0)
    admin = labelstudio.admin()
    pid = provision(admin, settings, kinds=["grid"], overlap=1, image_dir=image_dir_of(store))["grid"]
    plan = pd.DataFrame({"image_id": images["image_id"], "wnid": SYNSETS[0]["wnid"], "n_more": 1})
    out = push(store, admin, settings, project_id=pid, kind="grid", plan=plan)
    assert (out["pushed"], out["images"]) == (1, N_IMAGES)
    [task_id] = store.read_table("tasks").to_pandas()["task_id"].unique().tolist()
    order = [im["image_id"] for im in admin.get_json(f"/api/tasks/{task_id}")["data"]["images"]]

    email, password = "annotator-grid@synsetforge.local", "grid-pass-2026"
    ensure_user(admin, email, password)
    d = browser
    browser_login(d, labelstudio.url, email, password)

    d.get(f"{labelstudio.url}/projects/{pid}/data?labeling=1")
    widths = _wait(lambda: (w := _grid_images(d)) and len(w) == N_IMAGES and all(w) and w, what="all grid images to load")
    assert widths == [320] * N_IMAGES
    body = d.find_element(By.TAG_NAME, "body").text
    syn = SYNSETS[0]
    assert ", ".join(syn["lemmas"]) in body and syn["gloss"] in body
    assert "There was an issue loading URL" not in body

    boxes = d.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")
    assert len(boxes) == N_IMAGES  # one tick box per image, in the task's image order
    ticked = [2, 7]
    for i in ticked:  # click the visible label next to the box, as a person would
        boxes[i].find_element(By.XPATH, "./ancestor::label").click()
    _wait(lambda: [b.is_selected() for b in d.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")]
          == [i in ticked for i in range(N_IMAGES)], what="the two ticks")
    d.save_screenshot(str(artifacts_dir / "annotator-grid.png"))
    shutil.copy(artifacts_dir / "annotator-grid.png", artifacts_dir / "docs" / "annotator-grid.png")
    d.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()

    def grid_votes():
        pull(store, admin, settings, project_ids=[pid])
        votes = store.read_table("votes", missing_ok=True).to_pandas()
        return (votes,) if len(votes) else None

    [votes] = _wait(grid_votes, what="the grid annotation to reach the server")
    d.save_screenshot(str(artifacts_dir / "annotator-grid-done.png"))
    assert len(votes) == N_IMAGES and votes["annotation_id"].nunique() == 1 and (votes["task_id"] == task_id).all()
    answers = dict(zip(votes["image_id"], votes["answer"], strict=True))
    assert answers == {image_id: ("yes" if k in ticked else "no") for k, image_id in enumerate(order)}
    assert set(votes["worker"]) == {pseudonym(email, b"test-pseudonym-key")}
    assert pull(store, admin, settings, project_ids=[pid])["new_votes"] == 0
