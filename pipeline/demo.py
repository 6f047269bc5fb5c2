"""`make demo`: the whole pipeline on the embedded, offline default, then where the release and report are.

Offline means no search API: the candidate images are generated here into one folder per wnid (the local_dir
source), with a share of misfiled images from other classes, a corrupt file and a tiny one, so the crowd and the
ingest checks have something to catch, as raw web search gave ImageNet about 10 % precision. Every other part is
the real thing: WordNet 3.0, the ingest stage, a Label Studio server started here with simulated annotators
working through its API, QC, the box loop, a release with its report, and an evaluation of a baseline.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pydantic import SecretStr

from pipeline.config import Settings, load_settings
from pipeline.store import LocalStore, open_store

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-output"
# Five ILSVRC-2012 classes (the cats), as ImageNet writes them.
DEMO_WNIDS = ["n02123045", "n02123159", "n02123394", "n02123597", "n02124075"]
PER_CLASS = 10
MISFILED_PER_CLASS = 2
VERSION = "demo-1"
BOXED_PER_CLASS = 2


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


# ---------------------------------------------------------------- embedded candidate images


def draw_photo(rng: np.random.Generator, class_index: int, size: tuple[int, int] = (400, 320)) -> tuple[Image.Image, list[float]]:
    """A textured background with one object whose colour and shape depend on the class; returns its true box."""
    w, h = size
    noise = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    img = Image.fromarray(noise).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(3))
    draw = ImageDraw.Draw(img)
    hue = [(200, 120, 40), (90, 90, 90), (230, 230, 220), (210, 190, 150), (120, 80, 50)][class_index % 5]
    bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in hue)
    if class_index % 2:
        draw.ellipse([x0, y0, x0 + bw, y0 + bh], fill=colour, outline=(0, 0, 0), width=3)
    else:
        draw.rounded_rectangle([x0, y0, x0 + bw, y0 + bh], radius=min(bw, bh) // 4, fill=colour,
                               outline=(0, 0, 0), width=3)
    for k in range(int(rng.integers(2, 6))):  # stripes: a texture per image
        yy = y0 + (k + 1) * bh // 7
        draw.line([x0 + 6, yy, x0 + bw - 6, yy], fill=(30, 30, 30), width=2)
    return img, [float(x0), float(y0), float(x0 + bw), float(y0 + bh)]


def make_candidate_folder(folder: Path, wnids: list[str], seed: int = 0) -> dict[str, Any]:
    """One sub-folder per wnid; returns the truth the simulated workers answer from, keyed by file name."""
    rng = np.random.default_rng(seed)
    truth: dict[str, Any] = {}
    for ci, wnid in enumerate(wnids):
        d = folder / wnid
        d.mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            img, box = draw_photo(rng, ci)
            name = f"{wnid}_{i:03d}.jpg"
            img.save(d / name, quality=90)
            truth[name] = {"wnid": wnid, "box": box}
        for i in range(MISFILED_PER_CLASS):  # search noise: photos of another class in this folder
            other = (ci + 1 + i) % len(wnids)
            img, box = draw_photo(rng, other)
            name = f"misfiled_{wnid}_{i:03d}.jpg"
            img.save(d / name, quality=90)
            truth[name] = {"wnid": wnids[other], "box": box}
        (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # a truncated JPEG header
        Image.new("RGB", (8, 8), (255, 0, 0)).save(d / "tiny.png")  # below the minimum size
    return truth


# ---------------------------------------------------------------- stages


def run_vocabulary_step(settings: Settings, store: LocalStore, workdir: Path) -> None:
    from pipeline.vocabulary import run_vocabulary

    wnid_file = workdir / "classes.txt"
    wnid_file.write_text("\n".join(DEMO_WNIDS) + "\n")
    settings.vocabulary.wnid_file = str(wnid_file)
    summary = run_vocabulary(settings, store, log=lambda *_: None)
    for r in store.read_table("synsets").to_pandas().itertuples():
        print(f"  {r.wnid}  {', '.join(r.lemmas)[:34]:34s}  queries: {'; '.join(r.queries[:3])}")
    print(f"  -> {summary['synsets_table']}")


def run_collect_ingest(settings: Settings, store: LocalStore) -> None:
    from pipeline.ingest.stage import run_ingest
    from pipeline.sources.collect import run_collect

    c = run_collect(store, settings)
    print(f"  candidates: {c['candidates']} from {c['by_source']}")
    s = run_ingest(store, settings)
    print(f"  images: {s['accepted']} accepted, {s['duplicates']} duplicates, rejected {s['rejected']}, "
          f"near duplicates {s['near_duplicates']}")


def run_crowd_verification(settings: Settings, store: LocalStore, truth: dict[str, Any], workdir: Path) -> dict:
    """Label Studio on loopback, simulated annotators, and the pull -> QC -> push loop until QC is done."""
    from crowd.client import CrowdClient
    from crowd.provision import image_dir_of, provision
    from crowd.pull import pull
    from crowd.push import push
    from crowd.server import start_labelstudio
    from crowd.simulate import Profile, flagged_workers, make_annotators, routable, work
    from pipeline.qc.stage import run_qc

    links = store.read_table("image_links").to_pandas()
    answer = {(r.image_id, r.wnid): ("yes" if truth[Path(r.url).name]["wnid"] == r.wnid else "no")
              for r in links.itertuples()}
    print("  starting Label Studio 1.23.2 on 127.0.0.1 (about a minute on a fresh database) ...", flush=True)
    server = start_labelstudio(workdir / "label-studio", files_root=Path(store.root))
    try:
        settings.crowd.url = server.url
        settings.crowd.token = SecretStr(server.token)
        settings.crowd.pseudonym_key = SecretStr("demo-pseudonym-key")
        settings.crowd.files_root = str(store.root)
        admin = CrowdClient(server.url, server.token)
        project = provision(admin, settings, kinds=["verify"], image_dir=image_dir_of(store))["verify"]
        profiles = [Profile(accuracy=a) for a in (0.95, 0.93, 0.92, 0.9, 0.88)] + [Profile(kind="spammer")]
        annotators = make_annotators(admin, profiles)
        print(f"  project {project} at {server.url}; annotators: 5 careful, 1 spammer", flush=True)
        key = settings.crowd.pseudonym_key.get_secret_value().encode()
        for rnd in range(1, 9):
            qc = run_qc(store, settings)
            if qc["push_pairs"] == 0:
                break
            pushed = push(store, admin, settings, project_id=project, kind="verify")
            done = work(routable(annotators, flagged_workers(store), key), project, answer, seed=rnd)
            pulled = pull(store, admin, settings, project_ids=[project])
            print(f"  round {rnd}: pushed {pushed['pushed']} tasks, {sum(done.values())} answers, "
                  f"pulled {pulled.get('new_votes', pulled)} votes", flush=True)
        qc = run_qc(store, settings)
        print(f"  labels: {qc['accepted']} accepted, {qc['rejected']} rejected, {qc['pending']} pending; "
              f"{qc['flagged_workers']} of {qc['workers']} workers flagged")
        labels = store.read_table("labels").to_pandas()
        right = [answer.get((r.image_id, r.wnid)) == ("yes" if r.status == "accepted" else "no")
                 for r in labels[labels.status != "pending"].itertuples()]
        print(f"  labels agree with the truth on {np.mean(right):.1%} of decided pairs")

        step("boxes: draw / verify quality / verify coverage (ILSVRC micro-tasks) on the same server")
        run_box_loop(settings, store, admin, annotators, links, truth, labels)
        return {"url": server.url}
    finally:
        server.stop()


def run_box_loop(settings: Settings, store: LocalStore, admin: Any, annotators: list, links: Any, truth: dict,
                 labels: Any) -> None:
    """Boxes for the first accepted images of each class, drawn and checked by the same simulated crowd."""
    import pandas as pd

    from crowd.boxes import run_until_done
    from crowd.simulate_boxes import default_workers

    accepted = labels[labels.status == "accepted"].groupby("wnid").head(BOXED_PER_CLASS)
    pairs = accepted[["image_id", "wnid"]].reset_index(drop=True)
    url_of = {(r.image_id, r.wnid): r.url for r in links.itertuples()}
    truth_boxes = pd.DataFrame([
        {"image_id": r.image_id, "wnid": r.wnid, **dict(zip(("x_min", "y_min", "x_max", "y_max"),
                                                            truth[Path(url_of[(r.image_id, r.wnid)]).name]["box"],
                                                            strict=True))}
        for r in pairs.itertuples()
    ])
    workers = list(zip(annotators[:3], default_workers(3), strict=True))
    out = run_until_done(store, settings, workers, truth_boxes, client=admin, pairs=pairs, max_rounds=30)
    boxes = store.read_table("boxes").to_pandas()
    coverage = store.read_table("coverage").to_pandas()
    print(f"  {len(pairs)} images: {int((boxes.verified == 'accepted').sum())} boxes accepted, "
          f"{int(coverage.covered.sum())} images fully covered, {out['annotations']} answers in {out['rounds']} rounds")


def run_release_and_evaluate(settings: Settings, store: LocalStore, workdir: Path) -> dict[str, str]:
    from pipeline.evaluate import evaluate, format_result, ground_truth_from_release
    from pipeline.release.build import build_release
    from pipeline.release.report import build_report

    manifest = build_release(store, VERSION, val_per_class=3, test_per_class=2, config_digest=settings.digest())
    keys = build_report(store, VERSION)
    print(f"  release {VERSION}: {manifest.get('counts', {}).get('splits', manifest.get('splits', ''))}")
    gt = ground_truth_from_release(store, VERSION, "val")
    # A baseline submission: the true class ranked third of five guesses on every other image.
    lines = []
    for i, image in enumerate(gt.order):
        t = gt.truth[image]
        others = [c for c in range(1, len(gt.wnids) + 1) if c != t]
        lines.append(" ".join(map(str, others[:2] + [t] + others[2:4])) if i % 2 else " ".join(map(str, others[:5])))
    pred = workdir / "baseline_cls.txt"
    pred.write_text("\n".join(lines) + "\n")
    print("  baseline submission (true class third of five guesses on half the images, absent on the rest):")
    print("  " + format_result(evaluate("cls", pred, gt)).replace("\n", "\n  "))
    return {"report": str(Path(store.root) / keys["report"]), "card": str(Path(store.root) / keys["card"])}


def main() -> int:
    t0 = time.perf_counter()
    if OUT.exists():
        shutil.rmtree(OUT)
    store_dir, photos = OUT / "store", OUT / "candidates"
    workdir = Path(tempfile.mkdtemp(prefix="sf-demo-"))
    settings = load_settings(overrides={
        "store": {"url": str(store_dir)},
        "collect": {"sources": ["local_dir"], "local_dir": str(photos)},
    })
    store = open_store(settings.store.url)
    assert isinstance(store, LocalStore)

    step("vocabulary: five ILSVRC-2012 cat classes from WordNet 3.0")
    run_vocabulary_step(settings, store, workdir)
    step("collect + ingest: the embedded candidate folders (with misfiled, corrupt and tiny files)")
    truth = make_candidate_folder(photos, DEMO_WNIDS)
    run_collect_ingest(settings, store)
    step("verify: Label Studio + simulated annotators, adaptive QC decides who votes on what")
    run_crowd_verification(settings, store, truth, workdir)
    step("release + report + evaluation")
    out = run_release_and_evaluate(settings, store, workdir)

    step("done")
    print(f"store (all tables):  {store_dir}")
    print(f"release:             {store_dir / 'releases' / VERSION}")
    print(f"report:              {out['report']}")
    print(f"dataset card:        {out['card']}")
    print(f"took {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
