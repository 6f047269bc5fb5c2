"""`make demo`: the Airflow DAG chain on real photos, offline, with simulated annotators doing the crowd work.

The search engine is the only stand-in: a loopback server answers in the Openverse API format from the demo
corpus (pipeline/demo_corpus.py: photos shipped in scikit-image's wheel, near copies, misfiled crops, a broken
and a tiny file, all with known truth), so the real `openverse` source and ingest run on it. Everything else
is the real thing, run as the DAGs in dags/ with `dag.test()` against a temp Airflow home: vocabulary (WordNet
3.0) -> collect + ingest -> the crowd DAG repeated while simulated annotators answer in a Label Studio started
here -> the boxes DAG repeated while they draw and verify boxes -> release 1.0.0 (report, dataset card) -> an
ILSVRC evaluation of a baseline submission.

    .venv/bin/python -m pipeline.demo [--keep-running]     # or: make demo [KEEP_RUNNING=1]

Without --keep-running (or SYNSETFORGE_DEMO_KEEP_RUNNING=1) every server it started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.airflow_local import airflow_env, failed_tasks, run_dag_test, use_home
from pipeline.demo_corpus import DEMO_SYNSETS, Corpus, build_corpus
from pipeline.services import Service, free_port, start_service

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-output"
VERSION = "1.0.0"
BOXED_PER_CLASS = 2
MAX_CROWD_ROUNDS = 25  # QC re-estimates workers each run, so a few pairs can need several more rounds
MAX_BOX_ROUNDS = 30
KEEP_ENV = "SYNSETFORGE_DEMO_KEEP_RUNNING"
RUNNING_FILE = OUT / "running.json"


class DemoFailed(RuntimeError):
    """A DAG run did not succeed; the message names its failed tasks."""


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


# ------------------------------------------------------------------------------------------------ DAG runs
def run_dag(dag_id: str, conf: dict[str, Any] | None = None, *, quiet: bool = False) -> Any:
    """One dag.test() run; raises DemoFailed (with the failed tasks) unless its state is success."""
    t0 = time.perf_counter()
    # Retries a few seconds apart: a transient fault still gets its retry, a real failure shows within seconds.
    run = run_dag_test(dag_id, conf or {}, retry_delay=timedelta(seconds=3))
    state = str(getattr(run, "state", None))
    if state != "success":
        raise DemoFailed(f"{dag_id} run ended {state}; failed tasks: {', '.join(failed_tasks(run)) or 'none'} "
                         f"(task logs: {os.environ.get('AIRFLOW_HOME')}/logs)")
    if not quiet:
        print(f"  {dag_id}: success in {time.perf_counter() - t0:.0f}s", flush=True)
    return run


def task_state(run: Any, task_id: str) -> str | None:
    try:
        return next((str(ti.state) for ti in run.get_task_instances() if ti.task_id == task_id), None)
    except Exception:  # noqa: BLE001 - only used for progress lines
        return None


def task_result(run: Any, task_id: str) -> Any:
    """The return value (XCom) of one task of a finished run, or None when it cannot be read."""
    try:
        for ti in run.get_task_instances():
            if ti.task_id == task_id:
                return ti.xcom_pull(task_ids=task_id, map_indexes=ti.map_index)
    except Exception:  # noqa: BLE001 - only used for progress lines
        return None
    return None


# ------------------------------------------------------------------------------------------------ services
def start_openverse(seed: int, digest: str) -> Service:
    """The offline Openverse API in its own process (so --keep-running can leave it up), ready when its
    /healthz reports the same corpus this process built."""
    port = free_port()
    return start_service(
        "openverse-demo", [sys.executable, "-m", "pipeline.demo_corpus", "serve", "--port", str(port), "--seed", str(seed)],
        url=f"http://127.0.0.1:{port}", ready_path="/healthz", accept=lambda s, b: s == 200 and digest.encode() in b,
        log_path=OUT / "logs" / "openverse.log", timeout=90, cwd=str(ROOT),
    )


def start_services(seed: int, corpus: Corpus, store_dir: Path, airflow_home: Path) -> tuple[Service, Any]:
    """Openverse, then Label Studio (about a minute on a fresh DB) while Airflow's DB is migrated alongside."""
    from crowd.server import start_labelstudio

    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")  # progress lines, not Airflow's INFO log
    os.environ.update(airflow_env(airflow_home))  # before any child copies the environment
    openverse = start_openverse(seed, corpus.digest())
    print(f"  offline Openverse API at {openverse.url} (pid {openverse.pid}, {len(corpus.files)} files)", flush=True)
    box: dict[str, Any] = {}

    def ls() -> None:
        try:
            box["server"] = start_labelstudio(OUT / "label-studio", files_root=store_dir,
                                              log_path=OUT / "logs" / "label-studio.log")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = exc

    print("  starting Label Studio 1.23.2 on 127.0.0.1 (about a minute on a fresh database) and migrating "
          "Airflow's SQLite DB ...", flush=True)
    thread = threading.Thread(target=ls, name="start-labelstudio")
    thread.start()
    try:
        use_home(airflow_home)
    finally:
        thread.join()
    if "error" in box:
        openverse.stop()
        raise box["error"]
    server = box["server"]
    print(f"  Label Studio at {server.url} (pid {server.pid}); Airflow home {airflow_home}", flush=True)
    return openverse, server


def demo_env(store_dir: Path, openverse_url: str, server: Any) -> dict[str, str]:
    """The configuration the DAG tasks read (they run in this process under dag.test())."""
    return {
        "SYNSETFORGE__STORE__URL": str(store_dir),
        "SYNSETFORGE__COLLECT__SOURCES": "openverse",
        "SYNSETFORGE__COLLECT__OPENVERSE_URL": openverse_url,
        "SYNSETFORGE__INGEST__ALLOWED_NETWORKS": '["127.0.0.0/8"]',  # the offline API is on loopback
        "SYNSETFORGE__CROWD__URL": server.url,
        "SYNSETFORGE__CROWD__TOKEN": server.token,
        "SYNSETFORGE__CROWD__PSEUDONYM_KEY": "demo-pseudonym-key",
        "SYNSETFORGE__CROWD__FILES_ROOT": str(store_dir),
        "SYNSETFORGE__BOXES__MAX_IMAGES_PER_WNID": str(BOXED_PER_CLASS),
    }


# ------------------------------------------------------------------------------------------------ stages
def vocabulary(workdir: Path) -> None:
    from pipeline.config import load_settings
    from pipeline.store import store_from_settings

    wnid_file = workdir / "classes.txt"
    wnid_file.write_text("".join(f"{s.wnid}\n" for s in DEMO_SYNSETS))
    run_dag("synsetforge_vocabulary", {"wnid_file": str(wnid_file)})
    store = store_from_settings(load_settings())
    for r in store.read_table("synsets").to_pandas().itertuples():
        print(f"  {r.wnid}  {', '.join(r.lemmas)[:30]:30s}  queries: {'; '.join(r.queries[:4])}")


def collect(store: Any, corpus: Corpus) -> pd.DataFrame:
    """The collect DAG (openverse source, ingest); prints what the checks caught against the corpus truth."""
    run_dag("synsetforge_collect", {"sources": ["openverse"], "allowed_networks": ["127.0.0.0/8"]})
    cand = store.read_table("candidates").to_pandas()
    print(f"  candidates: {len(cand)} from {cand['source'].value_counts().to_dict()} "
          f"({cand['query'].nunique()} queries for {cand['wnid'].nunique()} synsets)")
    images = store.read_table("images").to_pandas()
    rejected = images.loc[images["status"] == "rejected"]
    print(f"  images: {int((images['status'] == 'accepted').sum())} accepted, "
          f"{int((images['status'] == 'duplicate').sum())} exact duplicates, rejected: "
          + ", ".join(f"{_name(r.first_url)} ({r.reject_reason})" for r in rejected.itertuples()))
    links = store.read_table("image_links").to_pandas()
    links["name"] = links["url"].map(_name)
    name_of = dict(zip(links["image_id"], links["name"], strict=False))
    flagged = {frozenset((r.name, name_of.get(r.near_duplicate_of, "?")))
               for r in links[links["near_duplicate_of"].notna()].itertuples()}
    planted = {frozenset((n, t["near_copy_of"])) for n, t in corpus.truth.items() if t["kind"] == "near_copy"}
    print(f"  near duplicates: {len(flagged & planted)} of {len(planted)} planted copies caught, "
          f"{len(flagged - planted)} false alarms (edits: "
          + ", ".join(sorted({corpus.truth[n]['edit'].split(' ')[0] for n, t in corpus.truth.items()
                              if t['kind'] == 'near_copy'})) + ")")
    misfiled = int((links["name"].map(lambda n: corpus.truth[n]["wnid"]) != links["wnid"]).sum())
    print(f"  image_links: {len(links)} (image, synset) pairs, {misfiled} of them misfiled by the search "
          "(the crowd has to catch those); near copies stay out of the crowd's work")
    return links


def crowd(store: Any, settings: Any, server: Any, corpus: Corpus, links: pd.DataFrame) -> list[Any]:
    """The crowd DAG (pull -> QC -> push) again and again, simulated annotators working between runs."""
    from crowd.client import CrowdClient
    from crowd.provision import kind_project_ids
    from crowd.simulate import Profile, controls_of, flagged_workers, make_annotators, routable, work

    answer = {(r.image_id, r.wnid): ("yes" if corpus.truth[r.name]["wnid"] == r.wnid else "no")
              for r in links.itertuples()}
    admin = CrowdClient(server.url, server.token)
    # As many people as QC's vote cap per image (10): each votes once per pair, so every pair can reach the cap.
    careful = (0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.9, 0.89, 0.88)
    profiles = [Profile(accuracy=a) for a in careful] + [Profile(kind="spammer")]
    annotators = make_annotators(admin, profiles)
    print(f"  annotators: {len(careful)} careful (88-95 % accurate), 1 spammer: "
          f"{', '.join(a.email for a in annotators)}", flush=True)
    key = settings.crowd.pseudonym_key.get_secret_value().encode()
    for rnd in range(1, MAX_CROWD_ROUNDS + 1):
        t0 = time.perf_counter()
        run = run_dag("synsetforge_crowd", {"kind": "verify"}, quiet=True)
        plan = store.read_table("push_plan", missing_ok=True)
        pushed = task_result(run, "push_tasks") or {}
        votes = store.read_table("votes", missing_ok=True).num_rows
        line = (f"  round {rnd}: crowd DAG {time.perf_counter() - t0:.0f}s, {votes} votes so far, "
                f"QC asks {plan.num_rows} pairs for more, pushed {pushed.get('pushed', '?')} tasks")
        if plan.num_rows == 0:
            print(f"{line} -> QC is done (settled task: {task_state(run, 'settled')})", flush=True)
            break
        # gold controls (the crowd DAG builds them) are answered like any task; their known answer is the truth;
        # tasks are in one project per overlap QC asked for (crowd.provision)
        done: dict[str, int] = {}
        for project in kind_project_ids(admin, settings, "verify", store):
            for who, n in work(routable(annotators, flagged_workers(store), key), project, answer, seed=rnd,
                               controls=controls_of(store)).items():
                done[who] = done.get(who, 0) + n
        print(f"{line}; annotators answered {sum(done.values())}", flush=True)
        if not pushed.get("pushed") and not sum(done.values()):
            print("  every annotator has judged the pairs QC still asks about; going on with the pending labels")
            break
    else:
        print(f"  QC still asks for votes after {MAX_CROWD_ROUNDS} rounds; going on with the pending labels")
    labels = store.read_table("labels").to_pandas()
    workers = store.read_table("workers", missing_ok=True).to_pandas()
    decided = labels[labels["status"] != "pending"]
    right = [answer.get((r.image_id, r.wnid)) == ("yes" if r.status == "accepted" else "no") for r in decided.itertuples()]
    named = links.set_index(["image_id", "wnid"])["name"]
    caught = sum(1 for r in decided.itertuples() if r.status == "rejected"
                 and corpus.truth.get(named.get((r.image_id, r.wnid)), {}).get("wnid") != r.wnid)
    print(f"  labels: {int((labels.status == 'accepted').sum())} accepted, {int((labels.status == 'rejected').sum())} "
          f"rejected, {int((labels.status == 'pending').sum())} pending; agree with the truth on "
          f"{np.mean(right) if right else 0:.0%} of decided pairs; {caught} misfiled images rejected; "
          f"{int(workers['flagged'].sum()) if len(workers) else 0} of {len(workers)} workers flagged")
    return annotators


def boxes(store: Any, settings: Any, server: Any, corpus: Corpus, links: pd.DataFrame, annotators: list[Any]) -> None:
    """The boxes DAG (provision -> pull -> plan -> push) again and again, simulated drawers and verifiers
    between runs, until the replayed plan has nothing to push and nothing waiting (crowd.boxes.run_until_done's
    stop rule)."""
    from crowd.boxes import CONFIGS, project_title, work_boxes
    from crowd.client import CrowdClient
    from crowd.provision import find_project
    from crowd.simulate_boxes import default_workers
    from pipeline.boxes import BOX_COLUMNS, box_settings, iou_matrix, pairs_to_box, plan, summarize

    truth = pd.DataFrame([
        {"image_id": r.image_id, "wnid": r.wnid, **dict(zip(BOX_COLUMNS, corpus.truth[r.name]["box"], strict=True))}
        for r in links.itertuples() if corpus.truth[r.name]["wnid"] == r.wnid and corpus.truth[r.name]["box"]
    ])
    admin = CrowdClient(server.url, server.token)
    workers = list(zip(annotators[:3], default_workers(3), strict=True))
    policy = box_settings(settings)
    answers = 0
    for rnd in range(1, MAX_BOX_ROUNDS + 1):
        t0 = time.perf_counter()
        run = run_dag("synsetforge_boxes", quiet=True)
        pushed = (task_result(run, "push") or {}).get("pushed", "?")
        replay = plan(pairs_to_box(store, policy), store.read_table("box_tasks", missing_ok=True).to_pandas(),
                      store.read_table("box_answers", missing_ok=True).to_pandas(),
                      store.read_table("boxes", missing_ok=True).to_pandas(), policy)
        s = summarize(replay.coverage, replay.boxes)
        line = (f"  round {rnd}: boxes DAG {time.perf_counter() - t0:.0f}s, pushed {pushed}, {s['waiting']} tasks "
                f"waiting, {s['boxes_accepted']} boxes accepted, {s['finished']}/{s['pairs']} images finished")
        if replay.actions.empty and s["waiting"] == 0:
            print(line + " -> done", flush=True)
            break
        found = {k: find_project(admin, project_title(settings.crowd.project_prefix, k)) for k in CONFIGS}
        projects = {k: int(p["id"]) for k, p in found.items() if p is not None}  # the kinds this loop provisioned
        n = sum(work_boxes(workers, projects, truth, seed=rnd).values())
        answers += n
        print(f"{line}; workers answered {n}", flush=True)
    else:
        print(f"  the box loop is not finished after {MAX_BOX_ROUNDS} rounds; releasing what is accepted")
    got = store.read_table("boxes").to_pandas()
    got = got[got["verified"] == "accepted"]
    coverage = store.read_table("coverage").to_pandas()
    ious = []
    for r in got.itertuples():
        t = truth[(truth.image_id == r.image_id) & (truth.wnid == r.wnid)][BOX_COLUMNS].to_numpy(np.float64)
        if len(t):
            ious.append(float(iou_matrix(np.array([[getattr(r, c) for c in BOX_COLUMNS]], np.float64), t).max()))
    print(f"  {len(coverage)} images: {len(got)} boxes accepted, {int(coverage['covered'].sum())} images fully "
          f"covered, {answers} answers; IoU with the true box: mean {np.mean(ious) if ious else 0:.2f}, "
          f"min {min(ious) if ious else 0:.2f}")


def release_and_evaluate(store: Any, workdir: Path) -> dict[str, str]:
    from pipeline.evaluate import evaluate, format_result, ground_truth_from_release
    from pipeline.release.manifest import read_manifest

    run = run_dag("synsetforge_release", {"version": VERSION, "val_per_class": 1, "test_per_class": 1})
    manifest = read_manifest(store, VERSION)
    n_boxes = sum(int(c.get("boxes", 0)) for c in manifest["classes"].values())
    print(f"  release {VERSION}: {len(manifest['classes'])} classes, images per split "
          f"{json.dumps(manifest['splits'], sort_keys=True)}, {n_boxes} boxes, "
          f"{manifest['neardup_dropped']} train near-duplicates of val/test dropped; verified by re-hashing")
    keys = task_result(run, "report") or {}
    root = Path(store.root)
    rel = root / "releases" / VERSION
    report = root / keys["report"] if keys.get("report") else rel / "report.html"
    card = root / keys["card"] if keys.get("card") else rel / "card.md"
    gt = ground_truth_from_release(store, VERSION, "val")
    # A baseline submission: the true class ranked third of five guesses on every other image.
    lines = []
    for i, image in enumerate(gt.order):
        t = gt.truth[image]
        others = [c for c in range(1, len(gt.wnids) + 1) if c != t]
        lines.append(" ".join(map(str, others[:2] + [t] + others[2:4])) if i % 2 else " ".join(map(str, others[:5])))
    pred = workdir / "baseline_cls.txt"
    pred.write_text("\n".join(lines) + "\n")
    print("  baseline submission (true class third of five guesses on half the val images, absent on the rest):")
    print("  " + format_result(evaluate("cls", pred, gt)).replace("\n", "\n  "))
    return {"release": str(rel), "report": str(report), "card": str(card)}


# ------------------------------------------------------------------------------------------------ main
LIVE_HOWTO = """\
To run the same chain against live sources (any shell; the DAGs read the same variables):
  unset SYNSETFORGE__COLLECT__OPENVERSE_URL SYNSETFORGE__INGEST__ALLOWED_NETWORKS   # real APIs, loopback refused
  export SYNSETFORGE__STORE__URL=s3://bucket/prefix           # or a folder; + SYNSETFORGE__STORE__S3_ENDPOINT_URL
  export SYNSETFORGE__COLLECT__SOURCES=openverse,wikimedia    # https://api.openverse.org, commons.wikimedia.org
  export SYNSETFORGE__CROWD__URL=... SYNSETFORGE__CROWD__TOKEN=... SYNSETFORGE__CROWD__PSEUDONYM_KEY=...
  synsetforge vocab --wnid-file my_wnids.txt                   # one n01440764-style wnid per line
  synsetforge collect --sources openverse,wikimedia --budget 2000 && synsetforge ingest
  synsetforge airflow up    # or a local Airflow UI: trigger synsetforge_vocabulary, _collect, _crowd, _boxes, _release"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _clean_out() -> None:
    if RUNNING_FILE.exists():
        left = {k: v for k, v in json.loads(RUNNING_FILE.read_text()).items() if _alive(int(v))}
        if left:
            raise SystemExit("a previous `make demo KEEP_RUNNING=1` is still running "
                             + ", ".join(f"{k} (pid {v})" for k, v in left.items())
                             + "; stop it first: " + "; ".join(f"kill -- -{v}" for v in left.values()))
    if OUT.exists():
        shutil.rmtree(OUT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n")[0])
    p.add_argument("--keep-running", action="store_true", default=os.environ.get(KEEP_ENV, "") in ("1", "true", "yes"),
                   help=f"leave Label Studio and the offline Openverse server up (also {KEEP_ENV}=1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus edits and the simulated crowd")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    _clean_out()
    store_dir, airflow_home, workdir = OUT / "store", OUT / "airflow", OUT / "work"
    for d in (store_dir, workdir):
        d.mkdir(parents=True, exist_ok=True)
    dropped = [k for k in os.environ if k.startswith("SYNSETFORGE__") or k == "SYNSETFORGE_CONFIG"]
    for k in dropped:  # the demo is self-contained: no configuration of the caller's leaks in
        os.environ.pop(k)
    if dropped:
        print(f"(ignoring {', '.join(sorted(dropped))} for the demo)")
    os.environ.setdefault("NLTK_DATA", str(ROOT / ".nltk_data"))

    step("offline corpus: photos from scikit-image's wheel, near copies, misfiled crops, a broken and a tiny file")
    corpus = build_corpus(args.seed)
    kinds = pd.Series([t["kind"] for t in corpus.truth.values()]).value_counts().to_dict()
    print(f"  {len(corpus.files)} files for {len(DEMO_SYNSETS)} synsets: {kinds}; written to {corpus.write(OUT / 'corpus')}")
    services: list[Any] = []
    server = None
    try:
        step("services: offline Openverse API, Label Studio, Airflow metadata DB")
        openverse, server = start_services(args.seed, corpus, store_dir, airflow_home)
        services += [openverse, server]
        os.environ.update(demo_env(store_dir, openverse.url, server))
        from pipeline.config import load_settings
        from pipeline.store import store_from_settings

        settings = load_settings()
        store = store_from_settings(settings)

        step("vocabulary DAG: the synsets from WordNet 3.0, with ImageNet's query expansion")
        vocabulary(workdir)
        step("collect DAG: the real openverse source against the offline API, then ingest")
        links = collect(store, corpus)
        step("crowd DAG: pull -> QC -> push in Label Studio, simulated annotators answer between runs")
        annotators = crowd(store, settings, server, corpus, links)
        step("boxes DAG: draw / verify quality / verify coverage (ILSVRC micro-tasks), same annotators")
        boxes(store, settings, server, corpus, links, annotators)
        step(f"release DAG: version {VERSION}, then an ILSVRC evaluation")
        out = release_and_evaluate(store, workdir)
        step("DET: presence of every class by a tree of questions, extreme-click boxes, a DET release")
        from pipeline.demo_det import det

        out["det"] = det(store, settings, server, corpus, links, annotators, workdir)["release"]
        step("challenge: fresh test images with hidden labels, an organisers' baseline and one team on a "
             "leaderboard with intervals")
        from challenge.demo import open_demo_challenge

        board = open_demo_challenge(store, VERSION, workdir)

        step("done")
        print(f"store (all tables):  {store_dir}")
        print(f"release:             {out['release']}")
        print(f"report:              {out['report']}")
        print(f"dataset card:        {out['card']}")
        print(f"DET release:         {out['det']}")
        print(f"leaderboard:         {board['leaderboard']}  (pages: {board['serve']})")
        print(f"Label Studio:        {server.url}   user {server.username}   password {server.password}")
        print("                     (projects 'synsetforge verify' and 'synsetforge box-*'; annotate by hand there)")
        print(LIVE_HOWTO)
        print(f"took {time.perf_counter() - t0:.0f}s")
        return 0
    except DemoFailed as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep_running and services:
            pids = {"label-studio": server.pid, "openverse": services[0].pid} if server else {"openverse": services[0].pid}
            RUNNING_FILE.write_text(json.dumps(pids))
            print("\nstill running (--keep-running): " + ", ".join(f"{k} pid {v}" for k, v in pids.items()))
            print("stop them with: " + "; ".join(f"kill -- -{v}" for v in pids.values())
                  + "   (each is its own process group)")
        else:
            for s in reversed(services):
                s.stop()


if __name__ == "__main__":
    sys.exit(main())
