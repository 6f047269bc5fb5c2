"""DET tasks worked by a person in headless Chromium (Debian's chromium + chromedriver, Selenium) on the real
Label Studio: a presence question answered by hotkey, a checklist with one item ticked, and a box made by four
extreme clicks at known pixels, which reaches det_box_answers as the box the clicks span within 2 px.
Screenshots go to test-artifacts/ (`make screenshots` copies the README's into docs/)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import wait_until
from fixtures_labelstudio import browser_login

from crowd.presence import det_tables, provision_presence, sync, sync_det_boxes
from crowd.simulate import Profile
from crowd.simulate_presence import Crowd, run_inprocess, write_det_world

pytestmark = pytest.mark.slow
PERFECT = Crowd(np.ones(20), np.zeros(20, dtype=bool))  # presence decided without a mistake

DET13 = ["n02084071", "n02121808", "n02374451", "n02958343", "n02834778", "n02691156", "n03001627", "n04379243",
         "n03614007", "n03793489", "n03782190", "n07753592", "n07739125"]
ANNOTATION = "return window.Htx && Htx.annotationStore && Htx.annotationStore.selected"
IMAGE_READY = ("const i = Array.from(document.images).find(i => i.alt === 'image');"
               "return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null")
IMAGE_BOX = ("const r = Array.from(document.images).find(i => i.alt === 'image').getBoundingClientRect();"
             "return [r.left, r.top, r.width, r.height]")
REGIONS = ("return Htx.annotationStore.selected.regionStore.regions.map(r => ({readonly: !!r.readonly, "
           "type: r.type, from: r.results && r.results[0] ? r.results[0].from_name.name : null}))")


def wait_for(driver, script: str, timeout: float = 90.0, what: str = ""):
    return wait_until(lambda: driver.execute_script(script), timeout, what or script)


def open_stream(driver, url: str, project_id: int) -> None:
    driver.get(f"{url}/projects/{project_id}/data?labeling=1")
    wait_for(driver, ANNOTATION, 120, "the labeling interface")
    wait_for(driver, IMAGE_READY, 60, "the task image")


def submit(driver) -> None:
    from selenium.webdriver.common.by import By

    buttons = [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip().lower() in ("submit", "update")]
    assert buttons, "no Submit button on the labeling page"
    buttons[0].click()


def det_store(ls, tmp_path, n_images: int, *, seed: int, size=(320, 240), **det):
    from pipeline.cli import main

    store = ls.new_store()
    wnids = tmp_path / "det.txt"
    wnids.write_text("\n".join(DET13) + "\n")
    assert main(["--store", str(store.root), "vocab", "--wnid-file", str(wnids), "--det", "--no-multilingual"]) == 0
    truth = write_det_world(store, n_images, seed=seed, max_objects=1, size=size)
    settings = ls.settings(store)
    settings.det = settings.det.model_copy(update={"initial_votes": 1, "max_votes": 3, **det})
    return store, truth, settings


def pulled_votes(store, settings, admin, seen: int):
    def fresh():
        sync(store, settings, client=admin)
        v = store.read_table("presence_votes", missing_ok=True).to_pandas()
        v = v[v["annotation_id"] > seen] if len(v) else v
        return [v] if len(v) else None  # a list: wait_until tests truth, which a DataFrame refuses

    return wait_until(fresh, 60, "the submitted presence answer")[0]


def test_presence_question_and_checklist_in_chromium(labelstudio, browser, artifacts_dir, tmp_path):  # noqa: F811
    from conftest import wait_for_text
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    admin = labelstudio.admin()
    (person,) = labelstudio.annotators([Profile()], prefix="detbrowser")
    browser_login(browser, labelstudio.url, person.email, person.password)
    docs = artifacts_dir / "docs"

    # ---- a checklist of the top-level questions: tick one item, submit; one yes and a no for every other item
    store, truth, settings = det_store(labelstudio, tmp_path, 1, seed=41, scheme="checklist")
    sync(store, settings, client=admin)
    tasks = store.read_table("presence_tasks").to_pandas()
    (task,) = tasks.itertuples()
    assert task.kind == "checklist" and pd.isna(task.parent_id)
    names = dict(zip(*(store.read_table("det_questions").to_pandas()[c] for c in ("node_id", "name")), strict=True))
    projects = provision_presence(admin, settings, store)
    open_stream(browser, labelstudio.url, projects["checklist"])
    page = wait_for_text(browser, "Which of these are in the photo?", *(names[n] for n in task.node_ids))
    assert "Tick every one" in page
    pick = 1
    boxes = browser.find_elements(By.XPATH, "//*[normalize-space(text())='in the photo']")
    assert len(boxes) == len(task.node_ids)
    boxes[pick].click()
    browser.save_screenshot(str(artifacts_dir / "det-checklist.png"))
    shutil.copy(artifacts_dir / "det-checklist.png", docs / "annotator-det-checklist.png")
    submit(browser)
    votes = pulled_votes(store, settings, admin, 0)
    got = dict(zip(votes["node_id"], votes["answer"], strict=True))
    assert got == {n: "yes" if k == pick else "no" for k, n in enumerate(task.node_ids)}
    assert (votes["n_items"] == len(task.node_ids)).all() and votes["annotation_id"].nunique() == 1

    # ---- one yes/no question about the whole image: answered by hotkey 1 (yes)
    store, truth, settings = det_store(labelstudio, tmp_path, 1, seed=42, scheme="question", questions_per_round=1)
    sync(store, settings, client=admin)
    (task,) = store.read_table("presence_tasks").to_pandas().itertuples()
    assert task.kind == "question"
    question = store.read_table("det_questions").to_pandas().set_index("node_id").loc[task.node_ids[0], "question"]
    projects = provision_presence(admin, settings, store)  # this store's projects (its own prefix)
    open_stream(browser, labelstudio.url, projects["question"])
    wait_for_text(browser, question)
    ActionChains(browser).send_keys("1").perform()
    browser.save_screenshot(str(artifacts_dir / "det-question.png"))
    shutil.copy(artifacts_dir / "det-question.png", docs / "annotator-det-question.png")
    submit(browser)
    votes = pulled_votes(store, settings, admin, 0)
    assert votes[["node_id", "answer"]].values.tolist() == [[task.node_ids[0], "yes"]]


def test_four_extreme_clicks_give_the_box_within_two_pixels(labelstudio, browser, artifacts_dir, tmp_path):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    store, truth, settings = det_store(labelstudio, tmp_path, 1, seed=43, box_kind="extreme")
    # presence in-process, without a mistake: the image is fully annotated
    res = run_inprocess(truth.world, settings.det, seed=1, crowd=PERFECT)
    for name, df in (("presence_tasks", res.tasks), ("presence_votes", res.votes), ("presence_labels", res.labels),
                     ("det_images", res.images)):
        store.write_table(name, df)
    admin = labelstudio.admin()
    out = sync_det_boxes(store, settings, client=admin)
    assert out["pushed"] >= 1
    projects = out["projects"]
    assert set(projects) == {"extreme", "quality", "coverage"}
    (person,) = labelstudio.annotators([Profile()], prefix="detclick")
    browser_login(browser, labelstudio.url, person.email, person.password)
    open_stream(browser, labelstudio.url, projects["extreme"])
    natural = browser.execute_script(IMAGE_READY)
    left, top, cw, ch = browser.execute_script(IMAGE_BOX)
    # the four extreme points of the image's first object (top, bottom, left, right; any order would do)
    x0, y0, x1, y1 = truth.boxes.iloc[0][["x_min", "y_min", "x_max", "y_max"]]
    w, h = natural
    points = [((x0 + x1) / 2, y0 + 1), ((x0 + x1) / 2 + 5, y1 - 1), (x0 + 1, (y0 + y1) / 2), (x1 - 1, (y0 + y1) / 2 - 5)]
    clicks = [(round(left + px * cw / w), round(top + py * ch / h)) for px, py in points]
    for x, y in clicks:
        ActionChains(browser).send_keys("1").perform()  # the "extreme point" label, as the task's rules say
        act = ActionBuilder(browser)
        act.pointer_action.move_to_location(x, y).click()
        act.perform()
    wait_for(browser, "return Htx.annotationStore.selected.regionStore.regions.filter(r => !r.readonly).length === 4",
             15, "four points on the canvas")
    regions = browser.execute_script(REGIONS)
    assert sum(r["from"] == "points" for r in regions) == 4, regions
    browser.save_screenshot(str(artifacts_dir / "det-extreme.png"))
    shutil.copy(artifacts_dir / "det-extreme.png", artifacts_dir / "docs" / "annotator-det-extreme.png")
    submit(browser)
    tables = det_tables(settings)

    def answer():
        sync_det_boxes(store, settings, client=admin)
        a = store.read_table(tables.answers, missing_ok=True).to_pandas()
        a = a[a["kind"] == "extreme"] if len(a) else a
        return a.iloc[-1].to_dict() if len(a) else None

    got = wait_until(answer, 60, "the extreme-click answer in det_box_answers")
    assert got["answer"] == "box", got
    sx, sy = w / cw, h / ch  # displayed pixels -> stored-image pixels
    xs = [(x - left) * sx for x, _ in clicks]
    ys = [(y - top) * sy for _, y in clicks]
    expected = (min(xs), min(ys), max(xs), max(ys))
    box = tuple(got[c] for c in ("x_min", "y_min", "x_max", "y_max"))
    assert max(abs(a - b) for a, b in zip(box, expected, strict=True)) <= 2.0, (box, expected)
    assert max(abs(a - b) for a, b in zip(box, (x0, y0, x1, y1), strict=True)) <= 4.0  # and it is the object
    boxes = store.read_table(tables.boxes).to_pandas()
    assert len(boxes) == 1 and boxes.iloc[0]["verified"] == "pending"  # its quality task is next
