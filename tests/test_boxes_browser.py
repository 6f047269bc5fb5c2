"""An annotator works the three box tasks in headless Chromium (Debian's chromium + chromedriver, Selenium).

Drawing: the already-accepted box is on the canvas read-only; the annotator drags one new box and submits;
the box that reaches the `boxes` table matches the dragged rectangle in stored-image pixels within 2 px.
Quality and coverage: the shown boxes are on the canvas, the annotator answers and submits, the answer
reaches `box_answers`. Screenshots go to test-artifacts/ (`make screenshots` copies the README's into docs/).
"""

from __future__ import annotations

import shutil

import pytest
from conftest import wait_until
from fixtures_labelstudio import browser_login

from crowd.boxes import provision_boxes, sync, work_boxes
from crowd.simulate import Profile
from crowd.simulate_boxes import WorkerProfile, make_truth, write_world

pytestmark = pytest.mark.slow

CAREFUL = [WorkerProfile(f"careful-{i}", jitter=0.005, p_sloppy=0.0, p_wrong=0.0, p_invalid=0.0, quality_error=0.0,
                         coverage_error=0.0) for i in range(3)]


def wait_for(driver, script: str, timeout: float = 90.0, what: str = ""):
    """Poll a script in the page until it returns something truthy (the labeling UI renders asynchronously)."""
    return wait_until(lambda: driver.execute_script(script), timeout, what or script)


ANNOTATION = "return window.Htx && Htx.annotationStore && Htx.annotationStore.selected"
# the task image (Label Studio draws it on a Konva stage; the <img alt="image"> holds the loaded bitmap)
IMAGE_READY = ("const i = Array.from(document.images).find(i => i.alt === 'image');"
               "return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null")
IMAGE_BOX = ("const r = Array.from(document.images).find(i => i.alt === 'image').getBoundingClientRect();"
             "return [r.left, r.top, r.width, r.height]")


def open_stream(driver, url: str, project_id: int) -> None:
    driver.get(f"{url}/projects/{project_id}/data?labeling=1")
    wait_for(driver, ANNOTATION, 120, "the labeling interface")
    wait_for(driver, IMAGE_READY, 60, "the task image")


def regions(driver) -> list[dict]:
    return driver.execute_script(
        "return Htx.annotationStore.selected.regionStore.regions.map(r => ({id: r.id, readonly: !!r.readonly,"
        " from: r.results && r.results[0] ? r.results[0].from_name.name : null}))")


def submit(driver) -> None:
    from selenium.webdriver.common.by import By

    buttons = [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip().lower() in ("submit", "update")]
    assert buttons, "no Submit button on the labeling page"
    buttons[0].click()


def submit_and_pull(driver, store, settings, admin, kind: str, seen: int):
    """Submit in the browser, then sync until an answer of `kind` newer than annotation `seen` is in the store."""
    submit(driver)

    def pulled():
        sync(store, settings, client=admin)
        answers = store.read_table("box_answers").to_pandas()
        answers = answers[(answers["kind"] == kind) & (answers["annotation_id"] > seen)]
        return answers.sort_values("annotation_id").iloc[-1].to_dict() if len(answers) else None

    return wait_until(pulled, 60, f"the submitted {kind} answer")


def advance(store, settings, admin, workers, projects, truth, until, max_rounds=12):
    """sync / let the API workers work until `until(coverage_row, actions)` holds."""
    for _ in range(max_rounds):
        out = sync(store, settings, client=admin)
        cov = store.read_table("coverage").to_pandas().iloc[0]
        if until(cov, out):
            return cov
        work_boxes(workers, projects, truth, seed=1)
    raise AssertionError("the loop never reached the wanted state")


def test_annotator_draws_verifies_and_checks_coverage_in_chromium(labelstudio, browser, artifacts_dir):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.by import By

    store = labelstudio.new_store()
    pairs, truth = make_truth(40, seed=4)
    # an image with exactly two objects: one gets boxed by the API workers first, the browser draws the other
    two = truth.groupby("image_id").size()
    image_id = two[two == 2].index[0]
    pairs, truth = pairs[pairs["image_id"] == image_id], truth[truth["image_id"] == image_id]
    pairs, truth = write_world(store, pairs, truth)
    settings = labelstudio.settings(store)
    admin = labelstudio.admin()
    projects = provision_boxes(admin, settings, store)
    api_workers = list(zip(labelstudio.annotators([Profile()] * 3), CAREFUL, strict=True))
    # careful API workers: first box drawn, verified, coverage says "not yet": a draw task showing one box is open
    cov = advance(store, settings, admin, api_workers, projects, truth,
                  lambda cov, out: cov["state"] == "draw" and cov["n_boxes"] == 1 and cov["waiting"])
    assert cov is not None

    (person,) = labelstudio.annotators([Profile()], prefix="browser")
    browser_login(browser, labelstudio.url, person.email, person.password)

    # ---- drawing task: one accepted box shown read-only, drag a new one
    open_stream(browser, labelstudio.url, projects["draw"])
    shown = regions(browser)
    assert len(shown) == 1 and shown[0]["readonly"] and shown[0]["from"] == "accepted", shown
    browser.save_screenshot(str(artifacts_dir / "boxes-draw-before.png"))
    natural = browser.execute_script(IMAGE_READY)
    left, top, cw, ch = browser.execute_script(IMAGE_BOX)
    # drag from 20 %/30 % of the displayed image by 60 %/40 % of it, in viewport pixels
    start = (left + 0.2 * cw, top + 0.3 * ch)
    end = (left + 0.8 * cw, top + 0.7 * ch)
    drag = ActionBuilder(browser)
    drag.pointer_action.move_to_location(round(start[0]), round(start[1])).pointer_down()
    drag.pointer_action.move_to_location(round((start[0] + end[0]) / 2), round((start[1] + end[1]) / 2))
    drag.pointer_action.move_to_location(round(end[0]), round(end[1])).pointer_up()
    drag.perform()
    wait_for(browser, "return Htx.annotationStore.selected.regionStore.regions.length === 2", 15, "the new box")
    browser.save_screenshot(str(artifacts_dir / "boxes-draw-after.png"))
    docs = artifacts_dir / "docs"  # `make screenshots` copies these into docs/
    shutil.copy(artifacts_dir / "boxes-draw-after.png", docs / "annotator-box-draw.png")
    submit(browser)
    wait_for(browser, "return !Htx.annotationStore.selected || Htx.annotationStore.selected.regionStore.regions"
             ".length < 2 || document.body.innerText.toLowerCase().includes('no more tasks')", 30, "the next task after submit")

    out = sync(store, settings, client=admin)
    answers = store.read_table("box_answers").to_pandas()
    mine = answers[(answers["kind"] == "draw")].sort_values("annotation_id").iloc[-1]
    assert mine["answer"] == "box", mine.to_dict()
    W, H = int(pairs.iloc[0]["width"]), int(pairs.iloc[0]["height"])
    sx, sy = W / cw, H / ch  # displayed pixels -> stored-image pixels
    expected = ((round(start[0]) - left) * sx, (round(start[1]) - top) * sy, (round(end[0]) - left) * sx,
                (round(end[1]) - top) * sy)
    got = tuple(mine[c] for c in ("x_min", "y_min", "x_max", "y_max"))
    assert natural == [W, H]
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 2.0, (got, expected)
    boxes = store.read_table("boxes").to_pandas()
    new_box = boxes[boxes["seq"] == boxes["seq"].max()].iloc[0]
    assert max(abs(new_box[c] - e) for c, e in zip(("x_min", "y_min", "x_max", "y_max"), expected, strict=True)) <= 2.0
    assert out["pushed"] == 1  # its quality task

    # ---- quality task: the drawn box shown, answer by hotkey "1" (yes)
    open_stream(browser, labelstudio.url, projects["quality"])
    shown = regions(browser)
    assert len(shown) == 1 and shown[0]["from"] == "shown"
    ActionChains(browser).send_keys("1").perform()
    browser.save_screenshot(str(artifacts_dir / "boxes-quality.png"))
    shutil.copy(artifacts_dir / "boxes-quality.png", docs / "annotator-box-quality.png")
    q = submit_and_pull(browser, store, settings, admin, "quality", int(mine["annotation_id"]))
    assert q["answer"] == "yes"

    # the API workers finish: the dragged box is not around an object, so they reject it and box the second
    # object themselves; then the coverage task shows both accepted boxes
    cov = advance(store, settings, admin, api_workers, projects, truth,
                  lambda cov, out: cov["state"] == "coverage" and cov["waiting"])
    assert cov["n_boxes"] == 2
    verdicts = store.read_table("boxes").to_pandas().set_index("seq")["verified"]
    assert verdicts[new_box["seq"]] == "rejected"
    open_stream(browser, labelstudio.url, projects["coverage"])
    assert len(regions(browser)) == 2
    browser.find_element(By.XPATH, "//*[normalize-space(text())='yes']").click()
    browser.save_screenshot(str(artifacts_dir / "boxes-coverage.png"))
    shutil.copy(artifacts_dir / "boxes-coverage.png", docs / "annotator-box-coverage.png")
    latest = int(store.read_table("box_answers").to_pandas()["annotation_id"].max())
    c = submit_and_pull(browser, store, settings, admin, "coverage", latest)
    assert c["answer"] == "yes"
