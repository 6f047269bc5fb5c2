"""Pure parts of crowd/: request planning, vote mapping, quarantine, pseudonyms, gold accuracy, retries."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from crowd.client import CrowdClient, CrowdError
from crowd.gold import worker_gold
from crowd.kinds import VERIFY, BadAnnotation, choices_answer
from crowd.pull import annotations_to_votes, pseudonym, pseudonym_key
from crowd.push import REQUEST_COLUMNS, PlanError, check_plan, plan_requests
from crowd.simulate import Profile
from pipeline.config import load_settings
from pipeline.services import free_port

W1, W2 = "n00000001", "n00000002"


def _plan(n=4, n_more=3):
    return pd.DataFrame({"image_id": [f"img{i}" for i in range(n)], "wnid": [W1] * n, "n_more": [n_more] * n})


def _gold():
    return pd.DataFrame({"image_id": ["g1", "g2", "g3"], "wnid": [W2] * 3, "answer": ["yes", "no", "yes"]})


def test_plan_requests_is_idempotent_and_mixes_gold():
    empty = pd.DataFrame(columns=REQUEST_COLUMNS)
    first = plan_requests(_plan(), kind="verify", project_id=7, history=empty, open_request_ids=set(),
                          gold=_gold(), gold_rate=0.2)
    assert len(first) == 5 and first["is_gold"].sum() == 1  # 4 real * 0.2/0.8 = 1 control
    assert first["request_id"].is_unique
    # Same plan again while those tasks are open: nothing new.
    again = plan_requests(_plan(), kind="verify", project_id=7, history=first,
                          open_request_ids=set(first["request_id"]), gold=_gold(), gold_rate=0.2)
    assert again.empty
    # Once done, asking again for a pair is a new request with a new id (k = 1), never the old one.
    later = plan_requests(_plan(1), kind="verify", project_id=7, history=first, open_request_ids=set(),
                          gold=None, gold_rate=0.0)
    assert len(later) == 1 and later["request_id"].iloc[0] not in set(first["request_id"])
    # A gold pair in the plan is never pushed as a real request.
    mixed = pd.concat([_plan(1), pd.DataFrame({"image_id": ["g1"], "wnid": [W2], "n_more": [3]})])
    reqs = plan_requests(mixed, kind="verify", project_id=7, history=empty, open_request_ids=set(), gold=_gold(),
                         gold_rate=0.5)
    assert not ((reqs["image_id"] == "g1") & ~reqs["is_gold"]).any()


def test_gold_prefers_least_used_controls():
    empty = pd.DataFrame(columns=REQUEST_COLUMNS)
    first = plan_requests(_plan(8), kind="verify", project_id=1, history=empty, open_request_ids=set(),
                          gold=_gold(), gold_rate=0.2)
    used = set(first.loc[first["is_gold"], "image_id"])
    second = plan_requests(_plan(4).assign(image_id=lambda d: "x" + d["image_id"]), kind="verify", project_id=1,
                           history=first, open_request_ids=set(), gold=_gold(), gold_rate=0.2)
    assert set(second.loc[second["is_gold"], "image_id"]).isdisjoint(used)


@pytest.mark.parametrize("bad, needle", [
    (pd.DataFrame({"image": ["a"], "wnid": [W1]}), "lacks column"),
    (pd.DataFrame({"image_id": ["a"], "wnid": [W1], "n_more": [-1]}), "bad row"),
    (pd.DataFrame({"image_id": [None], "wnid": [W1], "n_more": [1]}), "bad row"),
    (pd.DataFrame({"image_id": ["a"], "wnid": ["dog"], "n_more": [1]}), r"n \+ 8 digits"),
])
def test_check_plan_rejects_bad_input_with_a_clear_message(bad, needle):
    with pytest.raises(PlanError, match=needle):
        check_plan(bad, 3)


def test_check_plan_drops_zero_and_merges_duplicates():
    plan = pd.DataFrame({"image_id": ["a", "a", "b"], "wnid": [W1, W1, W1], "n_more": [2, 5, 0]})
    out = check_plan(plan, 3)
    assert out.to_dict("records") == [{"image_id": "a", "wnid": W1, "n_more": 5}]


def _tasks():
    return pd.DataFrame({"task_id": [10, 11], "project_id": [1, 1], "request_id": ["r10", "r11"],
                         "image_id": ["img0", "g1"], "wnid": [W1, W2], "kind": ["verify", "verify"],
                         "is_gold": [False, True], "gold_answer": [None, "yes"], "pushed_at": pd.Timestamp.now(tz="UTC")})


def _ann(i, answer="yes", user=5, **kw):
    return {"id": i, "completed_by": user, "result": VERIFY.render(answer, {}), "lead_time": 3.5,
            "created_at": "2026-11-26T10:00:00Z", "was_cancelled": False, **kw}


def test_annotations_to_votes_maps_skips_and_quarantines():
    export = [
        {"id": 10, "data": {}, "annotations": [_ann(1), _ann(2, "no", user=6), _ann(3, was_cancelled=True),
                                               {**_ann(4), "result": [{"from_name": "answer", "value": {"choices": ["maybe"]}}]},
                                               {**_ann(5), "result": "garbage"}]},
        {"id": 11, "data": {}, "annotations": [_ann(6, user=5)]},
        {"id": 99, "data": {}, "annotations": [_ann(7)]},  # a task synsetforge did not push
    ]
    votes, quar = annotations_to_votes(export, project_id=1, tasks=_tasks(), seen={2}, worker_of={5: "a@x", 6: "b@x"},
                                       key=b"k")
    assert votes["annotation_id"].tolist() == [1, 6]  # 2 seen before, 3 cancelled
    assert votes["worker"].tolist() == [pseudonym("a@x", b"k")] * 2
    assert "a@x" not in votes.to_string() and votes["lead_time_s"].tolist() == [3.5, 3.5]
    assert votes["is_gold"].tolist() == [False, True] and votes["image_id"].tolist() == ["img0", "g1"]
    assert sorted(quar["annotation_id"]) == [4, 5, 7]
    reasons = dict(zip(quar["annotation_id"], quar["reason"], strict=True))
    assert "maybe" in reasons[4] and "expected a list" in reasons[5] and "not in the tasks table" in reasons[7]


def test_pseudonym_is_keyed_and_stable():
    assert pseudonym("A@x.org ", b"k1") == pseudonym("a@x.org", b"k1") != pseudonym("a@x.org", b"k2")


def test_missing_pseudonym_key_is_a_clear_error():
    with pytest.raises(ValueError, match="SYNSETFORGE__CROWD__PSEUDONYM_KEY"):
        pseudonym_key(load_settings(env={}))


def test_choices_answer_shapes():
    assert choices_answer(VERIFY.render("no", {}), "answer", ("yes", "no")) == "no"
    with pytest.raises(BadAnnotation, match="expected one"):
        choices_answer(VERIFY.render("no", {}) * 2, "answer", ("yes", "no"))
    with pytest.raises(BadAnnotation, match="no 'answer'"):
        choices_answer([], "answer", ("yes", "no"))


def test_worker_gold_flags_low_accuracy():
    tasks = _tasks()
    votes = pd.DataFrame({"worker": ["good"] * 5 + ["bad"] * 5, "task_id": [11] * 10, "is_gold": [True] * 10,
                          "answer": ["yes"] * 5 + ["no"] * 4 + ["yes"]})
    wg = worker_gold(votes, tasks, min_n=5, min_accuracy=0.7).set_index("worker")
    assert wg.loc["good", "gold_accuracy"] == 1.0 and not wg.loc["good", "flagged"]
    assert wg.loc["bad", "gold_accuracy"] == pytest.approx(0.2) and wg.loc["bad", "flagged"]
    assert "0.20" in wg.loc["bad", "flag_reason"]


def test_profiles():
    rng = random.Random(1)
    spam = [Profile(kind="spammer").answer("yes", rng=rng) for _ in range(2000)]
    assert 0.45 < spam.count("yes") / 2000 < 0.55
    good = [Profile(accuracy=0.8).answer("no", rng=rng) for _ in range(2000)]
    assert 0.76 < good.count("no") / 2000 < 0.84
    assert Profile(kind="adversarial").answer("no", rng=rng) == "yes"
    assert Profile(accuracy=1.0, yes_bias=1.0).answer("no", rng=rng) == "yes"
    hard = Profile(accuracy=1.0, accuracy_by_difficulty={"hard": 0.0})
    assert hard.answer("yes", rng=rng, difficulty="hard") == "no"


def test_client_retries_with_backoff_then_fails_clearly_without_the_token():
    sleeps: list[float] = []
    client = CrowdClient(f"http://127.0.0.1:{free_port()}", "tok-SECRET-123", retries=3, backoff_s=0.1,
                         sleep=sleeps.append)
    with pytest.raises(CrowdError) as err:
        client.get_json("/api/projects/")
    assert sleeps == [0.1, 0.2, 0.4]
    assert "after 4 tries" in str(err.value) and "tok-SECRET-123" not in str(err.value)
    assert "tok-SECRET-123" not in repr(client)


def test_client_needs_url_and_token():
    with pytest.raises(CrowdError, match="SYNSETFORGE__CROWD__TOKEN"):
        CrowdClient("http://127.0.0.1:1", "")


@pytest.mark.slow
def test_s3_store_gives_presigned_urls_and_bucket_cors(s3_bucket):
    import urllib.request

    from crowd.provision import ensure_bucket_cors
    from crowd.push import image_url_resolver
    from pipeline.store import S3Store

    client, bucket = s3_bucket
    store = S3Store(bucket, "root", client=client)
    key = store.put_content(b"\xff\xd8fake-jpeg", ".jpg")
    resolve = image_url_resolver(store, pd.DataFrame({"image_id": ["i1"], "storage_key": [key]}), files_root=None,
                                 expiry_s=600)
    url = resolve("i1")
    assert "Expires=" in url or "X-Amz-Expires=600" in url
    with urllib.request.urlopen(url) as resp:
        assert resp.read() == b"\xff\xd8fake-jpeg"
    assert ensure_bucket_cors(store, "http://127.0.0.1:8080/") is True
    assert ensure_bucket_cors(store, "http://127.0.0.1:8080") is False  # idempotent
    rules = client.get_bucket_cors(Bucket=bucket)["CORSRules"]
    assert rules[0]["AllowedOrigins"] == ["http://127.0.0.1:8080"] and "GET" in rules[0]["AllowedMethods"]
    with pytest.raises(KeyError):
        resolve("unknown")


def test_local_image_outside_files_root_is_a_clear_error(tmp_path):
    from crowd.push import image_url_resolver
    from pipeline.store import LocalStore

    store = LocalStore(tmp_path / "s")
    key = store.put_content(b"x", ".jpg")
    images = pd.DataFrame({"image_id": ["i1"], "storage_key": [key]})
    ok = image_url_resolver(store, images, files_root=str(tmp_path), expiry_s=60)("i1")
    assert ok.startswith("/data/local-files/?d=s/blobs/")
    bad = image_url_resolver(store, images, files_root=str(tmp_path / "elsewhere"), expiry_s=60)
    with pytest.raises(PlanError, match="LOCAL_FILES_DOCUMENT_ROOT"):
        bad("i1")


def test_routable_drops_workers_flagged_by_gold_or_by_qc(tmp_path):
    from crowd.simulate import Annotator, flagged_workers, routable
    from pipeline.store import LocalStore

    people = [Annotator(e, "p", Profile()) for e in ("a@x", "b@x", "c@x")]
    store = LocalStore(tmp_path / "s")
    assert flagged_workers(store) == set() and len(routable(people, flagged_workers(store), b"k")) == 3
    a, b, c = (pseudonym(e, b"k") for e in ("a@x", "b@x", "c@x"))
    store.write_table("worker_gold", _flag_rows("worker_gold", [a, b], [False, True]))
    store.write_table("workers", _flag_rows("workers", [a, b, c], [False, False, True]))
    assert flagged_workers(store) == {b, c}
    assert [p.email for p in routable(people, flagged_workers(store), b"k")] == ["a@x"]


def _flag_rows(table, workers, flagged):
    """A minimal valid row per worker of a worker table (worker_gold or QC's workers)."""
    from pipeline.schemas import arrow_schema

    rows = {}
    for f in arrow_schema(table):
        blank = "" if str(f.type) == "string" else 0
        rows[f.name] = [None if f.nullable else blank] * len(workers)
    rows.update(worker=workers, flagged=flagged)
    return pd.DataFrame(rows)


def test_cli_without_server_settings_says_what_to_set(capsys, monkeypatch, tmp_path):
    from pipeline.cli import main

    for k in ("URL", "TOKEN"):
        monkeypatch.delenv(f"SYNSETFORGE__CROWD__{k}", raising=False)
    assert main(["--store", str(tmp_path), "crowd", "pull"]) == 2
    assert "SYNSETFORGE__CROWD__URL" in capsys.readouterr().err
    monkeypatch.setenv("SYNSETFORGE__CROWD__URL", "http://127.0.0.1:1")
    assert main(["--store", str(tmp_path), "crowd", "push"]) == 2
    assert "SYNSETFORGE__CROWD__TOKEN" in capsys.readouterr().err


def test_bucket_cors_on_a_server_without_the_cors_api_warns_instead_of_failing(caplog):
    """MinIO answers PutBucketCors with NotImplemented (its CORS is a server setting): push must go on."""
    import boto3
    from botocore.stub import Stubber

    from crowd.provision import ensure_bucket_cors
    from pipeline.store import S3Store

    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_client_error("get_bucket_cors", "NoSuchCORSConfiguration")
        stub.add_client_error("put_bucket_cors", "NotImplemented", http_status_code=501)
        assert ensure_bucket_cors(S3Store("b", "p", client=client), "http://ls.example:8080") is False
        stub.add_client_error("get_bucket_cors", "NoSuchCORSConfiguration")
        stub.add_client_error("put_bucket_cors", "AccessDenied", http_status_code=403)
        with pytest.raises(Exception, match="AccessDenied"):  # any other refusal is the operator's to fix
            ensure_bucket_cors(S3Store("b", "p", client=client), "http://ls.example:8080")
    assert "no bucket CORS API" in caplog.text and "http://ls.example:8080" in caplog.text
