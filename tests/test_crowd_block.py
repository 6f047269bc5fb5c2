"""Blocking a flagged worker on the real Label Studio: the account is deactivated through the server's admin site,
so it gets no next task (API) and cannot reach a project in headless Chromium; what it answered before is still
pulled, under its pseudonym, and QC still leaves it out; unblocking gives the access back. Also the automatic path
(`block_flagged`, what the crowd DAG's block_workers task runs)."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import wait_for_text, wait_until
from fixtures_labelstudio import browser_login, make_images, write_synsets

from crowd.client import CrowdError, ProtectedAccount
from crowd.provision import image_dir_of, provision
from crowd.pull import accounts, pseudonym, pull
from crowd.push import push
from crowd.simulate import Blocked, Profile, next_task, work
from crowd.status import block_flagged
from pipeline.qc.stage import run_qc

pytestmark = pytest.mark.slow
TENCH = "n01440764"
KEY = b"test-pseudonym-key"


def _try_login(driver, url: str, email: str, password: str) -> str:
    """Submit Label Studio's login form in a fresh session; the page text after the answer."""
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{url}/user/login/")
    driver.find_element(By.NAME, "email").send_keys(email)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    return wait_for_text(driver, "don't match")


def _cli(monkeypatch, ls, settings, *args: str) -> int:
    from pipeline.cli import main

    for k, v in {"URL": ls.url, "TOKEN": ls.token, "PSEUDONYM_KEY": KEY.decode(), "FILES_ROOT": str(ls.files_root),
                 "PROJECT_PREFIX": settings.crowd.project_prefix, "ADMIN_PASSWORD": ls.server.password}.items():
        monkeypatch.setenv(f"SYNSETFORGE__CROWD__{k}", v)
    return main(["--store", str(settings.store.url), "crowd", *args])


def test_blocked_worker_gets_nothing_keeps_its_votes_and_is_let_back_in(labelstudio, browser, monkeypatch, capsys,
                                                                        artifacts_dir):
    if not labelstudio.server.password:
        pytest.skip("external server: its admin password is not known to the tests")
    ls = labelstudio
    store = ls.new_store()
    images = make_images(store, 34, seed=9090)
    write_synsets(store)
    settings = ls.settings(store, gold_rate=0.0, admin_password=ls.server.password)
    admin = ls.admin()
    pid = provision(admin, settings, overlap=4, image_dir=image_dir_of(store))["verify"]
    project_title = f"{settings.crowd.project_prefix} verify"
    ids = images["image_id"].tolist()
    first, later = ids[:30], ids[30:]
    truth = {(i, TENCH): ("yes" if k % 2 else "no") for k, i in enumerate(ids)}
    assert push(store, admin, settings, project_id=pid, plan=pd.DataFrame({"image_id": first, "wnid": TENCH,
                                                                           "n_more": 4}))["pushed"] == 30
    honest = ls.annotators([Profile(accuracy=1.0)] * 3)
    [spammer] = ls.annotators([Profile(yes_bias=1.0)])  # says yes to everything
    done = work([*honest, spammer], pid, truth)
    assert done[spammer.email] == 30
    w_spam = pseudonym(spammer.email, KEY)

    # 1. block by hand, before its answers are pulled
    code = _cli(monkeypatch, ls, settings, "workers", "--block", w_spam)
    assert code == 0 and f"blocked {w_spam}" in capsys.readouterr().out
    assert admin.blocked_user_ids(password=ls.server.password) >= {spammer.user_id}
    with pytest.raises(CrowdError, match="administrator"):
        admin.block_user(admin.whoami()["id"], password=ls.server.password)  # never the admin itself

    # 2. no next task through the API, while the others still get the new work
    push(store, admin, settings, project_id=pid, plan=pd.DataFrame({"image_id": later, "wnid": TENCH, "n_more": 4}))
    with pytest.raises(Blocked) as refused:
        next_task(spammer.client, pid)
    assert refused.value.status in (401, 403)
    assert next_task(honest[0].client, pid) is not None
    assert work([spammer], pid, truth) == {spammer.email: 0}

    # 3. no project in the browser: the login is refused and the projects page sends it back to the login
    page = _try_login(browser, ls.url, spammer.email, spammer.password)
    assert "/user/login" in browser.current_url and project_title not in page
    browser.save_screenshot(str(artifacts_dir / "blocked-annotator-refused.png"))
    browser.get(f"{ls.url}/projects/")
    wait_until(lambda: "/user/login" in browser.current_url, 30, "redirect to the login page")
    assert project_title not in browser.find_element("tag name", "body").text
    browser.save_screenshot(str(artifacts_dir / "blocked-annotator-login.png"))

    # 4. its earlier answers are still pulled, under its own pseudonym, and QC leaves them out
    out = pull(store, admin, settings, project_ids=[pid])
    votes = store.read_table("votes").to_pandas()
    assert out["new_votes"] == 120 and (votes["worker"] == w_spam).sum() == 30
    assert votes["worker"].nunique() == 4
    run_qc(store, settings)
    qc = store.read_table("workers").to_pandas().set_index("worker")
    assert bool(qc.loc[w_spam, "flagged"]) and not bool(qc.loc[w_spam, "votes_used"])
    assert not qc.drop(index=w_spam)["flagged"].any()
    labels = store.read_table("labels").to_pandas()
    decided = labels[labels["image_id"].isin(first) & (labels["status"] != "pending")]
    assert {(r.image_id, r.wnid): ("yes" if r.status == "accepted" else "no") for r in decided.itertuples()} == \
        {k: v for k, v in truth.items() if k[0] in first}  # every pair decided, none flipped by the yes-sayer

    # 5. the worker list says who is blocked and why
    code = _cli(monkeypatch, ls, settings, "workers")
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if w_spam in line)
    assert code == 0 and "True" in row and "always_yes" in row and spammer.email not in table
    others = [line for line in table.splitlines() if line.startswith("| w-") and w_spam not in line]
    assert len(others) == 3 and all("False" in line for line in others)

    # 6. unblocked: tasks and the project again
    code = _cli(monkeypatch, ls, settings, "workers", "--unblock", spammer.email)
    assert code == 0 and f"unblocked {w_spam}" in capsys.readouterr().out
    assert next_task(spammer.client, pid) is not None
    browser.delete_all_cookies()
    browser_login(browser, ls.url, spammer.email, spammer.password)
    browser.get(f"{ls.url}/projects/")
    wait_for_text(browser, project_title)

    # 7. the automatic path blocks exactly the flagged account, once
    auto = block_flagged(store, admin, settings)
    assert auto["blocked"] == [w_spam] and auto["no_account"] == []
    with pytest.raises(Blocked):
        next_task(spammer.client, pid)
    again = block_flagged(store, admin, settings)
    assert again["blocked"] == [] and again["already_blocked"] == 1
    exempt = ls.settings(store, gold_rate=0.0, admin_password=ls.server.password, block_exempt=[w_spam])
    assert block_flagged(store, admin, exempt)["exempt"] == 1
    acc = accounts(admin, KEY).set_index("worker")
    assert int(acc.loc[w_spam, "user_id"]) == spammer.user_id
    assert admin.unblock_user(spammer.user_id, password=ls.server.password)
    assert not admin.unblock_user(spammer.user_id, password=ls.server.password)  # already active: no change


def _set_staff(admin, user_id: int, password: str, staff: bool) -> None:
    """Tick or clear an account's Staff status box on Label Studio's admin site, as its administrator would."""
    site = admin.admin_site(password)
    path, form = site._user_form(user_id)
    boxes = {**form.checkboxes, "is_staff": staff}
    data: dict[str, list[str]] = {}
    for k, v in [*form.fields, *((k, "on") for k, on in boxes.items() if on), ("_save", "Save")]:
        data.setdefault(k, []).append(v)
    csrf = dict(form.fields).get("csrfmiddlewaretoken", "")
    site._session().post(path, data=data, headers={"X-CSRFToken": csrf, "Referer": f"{admin.url}{path}"})
    assert site._user_form(user_id)[1].checkboxes["is_staff"] == staff


def test_block_flagged_passes_over_a_flagged_administrator_by_the_error_type_not_a_message(labelstudio, monkeypatch):
    """A flagged account with Staff status is left alone (the client refuses to deactivate an administrator with a
    ProtectedAccount error); the other flagged account is blocked. Any other refusal is raised, whatever its
    message says."""
    if not labelstudio.server.password:
        pytest.skip("external server: its admin password is not known to the tests")
    ls, password = labelstudio, labelstudio.server.password
    store = ls.new_store()
    settings = ls.settings(store, gold_rate=0.0, admin_password=password)
    admin = ls.admin()
    staff, plain = ls.annotators([Profile(), Profile()])
    w_staff, w_plain = pseudonym(staff.email, KEY), pseudonym(plain.email, KEY)
    store.write_table("worker_gold", pd.DataFrame({
        "worker": [w_staff, w_plain], "n_votes": 20, "gold_n": 10, "gold_correct": 4, "gold_accuracy": 0.4,
        "yes_rate": 1.0, "flagged": True, "flag_reason": "gold accuracy 0.40"}))
    _set_staff(admin, staff.user_id, password, True)
    try:
        with pytest.raises(ProtectedAccount) as refused:
            admin.block_user(staff.user_id, password=password)
        assert refused.value.status is None  # no HTTP status: the error's type is what tells

        # a status-less refusal for an account that is no administrator propagates, though its text names one
        real = admin.block_user

        def refuse_plain(user_id, *, password):
            if user_id == plain.user_id:
                raise CrowdError("the admin site did not save the account; ask an administrator", status=None)
            return real(user_id, password=password)

        monkeypatch.setattr(admin, "block_user", refuse_plain)
        with pytest.raises(CrowdError, match="ask an administrator"):
            block_flagged(store, admin, settings)
        monkeypatch.undo()

        out = block_flagged(store, admin, settings)
        assert out["blocked"] == [w_plain] and out["no_account"] == []
        blocked = admin.blocked_user_ids(password=password)
        assert plain.user_id in blocked and staff.user_id not in blocked
    finally:
        _set_staff(admin, staff.user_id, password, False)
        admin.unblock_user(plain.user_id, password=password)
