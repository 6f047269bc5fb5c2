"""ILSVRC metrics: hand-computed cases (incl. the small-object threshold and duplicates), a cross-check of
detection AP against pycocotools, the devkit text formats, and end to end from a built release."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluate import (
    BOX,
    EvaluationInputError,
    average_precision,
    classification_error,
    det_iou_threshold,
    detection_ap,
    evaluate,
    ground_truth_from_files,
    ground_truth_from_release,
    iou,
    localization_error,
    read_cls_text,
    read_mapping,
)


def test_classification_top1_top5_by_hand():
    res = classification_error([1, 2, 3, 4], [[1], [3, 2], [5, 6, 7, 8, 9], []])
    assert res == {"top1_error": 0.75, "top5_error": 0.5, "n_images": 4}
    with pytest.raises(EvaluationInputError, match="at most 5"):
        classification_error([1], [[2, 3, 4, 5, 6, 1]])
    with pytest.raises(EvaluationInputError, match="prediction lines"):
        classification_error([1, 2], [[1]])


def test_localization_needs_class_and_iou_half_by_hand():
    gt = pd.DataFrame([("A", 1, 0, 0, 10, 10), ("B", 2, 0, 0, 10, 10), ("C", 3, 0, 0, 100, 100),
                       ("E", 1, 0, 0, 20, 20), ("E", 2, 50, 50, 60, 60)], columns=["image_id", "cls", *BOX])
    truth = {"A": 1, "B": 2, "C": 3, "D": 4, "E": 1}  # D has no box: not scored
    guesses = {
        "A": [(1, [0, 0, 10, 10])],
        "B": [(1, [0, 0, 10, 10]), (2, [5, 0, 15, 10])],  # wrong class; right class but IoU 1/3
        "C": [(3, [0, 0, 100, 50])],  # IoU exactly 0.5 counts
        "E": [(2, [50, 50, 60, 60]), (1, [0, 0, 20, 20])],  # a box of another class present is not the truth
    }
    res = localization_error(truth, gt, guesses)
    assert res == {"top1_error": 0.5, "top5_error": 0.25, "n_images": 4}


def test_iou_and_small_object_threshold():
    assert iou([0, 0, 10, 10], np.array([[5, 0, 15, 10]]))[0] == pytest.approx(1 / 3)
    assert iou([0, 0, 10, 10], np.array([[20, 20, 30, 30]]))[0] == 0.0
    assert det_iou_threshold(10, 10) == pytest.approx(100 / 400)
    assert det_iou_threshold(100, 100) == 0.5
    assert det_iou_threshold(np.array([20.0]), np.array([30.0]))[0] == pytest.approx(600 / (30 * 40))


def _gt(rows):
    return pd.DataFrame(rows, columns=["image_id", "cls", *BOX])


def _det(rows):
    return pd.DataFrame(rows, columns=["image_id", "cls", "score", *BOX])


def test_detection_small_object_rule_by_hand():
    gt = _gt([("a", 1, 0, 0, 10, 10), ("b", 1, 0, 0, 100, 100)])
    dets = _det([("a", 1, 0.9, 2, 2, 12, 12),  # IoU 64/136 = 0.47 >= 0.25: a hit on the small object
                 ("b", 1, 0.8, 0, 0, 100, 47),  # IoU 0.47 < 0.5 on the big one: a miss
                 ("b", 1, 0.7, 0, 0, 100, 60)])  # IoU 0.6: hit
    res = detection_ap(dets, gt)
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> envelope 1 on (0, .5], 2/3 on (.5, 1]
    assert res["per_class"][1]["ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert res["per_class"][1]["n_tp"] == 2


def test_detection_duplicates_are_false_positives_by_hand():
    gt = _gt([("a", 1, 0, 0, 50, 50), ("b", 1, 0, 0, 50, 50), ("b", 2, 60, 60, 90, 90)])
    dets = _det([("a", 1, 0.9, 0, 0, 50, 50), ("a", 1, 0.8, 1, 1, 50, 50),  # duplicate of the same object
                 ("b", 1, 0.7, 0, 0, 50, 50),
                 ("b", 2, 0.5, 60, 60, 90, 90), ("a", 2, 0.6, 0, 0, 50, 50)])  # class 2: FP ranked first
    res = detection_ap(dets, gt)
    assert res["per_class"][1]["ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert res["per_class"][2]["ap"] == pytest.approx(0.5)
    assert res["mean_ap"] == pytest.approx((0.5 + 0.5 * 2 / 3 + 0.5) / 2)
    # a class with true boxes and no detections has AP 0 and counts in the mean
    res = detection_ap(dets[dets.cls == 1], gt)
    assert res["per_class"][2]["ap"] == 0.0


def test_ap_interpolations_by_hand():
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert average_precision(rec, prec, "voc") == pytest.approx(0.5 + 0.5 * 2 / 3)
    # 101 points: r = 0..0.5 (51 points) at 1, r = 0.51..1 (50 points) at 2/3
    assert average_precision(rec, prec, "coco101") == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert average_precision(rec, prec, "voc07") == pytest.approx((6 + 5 * 2 / 3) / 11)
    with pytest.raises(ValueError):
        average_precision(rec, prec, "nope")


def _random_detection_problem(seed: int, n_images: int = 40, n_classes: int = 4):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for i in range(n_images):
        for _ in range(rng.integers(1, 4)):
            c = int(rng.integers(1, n_classes + 1))
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.uniform(40, 150, 2)  # >= 40 px: min(0.5, wh/((w+10)(h+10))) = 0.5, as COCO's fixed 0.5
            gts.append((f"img{i}", c, x, y, x + w, y + h))
            for _ in range(rng.integers(0, 3)):  # jittered detections, some good, some not, some duplicates
                j = rng.normal(0, 0.15, 4) * [w, h, w, h]
                dets.append((f"img{i}", c, rng.uniform(), x + j[0], y + j[1], x + w + j[2], y + h + j[3]))
        for _ in range(rng.integers(0, 3)):  # background false positives
            x, y = rng.uniform(0, 300, 2)
            dets.append((f"img{i}", int(rng.integers(1, n_classes + 1)), rng.uniform(), x, y, x + 60, y + 60))
    dets = _det(dets)
    dets["score"] = rng.permutation(len(dets)) / len(dets)  # distinct scores: no tie-order ambiguity
    return _gt(gts), dets


def _pycocotools_ap(gt: pd.DataFrame, dets: pd.DataFrame) -> dict[int, float]:
    import pycocotools  # noqa: F401  (a test dependency in the lock; fail loudly if missing)
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = sorted(set(gt.image_id) | set(dets.image_id))
    img_id = {k: n + 1 for n, k in enumerate(images)}
    anns = [{"id": n + 1, "image_id": img_id[r.image_id], "category_id": int(r.cls), "iscrowd": 0,
             "bbox": [r.x_min, r.y_min, r.x_max - r.x_min, r.y_max - r.y_min],
             "area": (r.x_max - r.x_min) * (r.y_max - r.y_min)} for n, r in enumerate(gt.itertuples())]
    coco = COCO()
    coco.dataset = {"images": [{"id": v} for v in img_id.values()], "annotations": anns,
                    "categories": [{"id": int(c)} for c in sorted(gt.cls.unique())]}
    coco.createIndex()
    res = coco.loadRes([{"image_id": img_id[r.image_id], "category_id": int(r.cls), "score": float(r.score),
                         "bbox": [r.x_min, r.y_min, r.x_max - r.x_min, r.y_max - r.y_min]}
                        for r in dets.itertuples()])
    ev = COCOeval(coco, res, "bbox")
    ev.params.iouThrs = np.array([0.5])
    ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e12]], ["all"]
    ev.params.maxDets = [10_000]
    ev.evaluate()
    ev.accumulate()
    prec = ev.eval["precision"][0, :, :, 0, 0]  # recall points x categories
    return {int(c): float(prec[:, k].mean()) for k, c in enumerate(ev.params.catIds)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_ap_matches_pycocotools(seed):
    """Same matching (greedy by score, best unmatched IoU >= 0.5); interpolation handled explicitly:
    with coco101 (pycocotools' 101 recall points) the APs agree exactly; the default VOC area differs by
    the interpolation only."""
    gt, dets = _random_detection_problem(seed)
    theirs = _pycocotools_ap(gt, dets)
    ours = detection_ap(dets, gt, method="coco101")["per_class"]
    assert set(ours) == set(theirs)
    for c in theirs:
        assert ours[c]["ap"] == pytest.approx(theirs[c], abs=1e-12)
    voc = detection_ap(dets, gt, method="voc")["per_class"]
    assert any(abs(voc[c]["ap"] - theirs[c]) > 1e-6 for c in theirs)  # the interpolations really differ
    assert all(abs(voc[c]["ap"] - theirs[c]) < 0.03 for c in theirs)


def test_devkit_text_format_errors_name_the_file_and_line(tmp_path):
    sub = tmp_path / "sub.txt"
    sub.write_text("1 2\n3 x\n")
    with pytest.raises(EvaluationInputError, match=r"sub.txt:2"):
        read_cls_text(sub, 2, 5)
    sub.write_text("1 2\n")
    with pytest.raises(EvaluationInputError, match="1 lines"):
        read_cls_text(sub, 2, 5)
    sub.write_text("1 2\n9\n")
    with pytest.raises(EvaluationInputError, match="outside 1..5"):
        read_cls_text(sub, 2, 5)
    sub.write_text("1 2 3 4 5 1\n2\n")
    with pytest.raises(EvaluationInputError, match="at most 5"):
        read_cls_text(sub, 2, 5)
    mapping = tmp_path / "map.txt"
    mapping.write_text("n00000002 2 b\nn00000001 1 a\n")
    assert read_mapping(mapping) == ["n00000001", "n00000002"]
    mapping.write_text("n00000001 1 a\nn00000003 3 c\n")
    with pytest.raises(EvaluationInputError, match="without gaps"):
        read_mapping(mapping)


@pytest.fixture
def release(tmp_path):
    from pipeline.release.build import build_release
    from pipeline.release.synthetic import make_fixture
    from pipeline.store import LocalStore

    store = LocalStore(tmp_path / "store")
    make_fixture(store, n_classes=4, per_class=10, box_fraction=0.6, seed=5)
    build_release(store, "v1", val_per_class=4, test_per_class=1, neardup=False)
    return store


def test_end_to_end_from_release_and_devkit_files(release, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.release.export import export_devkit

    store = release
    gt = ground_truth_from_release(store, "v1")
    assert len(gt.order) == 16
    export_devkit(store, "v1", tmp_path / "dk", images=False)
    gt_file = (tmp_path / "dk/devkit/data/v1_validation_ground_truth.txt").read_text().split()
    assert [int(x) for x in gt_file] == [gt.truth[i] for i in gt.order]

    # a submission that is right on its second guess for every image: top-1 error 1, top-5 error 0
    n = len(gt.wnids)
    sub = tmp_path / "cls.txt"
    sub.write_text("".join(f"{gt.truth[i] % n + 1} {gt.truth[i]}\n" for i in gt.order))
    root = str(store.root)
    assert main(["--store", root, "evaluate", "--release", "v1", "--task", "cls", "--predictions", str(sub),
                 "--json", str(tmp_path / "r.json")]) == 0
    assert "| cls | 16 | 1.0000 | 0.0000 |" in capsys.readouterr().out
    # the same from the devkit files alone
    gfiles = ground_truth_from_files(tmp_path / "dk/devkit/data/v1_validation_ground_truth.txt",
                                     tmp_path / "dk/devkit/data/map_clsloc.txt")
    assert evaluate("cls", sub, gfiles)["top5_error"] == 0.0

    # detection from Parquet: every true box found once (AP 1), plus a low-scored duplicate (still 1)
    det = gt.boxes.copy()
    det["wnid"] = [gt.wnids[c - 1] for c in det.cls]
    det["score"] = 0.9
    dup = det.head(1).assign(score=0.1)
    pq_path = tmp_path / "det.parquet"
    pd.concat([det, dup]).drop(columns=["cls"]).to_parquet(pq_path)
    res = evaluate("det", pq_path, gt)
    assert res["mean_ap"] == pytest.approx(1.0)
    # localization from Parquet: one guess per boxed image, the right class and box
    loc = det.drop_duplicates("image_id").drop(columns=["cls", "score"])
    loc.to_parquet(tmp_path / "loc.parquet")
    res = evaluate("loc", tmp_path / "loc.parquet", gt)
    assert res["top5_error"] == 0.0 and res["n_images"] == gt.boxes.drop_duplicates("image_id").shape[0] - \
        sum(1 for i, g in gt.boxes.groupby("image_id") if gt.truth[i] not in set(g.cls))

    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"image_id": ["nope"], "wnid": [gt.wnids[0]]}).to_parquet(bad)
    assert main(["--store", root, "evaluate", "--release", "v1", "--task", "cls", "--predictions", str(bad)]) == 2
    assert "not in the evaluated split" in capsys.readouterr().err
    assert main(["--store", root, "evaluate", "--release", "v9", "--task", "cls", "--predictions", str(sub)]) == 2


def test_cls_from_devkit_indices_needs_no_mapping(tmp_path, capsys):
    """Prediction and truth both in the devkit's 1-based indices: no wnid is needed, so no --mapping."""
    from pipeline.cli import main

    truth = [1, 2, 3, 2, 1]
    (tmp_path / "gt.txt").write_text("".join(f"{k}\n" for k in truth))
    # right first guess on 3 images, right second guess on one, wrong on the last
    (tmp_path / "sub.txt").write_text("1 2\n2\n3 1\n1 2\n3\n")
    assert main(["evaluate", "--task", "cls", "--ground-truth", str(tmp_path / "gt.txt"),
                 "--predictions", str(tmp_path / "sub.txt"), "--json", str(tmp_path / "r.json")]) == 0
    import json

    res = json.loads((tmp_path / "r.json").read_text())
    assert res["n_images"] == 5 and res["top1_error"] == 2 / 5 and res["top5_error"] == 1 / 5
    capsys.readouterr()
    # A guess beyond the ground truth's classes needs the class count: a clear error names the option.
    (tmp_path / "sub.txt").write_text("7\n2\n3\n2\n1\n")
    assert main(["evaluate", "--task", "cls", "--ground-truth", str(tmp_path / "gt.txt"),
                 "--predictions", str(tmp_path / "sub.txt")]) == 2
    assert "outside 1..3" in capsys.readouterr().err
    assert main(["evaluate", "--task", "cls", "--ground-truth", str(tmp_path / "gt.txt"), "--n-classes", "10",
                 "--predictions", str(tmp_path / "sub.txt")]) == 0
